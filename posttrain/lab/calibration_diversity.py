"""calibration_diversity: what RL does to calibration and to diversity (GPT-4 technical report
fig. 8; Kirk et al. 2310.06452).

Per world seed: the SFT model and the snapshots of the long PPO runs that overopt_rl uses
(rl_runs.py), evaluated once for both experiments.
- Calibration: greedy answers to every answerable eval prompt (arithmetic, string, questions
  about known entities), confidence = the probability of the whole answer; ECE, and
  temperature scaling fitted on one half of the prompts and graded on the other
  (eval/metrics.py: calibration, temperature_scaling), as the evaluate stage reports them.
- Diversity: k samples per sampled eval prompt at temperature 1; per input (within a
  prompt's k samples, averaged over prompts) EAD and self-BLEU on token ids, distinct-2 on
  words, and the policy's mean per-token entropy on those samples (eval/diversity.py,
  eval/entropy.py); across inputs (the first sample of every prompt as one group) EAD,
  self-BLEU and distinct-2.

Criteria, on the main (smaller-KL) run's last snapshot against the SFT model: accuracy within 5
points; ECE at least 2x SFT's; temperature scaling brings ECE back within 1.5x of SFT's (both
on the held-out half); per-input diversity (EAD, 1 - self-BLEU, entropy) at least 15% below
SFT's, and falling monotonically over the snapshots (no rise between consecutive snapshots
whose interval lies above 0). Distinct-2 and across-input diversity are reported, not judged.
"""

from __future__ import annotations

import time

import numpy as np

from posttrain.eval.diversity import mean_ead, self_bleu
from posttrain.eval.metrics import (
    answerable,
    confidences,
    distinct_n,
    expected_calibration_error,
    temperature_scaling,
)
from posttrain.lab import rl_runs
from posttrain.lab.base import Criterion, Lab, at_least, at_most, save_figure, write_outputs
from posttrain.lab.stats import bootstrap

NAME = "calibration_diversity"
TITLE = "Calibration and diversity after RL (GPT-4 report fig. 8; Kirk et al. 2310.06452)"
ACC_WITHIN = 0.05
ECE_UP, ECE_BACK, DIV_FALL = 2.0, 1.5, 0.15
# per-input diversity measures, per prompt; self-BLEU enters as 1 - self-BLEU (higher: more diverse)
DIVERSITY = ("ead", "self_bleu", "distinct_2", "entropy")
JUDGED = ("ead", "self_bleu", "entropy")


def run(lab: Lab) -> dict:
    started = time.perf_counter()
    raw = lab.config(NAME)
    labels = list(raw["lab"]["rl_runs"]["kl_coefs"])
    greedy, sampled, across, steps = {}, {}, {}, None
    for seed in lab.seeds:
        seed_dir, models = rl_runs.prepare(lab, seed, raw)
        evals = rl_runs.evaluate_runs(lab, seed_dir, raw, models)
        seed_steps = [s for s, _ in evals[labels[0]]]
        if steps is not None and seed_steps != steps:
            raise ValueError(f"{NAME}: seed {seed} has snapshots at {seed_steps}, not {steps}")
        steps = seed_steps
        grid = [[ev for _, ev in evals[lb]] for lb in labels]  # (L, J) evaluations
        greedy[seed] = greedy_table(grid)
        sampled[seed] = diversity_table(grid)
        across[seed] = [[across_diversity(ev) for ev in row] for row in grid]
    figures = summarise(greedy, sampled, across, labels, steps)
    figures["kl_coefs"] = dict(raw["lab"]["rl_runs"]["kl_coefs"])
    criteria = _criteria(figures, labels)
    plots = _plot(lab, figures, greedy, labels)
    return write_outputs(lab, NAME, TITLE, figures, criteria, plots, started=started,
                         body=BODY)  # fmt: skip


BODY = (
    "Distinct-2 and the across-input measures are reported beside the judged ones, without a "
    "verdict. Across-input diversity has no interval: a bootstrap resample repeats prompts, "
    "and a response repeated is as alike to itself as can be, so resampling would bias it."
)


def greedy_table(grid: list[list[dict]]) -> np.ndarray:
    """(P, L, J) object array of the greedy records of the answerable prompts: row p holds
    every model's record of one prompt (the same prompts, in the same order, for every model)."""
    ids = [r["prompt_id"] for r in grid[0][0]["greedy"]]
    for row in grid:
        for ev in row:
            if [r["prompt_id"] for r in ev["greedy"]] != ids:
                raise ValueError(f"{NAME}: the models answered different greedy prompts")
    keep = [i for i, r in enumerate(grid[0][0]["greedy"]) if answerable(r)]
    L, J = len(grid), len(grid[0])
    out = np.empty((len(keep), L, J), dtype=object)
    for li, row in enumerate(grid):
        for j, ev in enumerate(row):
            for p, i in enumerate(keep):
                out[p, li, j] = ev["greedy"][i]
    return out


def per_input(samples: list[dict], vocab_size: int) -> list[float]:
    """One prompt's k samples: EAD, 1 - self-BLEU (token ids), distinct-2 (words), and the
    mean of the samples' mean per-token entropies."""
    ids = [s["ids"] for s in samples]
    ents = [s["entropy"] for s in samples if s["entropy"] is not None]
    ead = mean_ead(ids, vocab_size)
    return [float("nan") if ead is None else ead, 1 - self_bleu(ids),
            distinct_n([s["text"] for s in samples], 2),
            float(np.mean(ents)) if ents else float("nan")]  # fmt: skip


def diversity_table(grid: list[list[dict]]) -> np.ndarray:
    """(P, L, J, 4) per-input diversity of the sampled prompts (DIVERSITY order)."""
    arr = np.array([[[per_input(rec["samples"], ev["vocab_size"]) for rec in ev["sampled"]]
                     for ev in row] for row in grid])  # fmt: skip
    return arr.transpose(2, 0, 1, 3)  # (L, J, P, 4) -> (P, L, J, 4)


def across_diversity(ev: dict) -> dict:
    """Across inputs: the first sample of every sampled prompt as one group."""
    firsts = [rec["samples"][0] for rec in ev["sampled"]]
    k = len(ev["sampled"][0]["samples"])
    ids = [s["ids"] for s in firsts]
    ead = mean_ead(ids, ev["vocab_size"])
    return {"ead": ead, "self_bleu": 1 - self_bleu(ids, n_refs=k - 1) if len(ids) > 1 else None,
            "distinct_2": distinct_n([s["text"] for s in firsts], 2)}  # fmt: skip


def ece(recs) -> float:
    conf, correct = confidences(list(recs))
    return expected_calibration_error(conf, correct) if conf else float("nan")


def accuracy(recs) -> float:
    _, correct = confidences(list(recs))
    return float(np.mean(correct)) if correct else float("nan")


def scaled(recs, key: str) -> float:
    """temperature_scaling's figure `key` (temperature, ece_test, ece_scaled); nan if none."""
    return float(temperature_scaling(list(recs)).get(f"calibration/{key}", float("nan")))


def ratio(a: float, b: float) -> float:
    """a / b; inf when only b is 0 (a calibrated SFT model and an uncalibrated one), nan when
    both are."""
    if b > 0:
        return a / b
    return float("inf") if a > 0 else float("nan")


def _seeds_mean(gs, f) -> float:
    """The mean over seeds of f(one seed's group)."""
    return float(np.mean([f(g) for g in gs]))


def calibration_stats(labels: list[str], J: int) -> dict:
    """name -> statistic of the per-seed (P, L, J) greedy record arrays (main run = labels[0],
    last snapshot = J - 1, SFT = point 0)."""
    main, last = 0, J - 1

    def at(f, li, j):
        return lambda gs: _seeds_mean(gs, lambda g: f(g[:, li, j]))

    return {
        "accuracy_sft": at(accuracy, main, 0),
        "accuracy_rl": at(accuracy, main, last),
        "accuracy_gap": lambda gs: at(accuracy, main, last)(gs) - at(accuracy, main, 0)(gs),
        "ece_sft": at(ece, main, 0),
        "ece_rl": at(ece, main, last),
        "ece_ratio": lambda gs: ratio(at(ece, main, last)(gs), at(ece, main, 0)(gs)),
        "temperature_rl": at(lambda r: scaled(r, "temperature"), main, last),
        "ece_test_sft": at(lambda r: scaled(r, "ece_test"), main, 0),
        "ece_test_rl": at(lambda r: scaled(r, "ece_test"), main, last),
        "ece_scaled_rl": at(lambda r: scaled(r, "ece_scaled"), main, last),
        "ece_scaled_ratio": lambda gs: ratio(
            at(lambda r: scaled(r, "ece_scaled"), main, last)(gs),
            at(lambda r: scaled(r, "ece_test"), main, 0)(gs),
        ),  # fmt: skip
    }


def _div_curve(gs, li: int, m: int) -> np.ndarray:
    """(J,) pooled per-input measure m of run li: the mean over seeds of the prompt means."""
    return np.mean([np.nanmean(g[:, li, :, m], 0) for g in gs], 0)


def fall(curve: np.ndarray) -> float:
    """The share by which the last point is below the first."""
    return 1 - float(curve[-1]) / float(curve[0]) if curve[0] > 0 else float("nan")


def diversity_stats(J: int) -> dict:
    """name -> statistic of the per-seed (P, L, J, 4) arrays, for the main run (labels[0])."""
    out = {}
    for m, name in enumerate(DIVERSITY):
        out[f"fall[{name}]"] = lambda gs, m=m: fall(_div_curve(gs, 0, m))
        for j in range(J - 1):  # each consecutive change (a rise is diversity going up)
            out[f"rise[{name}][{j}]"] = lambda gs, m=m, j=j: float(np.diff(_div_curve(gs, 0, m))[j])
    return out


def summarise(greedy: dict, sampled: dict, across: dict, labels: list[str], steps: list[int]) -> dict:  # fmt: skip
    """Every figure: curves by step per run (pooled, with intervals), the statistics the
    criteria read (pooled and per seed, with intervals), across-input diversity (values)."""
    seeds, J = list(greedy), len(steps)
    gg, sg = [greedy[s] for s in seeds], [sampled[s] for s in seeds]
    cal, div = calibration_stats(labels, J), diversity_stats(J)
    fig: dict = {"steps": steps, "runs": {}, "per_seed": {}}
    for li, label in enumerate(labels):
        run = {
            "ece": [bootstrap(lambda g, li=li, j=j: _seeds_mean(g, lambda x: ece(x[:, li, j])), gg)
                    for j in range(J)],
            "accuracy": [bootstrap(lambda g, li=li, j=j: _seeds_mean(
                g, lambda x: accuracy(x[:, li, j])), gg) for j in range(J)],
        }  # fmt: skip
        for m, name in enumerate(DIVERSITY):
            run[name] = [bootstrap(lambda g, li=li, m=m, j=j: _div_curve(g, li, m)[j], sg)
                         for j in range(J)]  # fmt: skip
        run["across"] = {name: [float(np.mean([across[s][li][j][name] for s in seeds]))
                                for j in range(J)] for name in ("ead", "self_bleu", "distinct_2")}  # fmt: skip
        fig["runs"][label] = run
    fig["pooled"] = {k: bootstrap(f, gg) for k, f in cal.items()}
    fig["pooled"] |= {k: bootstrap(f, sg) for k, f in div.items()}
    for s in seeds:
        stats = {k: bootstrap(f, [greedy[s]]) for k, f in cal.items()}
        stats |= {k: bootstrap(f, [sampled[s]]) for k, f in div.items()}
        fig["per_seed"][s] = {"stats": stats, "across": {label: across[s][li]
                                                          for li, label in enumerate(labels)}}  # fmt: skip
    return fig


def _criteria(fig: dict, labels: list[str]) -> list[Criterion]:
    P, steps = fig["pooled"], fig["steps"]
    main = labels[0]
    gap = P["accuracy_gap"]
    out = [Criterion(f"accuracy_within_5[{main} vs sft]",
                     "RL's accuracy is within 5 points of SFT's (answerable prompts, greedy)",
                     f"|value| <= {ACC_WITHIN:g}", gap,
                     bool(np.isfinite(gap.value) and abs(gap.value) <= ACC_WITHIN)),
           at_least(f"ece_rises[{main} vs sft]", "after RL, ECE is at least 2x SFT's (ratio)",
                    P["ece_ratio"], ECE_UP),
           at_most(f"scaling_restores[{main} vs sft]",
                   "temperature scaling (fit on one half) brings ECE back within 1.5x of SFT's "
                   "(ratio on the other half)", P["ece_scaled_ratio"], ECE_BACK)]  # fmt: skip
    for name in JUDGED:
        what = "1 - self-BLEU" if name == "self_bleu" else name
        out.append(at_least(f"diversity_falls[{name}]",
                            f"per-input {what} falls >= 15% from SFT to the last snapshot",
                            P[f"fall[{name}]"], DIV_FALL))  # fmt: skip
        rises = [(P[f"rise[{name}][{j}]"], j) for j in range(len(steps) - 1)]
        worst, j = max(rises, key=lambda x: x[0].lo if np.isfinite(x[0].lo) else np.inf)
        ok = all(np.isfinite(r.lo) and r.lo <= 0 for r, _ in rises)
        out.append(Criterion(f"diversity_monotone[{name}]",
                             f"per-input {what} falls monotonically in RL steps",
                             "no consecutive rise with interval low end > 0 (shown: the "
                             "largest low end)", worst, ok,
                             note=f"steps {steps[j]} -> {steps[j + 1]}"))  # fmt: skip
    return out


def _reliability(ax, recs, label, temperature=None):
    """Reliability points (mean confidence, accuracy) of records pooled over seeds."""
    from posttrain.eval.metrics import in_fit_split, reliability, scaled_confidence

    if temperature is not None:  # the held-out half, after scaling
        recs = [r for r in recs if not in_fit_split(r["prompt_id"])]
    conf, correct = confidences(recs)
    if temperature is not None:
        conf = [scaled_confidence(r["logprob"], temperature) for r in recs
                if answerable(r) and r.get("logprob") is not None]  # fmt: skip
    pts = reliability(conf, correct)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)


def _plot(lab: Lab, fig: dict, greedy: dict, labels: list[str]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = lab.out / NAME / "plots"
    steps = np.asarray(fig["steps"])
    main = labels[0]

    f, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    sft = [r for g in greedy.values() for r in g[:, 0, 0]]
    rl = [r for g in greedy.values() for r in g[:, 0, -1]]
    ax1.plot([0, 1], [0, 1], ":", color="grey")
    _reliability(ax1, sft, "SFT")
    _reliability(ax1, rl, f"RL ({main}, step {steps[-1]})")
    t = fig["pooled"]["temperature_rl"].value
    if np.isfinite(t):
        _reliability(ax1, rl, f"RL, temperature-scaled (T={t:.2g}; held-out half)", t)
    ax1.set(xlabel="confidence (probability of the whole answer)", ylabel="accuracy",
            title="reliability (seeds pooled)")  # fmt: skip
    ax1.legend(fontsize=8)
    for label in labels:
        r = fig["runs"][label]
        (line,) = ax2.plot(steps, [e.value for e in r["ece"]], "o-", label=f"ECE {label}")
        ax2.fill_between(steps, [e.lo for e in r["ece"]], [e.hi for e in r["ece"]],
                         color=line.get_color(), alpha=0.15)  # fmt: skip
        ax2.plot(steps, [e.value for e in r["accuracy"]], "s--", color=line.get_color(),
                 label=f"accuracy {label}")  # fmt: skip
    ax2.set(xlabel="PPO step", ylabel="ECE / accuracy", title="calibration by step")
    ax2.legend(fontsize=8)
    save_figure(f, folder / "calibration.png")

    f, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    names = {"ead": "EAD", "self_bleu": "1 - self-BLEU", "distinct_2": "distinct-2",
             "entropy": "policy entropy (nats/token)"}  # fmt: skip
    for ax, name in zip(axes, DIVERSITY, strict=True):
        for label in labels:
            r = fig["runs"][label]
            (line,) = ax.plot(steps, [e.value for e in r[name]], "o-", label=f"per input {label}")
            ax.fill_between(steps, [e.lo for e in r[name]], [e.hi for e in r[name]],
                            color=line.get_color(), alpha=0.15)  # fmt: skip
            if name in r["across"]:
                ax.plot(steps, r["across"][name], "x:", color=line.get_color(),
                        label=f"across inputs {label}")  # fmt: skip
        ax.set(xlabel="PPO step", title=names[name])
        ax.legend(fontsize=7)
    save_figure(f, folder / "diversity.png")
    return {
        "calibration.png": "Left: reliability diagram (answer confidence against accuracy, "
        "seeds pooled) of the SFT model, the main run's last snapshot and that snapshot after "
        "temperature scaling (on the half it was not fit on); RLHF's signature is points far "
        "below the diagonal at high confidence, pulled back by scaling. Right: ECE (bands: 95%) "
        "and accuracy (dashed) by PPO step: ECE should rise while accuracy stays put.",
        "diversity.png": "Diversity by PPO step: per input (k samples of one prompt; bands: 95% "
        "over prompts) and across inputs (one sample of each prompt; dotted, no interval). "
        "Under RL every per-input measure should fall, step after step, at least 15% below SFT "
        "(step 0) by the end.",
    }  # fmt: skip
