"""length_hacking: is PPO's reward gain response length? (Singhal et al. 2310.03716, "A Long Way
to Go: Investigating Length Correlations in RLHF").

Per world seed, every run answers the held-out eval prompts k times at temperature 1 (rl_runs'
cached evaluation: per sample its tokens, its proxy score, i.e. the learned reward model's, and
its gold score):
- SFT, and the main PPO run: rl_runs' long run `lab_ppo_<main>` (PPO on the learned reward model,
  whose annotators like length: utility += length * log1p(words)), shared with overopt_rl and
  calibration_diversity. "After PPO" is its last snapshot (rl_runs' `steps`, 10x the toy's ppo
  budget): the policy that has optimised the reward the longest, where a length exploit has had
  every chance to appear; every snapshot's length is shown too (step 30 is the toy's own budget).
- length_only: the same PPO (steps, lr, KL, value model from the reward model) on a reward that
  is only a function of length, `length_reward` = log1p(words), the annotators' length term
  (Singhal et al.'s length-only PPO);
- length_penalty: the main run with `reward.length_penalty` per response token; `rm_slope` in
  the config sets it to the reward model's own score per token within families on SFT's samples
  (`rm_length_slope`, per seed), which makes the penalised reward about length-neutral;
- balanced_rm: PPO on a reward model fitted to length-balanced pairs (reward `length_balance`).
Each of those three is judged at its end, after as many steps as the main run.

Figures (pooled: the mean over seeds of each seed's mean over prompts and samples):
- length growth of a run: mean tokens / SFT's mean tokens - 1;
- proxy gain of a run: mean proxy - SFT's mean proxy;
- within-bucket share (Singhal et al. sec. 3, `bucket_gain`): the weighted reward gain inside
  length buckets, as a share of the proxy gain;
- length-only recovery: the length-only run's proxy gain / the main run's proxy gain;
- growth ratio of an intervention: its length growth / the main run's (defined when the main run
  grew).
Criteria (the issue's): growth >= 30%; within-bucket share <= 30% with length grown (a gain from
shorter responses is no length hacking); recovery >= 70%; the better intervention's growth ratio
<= 0.5. Intervals: the lab's stratified bootstrap over prompts (every model of a seed resampled
with the same prompts).
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from pathlib import Path

import numpy as np

from posttrain.lab import rl_runs
from posttrain.lab.base import Criterion, Lab, at_least, write_outputs
from posttrain.lab.stats import bootstrap

NAME = "length_hacking"
TITLE = "Length hacking in RLHF (Singhal et al. 2310.03716, A Long Way to Go)"
GROWTH, WITHIN, RECOVER, HALVE = 0.30, 0.30, 0.70, 0.5
ROLES = ("length_only", "length_penalty", "balanced_rm")  # the runs besides the main one
INTERVENTIONS = ("length_penalty", "balanced_rm")
LABELS = ("sft", "ppo", *ROLES)  # models of the per-seed arrays, in this order
TOK, PROXY, GOLD = 0, 1, 2  # columns of a sample
BALANCED_RM = "lab_reward_balanced"


def length_reward(prompt: dict, response: str) -> float:
    """The length-only reward (rl stage `reward: {kind: function}`): log1p(words of the
    response), the length feature of the simulated annotators' utility (world/annotators.py),
    with weight 1."""
    from posttrain.world.annotators import features

    return features(response)["log_length"]


def bucket_gain(len_a, r_a, len_b, r_b, width: float) -> float:
    """Singhal et al.'s weighted reward gain of samples b over samples a within length buckets.

    Buckets [j * width, (j + 1) * width), the same for both; in every bucket that both reach,
    the mean reward of b minus that of a, weighted by the bucket's share of all samples
    ((n_a,j + n_b,j) / (N_a + N_b), as the authors' code weighs them). A bucket that only one
    side reaches adds nothing: reward gained by moving to lengths the other never produced is
    gain from length."""
    len_a, len_b = np.asarray(len_a, float), np.asarray(len_b, float)
    ja, jb = (len_a // width).astype(int), (len_b // width).astype(int)
    n = int(max(ja.max(), jb.max())) + 1
    ca, cb = np.bincount(ja, minlength=n), np.bincount(jb, minlength=n)
    sa = np.bincount(ja, weights=np.asarray(r_a, float), minlength=n)
    sb = np.bincount(jb, weights=np.asarray(r_b, float), minlength=n)
    both = (ca > 0) & (cb > 0)
    diff = sb[both] / cb[both] - sa[both] / ca[both]
    return float(((ca[both] + cb[both]) * diff).sum() / (len(len_a) + len(len_b)))


def run(lab: Lab) -> dict:
    started = time.perf_counter()
    raw = lab.config(NAME)
    spec = raw["lab"][NAME]
    per_seed, traj, info, steps = {}, {}, {}, None
    for seed in lab.seeds:
        seed_dir, models = prepare(lab, seed, raw, spec)
        evals = {label: [(step, rl_runs.evaluation(lab, seed_dir, raw, "sft" if step == 0 else name,
                                                    step, path)) for step, path in points]
                 for label, (name, points) in models.items()}  # fmt: skip
        main = evals["ppo"]
        seed_steps = [s for s, _ in main]
        if steps is not None and seed_steps != steps:
            raise ValueError(f"{NAME}: seed {seed} has snapshots at {seed_steps}, not {steps}")
        steps = seed_steps
        final = [main[0][1], main[-1][1]] + [evals[r][0][1] for r in ROLES]
        per_seed[seed] = sample_table(final)
        traj[seed] = sample_table([ev for _, ev in main])[..., :2]  # (P, J, k, 2)
        info[seed] = seed_info(seed_dir, raw, final, per_seed[seed])
        lab.logger.info(f"{NAME}: seed {seed}: mean tokens " + " ".join(
            f"{lb} {per_seed[seed][:, i, :, TOK].mean():.1f}" for i, lb in enumerate(LABELS)))  # fmt: skip
    figures = summarise(per_seed, traj, steps, spec["bucket_width"])
    figures |= {"main_stage": f"lab_ppo_{spec['main']}", "after_step": steps[-1],
                "bucket_width": spec["bucket_width"], "seeds_info": info,
                "per_family_tokens": _pooled_families(info)}  # fmt: skip
    criteria = _criteria(figures)
    from posttrain.lab.length_hacking_plots import body, plot

    plots = plot(lab, figures, per_seed, NAME)
    return write_outputs(lab, NAME, TITLE, figures, criteria, plots, started=started,
                         body=body(figures, info[lab.seeds[0]], lab.seeds[0]))  # fmt: skip


def add_stages(raw: dict, spec: dict, main_stage: str, slope: float) -> dict[str, str]:
    """label -> stage of each run of ROLES, its section added to `raw`: the main run's section
    with the role's overrides from `spec["runs"]` (no snapshots), a `reward.length_penalty` of
    "rm_slope" replaced by max(slope, 0) to 3 significant digits; and BALANCED_RM, the reward
    model's section with `spec["balanced_reward"]` over it."""
    from posttrain.config import _deep_merge

    runs = spec["runs"]
    if set(runs) != set(ROLES):
        raise ValueError(f"lab.{NAME}.runs: expected the runs {list(ROLES)}, got {list(runs)}")
    clash = set(ROLES) & (set(raw["lab"]["rl_runs"]["kl_coefs"]) | {"sft"})
    if clash:
        raise ValueError(f"lab.rl_runs.kl_coefs: labels {sorted(clash)} are {NAME}'s runs")
    rm = raw["ppo"]["reward"]["model"]
    raw[BALANCED_RM] = _deep_merge(copy.deepcopy(raw[rm]), spec["balanced_reward"]) | {
        "kind": "reward"
    }
    out = {}
    for label in ROLES:
        sec = _deep_merge(copy.deepcopy(raw[main_stage]), runs[label] or {})
        if sec["reward"].get("length_penalty") == "rm_slope":
            sec["reward"]["length_penalty"] = float(f"{max(slope, 0.0):.3g}")
        raw[f"lab_ppo_{label}"] = sec | {"snapshot_every": 0}
        out[label] = f"lab_ppo_{label}"
    return out


def prepare(lab: Lab, seed: int, raw: dict, spec: dict) -> tuple[Path, dict]:
    """Run (or find cached) the reward chain, the main run and this experiment's runs of one
    seed. Returns the seed's folder and label -> (evaluation name, [(step, model dir)]): "ppo"
    the main run from step 0 (the SFT model) through its snapshots, each role its last step."""
    from posttrain.rl.snapshots import read_snapshots

    runs = rl_runs.run_stages(raw)
    if spec["main"] not in runs:
        raise ValueError(f"lab.{NAME}.main: {spec['main']!r} is not a run of lab.rl_runs.kl_coefs")
    main = runs[spec["main"]]
    chain = ["sample", "rank", raw["ppo"]["reward"]["model"], main]
    seed_dir = lab.run_stages(seed, raw, chain)
    sft = seed_dir / raw["ppo"]["model"] / "model"
    slope = rm_length_slope(rl_runs.evaluation(lab, seed_dir, raw, "sft", 0, sft))
    extra = add_stages(raw, spec, main, slope)
    seed_dir = lab.run_stages(seed, raw, chain + [BALANCED_RM] + list(extra.values()))
    points = [(0, sft)] + [
        (s["step"], seed_dir / main / s["path"]) for s in read_snapshots(seed_dir / main)
    ]
    out = {"ppo": (spec["main"], points)}
    for label, stage in extra.items():
        out[label] = (label, [(raw[stage]["steps"], seed_dir / stage / "model")])
    return seed_dir, out


def _within_family(ev: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tokens and proxy scores of an evaluation's samples, (P, k) each, and both with each
    family's own mean removed."""
    fam = np.array([r["family"] for r in ev["sampled"]])
    tok = np.array([[len(s["ids"]) for s in r["samples"]] for r in ev["sampled"]], float)
    proxy = np.array([[s["proxy"] for s in r["samples"]] for r in ev["sampled"]], float)
    dt, dp = tok.copy(), proxy.copy()
    for f in np.unique(fam):
        dt[fam == f] -= tok[fam == f].mean()
        dp[fam == f] -= proxy[fam == f].mean()
    return tok, proxy, dt, dp


def rm_length_slope(ev: dict) -> float:
    """The reward model's score per response token within families: the least-squares slope of
    proxy on tokens, each family's means removed, over an evaluation's samples (SFT's: how much
    one more token earns where the family, and so the kind of answer, is fixed)."""
    _, _, dt, dp = _within_family(ev)
    return float((dt * dp).sum() / (dt * dt).sum()) if (dt * dt).sum() > 0 else float("nan")


def sample_table(evals: list[dict]) -> np.ndarray:
    """(P, M, k, 3): tokens, proxy and gold of every sample of each of M evaluations (the same
    prompts, in the same order, for every one)."""
    ids = [r["prompt_id"] for r in evals[0]["sampled"]]
    if any([r["prompt_id"] for r in ev["sampled"]] != ids for ev in evals):
        raise ValueError(f"{NAME}: the models answered different prompts")
    arr = np.array([[[[len(s["ids"]), s["proxy"], s["gold"]] for s in rec["samples"]]
                     for rec in ev["sampled"]] for ev in evals], float)  # fmt: skip
    return arr.transpose(1, 0, 2, 3)  # (M, P, k, 3) -> (P, M, k, 3)


def seed_info(seed_dir: Path, raw: dict, final: list[dict], table: np.ndarray) -> dict:
    """Evidence beside the verdicts: the reward model's length correlation on SFT's samples
    (overall, and within families: each family's own mean removed), its within-family slope per
    token, both reward stages' held-out length correlation and the balancing counts; mean
    tokens per family and the most frequent responses of each model."""
    import json

    fam = np.array([r["family"] for r in final[0]["sampled"]])
    tok, proxy, dt, dp = _within_family(final[0])  # SFT's samples
    rm = {}
    for stage in (raw["ppo"]["reward"]["model"], BALANCED_RM):
        m = json.loads((seed_dir / stage / "result.json").read_text())["metrics"]
        rm[stage] = {k.split("/", 1)[1]: v for k, v in m.items()
                     if k in ("eval/length_corr", "eval/gold_agreement", "eval/accuracy",
                              "data/train_pairs", "data/chosen_longer", "data/chosen_shorter",
                              "data/length_balance_dropped")}  # fmt: skip
    samples = {}
    for label, ev in zip(LABELS, final, strict=True):
        by = {}
        for rec in ev["sampled"]:
            by.setdefault(rec["family"], Counter()).update(s["text"] for s in rec["samples"])
        samples[label] = {f: [(t, n / sum(c.values())) for t, n in c.most_common(2)]
                          for f, c in by.items()}  # fmt: skip
    return {"rm_corr_sft": _corr(tok.ravel(), proxy.ravel()),
            "rm_corr_within_family": _corr(dt.ravel(), dp.ravel()),
            "rm_slope_per_token_within_family": rm_length_slope(final[0]),
            "length_penalty": raw["lab_ppo_length_penalty"]["reward"].get("length_penalty", 0.0),
            "reward_stages": rm, "samples": samples,
            "family_tokens": {lb: {f: float(table[fam == f, i, :, TOK].mean())
                                   for f in np.unique(fam)} for i, lb in enumerate(LABELS)}}  # fmt: skip


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else float("nan")


def _pooled_families(info: dict) -> dict:
    """label -> family -> the mean over seeds of each seed's mean tokens."""
    seeds = list(info)
    fams = info[seeds[0]]["family_tokens"]["sft"]
    return {lb: {f: float(np.mean([info[s]["family_tokens"][lb][f] for s in seeds])) for f in fams}
            for lb in LABELS}  # fmt: skip


def _mean(gs, m: int, c: int) -> float:
    """The mean over seeds of each seed's mean over prompts and samples of column c of model m."""
    return float(np.mean([g[:, m, :, c].mean() for g in gs]))


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def statistics(width: float) -> dict:
    """name -> statistic of the per-seed (P, M, k, 3) arrays (models in LABELS order)."""
    out = {}
    for m, lb in enumerate(LABELS):
        for c, key in ((TOK, "tokens"), (PROXY, "proxy"), (GOLD, "gold")):
            out[f"{key}[{lb}]"] = lambda gs, m=m, c=c: _mean(gs, m, c)
        if m == 0:
            continue
        out[f"growth[{lb}]"] = lambda gs, m=m: _mean(gs, m, TOK) / _mean(gs, 0, TOK) - 1
        out[f"proxy_gain[{lb}]"] = lambda gs, m=m: _mean(gs, m, PROXY) - _mean(gs, 0, PROXY)
        out[f"gold_gain[{lb}]"] = lambda gs, m=m: _mean(gs, m, GOLD) - _mean(gs, 0, GOLD)

    def within(gs, m):
        return float(np.mean([bucket_gain(g[:, 0, :, TOK].ravel(), g[:, 0, :, PROXY].ravel(),
                                          g[:, m, :, TOK].ravel(), g[:, m, :, PROXY].ravel(),
                                          width) for g in gs]))  # fmt: skip

    def gain(gs, m):
        return _mean(gs, m, PROXY) - _mean(gs, 0, PROXY)

    def growth(gs, m):
        return _mean(gs, m, TOK) / _mean(gs, 0, TOK) - 1

    for m, lb in ((1, "ppo"), (2, "length_only")):
        out[f"within_bucket_gain[{lb}]"] = lambda gs, m=m: within(gs, m)
        out[f"within_share[{lb}]"] = lambda gs, m=m: _ratio(within(gs, m), gain(gs, m))
    out["length_only_recovery"] = lambda gs: _ratio(gain(gs, 2), gain(gs, 1))
    for lb in INTERVENTIONS:
        m = LABELS.index(lb)
        out[f"growth_ratio[{lb}]"] = lambda gs, m=m: _ratio(growth(gs, m), growth(gs, 1))
    idx = [LABELS.index(lb) for lb in INTERVENTIONS]

    def best(gs):
        r = [_ratio(growth(gs, m), growth(gs, 1)) for m in idx]
        return float(np.nanmin(r)) if np.isfinite(r).any() else float("nan")

    out["best_growth_ratio"] = best
    return out


def summarise(per_seed: dict, traj: dict, steps: list[int], width: float) -> dict:
    """Every statistic with its interval, pooled and per seed; the main run's mean tokens and
    proxy at every snapshot (traj: seed -> (P, J, k, 2))."""
    seeds = list(per_seed)
    gs = [per_seed[s] for s in seeds]
    stats = statistics(width)
    ts = [traj[s] for s in seeds]

    def at(j, c):
        return lambda g: float(np.mean([x[:, j, :, c].mean() for x in g]))

    by_step = {"steps": steps,
               "tokens": [bootstrap(at(j, TOK), ts) for j in range(len(steps))],
               "proxy": [bootstrap(at(j, PROXY), ts) for j in range(len(steps))],
               "growth": [bootstrap(lambda g, j=j: at(j, TOK)(g) / at(0, TOK)(g) - 1, ts)
                          for j in range(len(steps))]}  # fmt: skip
    return {"labels": list(LABELS), "by_step": by_step,
            "pooled": {name: bootstrap(stat, gs) for name, stat in stats.items()},
            "per_seed": {s: {name: bootstrap(stat, [per_seed[s]]) for name, stat in stats.items()}
                         for s in seeds}}  # fmt: skip


def _pct(x: float) -> str:
    return f"{x:+.0%}" if np.isfinite(x) else "undefined"


def _criteria(figures: dict) -> list[Criterion]:
    P = figures["pooled"]
    grew = P["growth[ppo]"].value
    out = [at_least("length_growth", "PPO on the learned reward grows mean response length "
                    "(tokens after PPO / SFT - 1)", P["growth[ppo]"], GROWTH)]  # fmt: skip
    out[-1].note = (
        f"mean tokens SFT {P['tokens[sft]'].value:.1f} -> PPO "
        f"{P['tokens[ppo]'].value:.1f} at step {figures['after_step']}"
    )
    share = P["within_share[ppo]"]
    ok = bool(np.isfinite(share.value) and share.value <= WITHIN and grew > 0)
    note = f"proxy gain {P['proxy_gain[ppo]'].value:.3g}"
    if grew <= 0:
        note += (
            f"; length fell ({_pct(grew)}): what the buckets do not explain is a move to "
            "shorter responses, not length hacking"
        )
    out.append(Criterion("within_bucket_share", "the proxy gain within length buckets is at most "
                         f"{WITHIN:.0%} of the proxy gain (the rest comes from longer responses)",
                         f"value <= {WITHIN:g} and length grew (length_growth > 0)", share, ok,
                         note))  # fmt: skip
    rec = P["length_only_recovery"]
    out.append(at_least("length_only_recovers", "PPO on a length-only reward recovers the main "
                        "run's proxy gain (its proxy gain / the main run's)", rec, RECOVER))  # fmt: skip
    out[-1].note = (
        f"proxy gain: length-only {P['proxy_gain[length_only]'].value:.3g}, main "
        f"{P['proxy_gain[ppo]'].value:.3g}; length-only length growth "
        f"{_pct(P['growth[length_only]'].value)}"
    )
    best = P["best_growth_ratio"]
    ok = bool(np.isfinite(best.value) and best.value <= HALVE and grew > 0)
    note = "; ".join(f"{lb}: growth {_pct(P[f'growth[{lb}]'].value)}, ratio "
                     f"{P[f'growth_ratio[{lb}]'].value:.3g}" for lb in INTERVENTIONS)  # fmt: skip
    if grew <= 0:
        note = f"the main run's length growth is {_pct(grew)}: no growth to halve; " + note
    out.append(Criterion("intervention_halves_growth", "a length penalty or a length-balanced "
                         "reward model at least halves the length growth",
                         f"min over both of growth / main run's growth <= {HALVE:g}, with the "
                         "main run's growth > 0", best, ok, note))  # fmt: skip
    return out
