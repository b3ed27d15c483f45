"""dpo_frontier: DPO against the exact reward-KL frontier (Rafailov et al. 2305.18290, fig. 2).

A setting small enough to enumerate every response (lab.answer_set): the toy world's knowledge
questions ("Where does Brejor live?"), whose responses Y are the attribute's values and the
abstention "I don't know.", as the SFT data writes them.

- pi_ref(y|x): the SFT model's sequence probability of y, renormalised over Y. Every policy is
  measured the same way, exactly (no sampling): its distribution restricted to Y and
  renormalised (`coverage` says how much of its mass was on Y before that).
- r(x, y) (answer_set.reward): the gold checker's score plus ABSTAIN_CREDIT = 0.5 for a bare
  abstention about a known entity (abstaining beats hallucinating): three levels, so the
  optimum also sets the odds of abstaining against guessing wrong.
- The frontier: pi*_beta ∝ pi_ref exp(r / beta) maximises E[r] - beta KL(pi || pi_ref) on every
  prompt; with one beta for all prompts, the mean (E[r], KL) over prompts is the highest mean
  reward any policy over Y reaches at that mean KL (the Lagrangian of a concave problem), so
  `frontier_reward(KL)` is exact (Newton on lambda = 1 / beta, inside a bisection bracket).
- DPO (a `dpo` stage per lab.dpo_betas) on pairs labelled by r deterministically, as the
  paper's sentiment classifier labels its pairs: by default (lab.pairs: sampled) as the paper
  and the toy's sample -> rank chain make them, among 8 draws per prompt from pi_ref, every two
  whose rewards differ; lab.pairs: all takes every ordered pair of Y instead. Deterministic
  labels have no finite DPO optimum (Azar et al. 2310.12036), so beta sets how far a fixed
  budget goes rather than where it stops: each point is compared with the frontier at its own
  KL.
- PPO (a `ppo` stage per lab.ppo_kl_coefs) on the same prompts, with r as a reward function on
  whatever text the policy writes (on Y it is the r above).

The prompts are the knowledge questions of the world's rl split, where DPO's pairs and PPO's
rollouts come from: the frontier is the optimum of the objective both optimise over those
prompts, so the criteria are measured there. The same figures on the eval split's questions
(held out) are reported beside them: there the frontier knows r on questions no pair asked, so
a gap mixes optimisation with generalisation.

Criteria: each DPO point reaches >= 90% of the frontier's reward at its KL; DPO's reward rises
as beta falls, and so does pi*_beta's (a theorem, dE[r]/d(1/beta) = Var(r): a check of the
maths); PPO's points lie on or below the frontier (a theorem for any policy over Y: a point
above it would be a bug in the measurement).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, PositiveFloat, field_validator

from posttrain.lab.answer_set import (
    ABSTAIN_CREDIT,
    REWARD_FUNCTION,
    all_pairs,
    knowledge_tasks,
    response_probs,
    reward_rows,
    sampled_pairs,
)
from posttrain.lab.base import (
    CONFIG_DIR,
    Criterion,
    Lab,
    at_least,
    at_most,
    save_figure,
    write_outputs,
)
from posttrain.lab.frontier import (
    LAM_MAX,
    frontier_lambda,
    frontier_reward_at,
    joint_bootstrap,
    kl_rows,
    tilt,
)
from posttrain.settings import ConfigError, StrictModel

NAME = "dpo_frontier"
TITLE = "DPO on the exact reward-KL frontier (Rafailov et al. 2305.18290)"
NEAR = 0.10  # the "within 10% of the frontier's reward at its own KL"
BODY = (
    "Criteria are measured on the training prompts (the knowledge questions of the world's rl "
    "split, where DPO's pairs and PPO's rollouts come from): their intervals resample those "
    "prompts, not held-out ones. The held-out panel and the `heldout` figures in result.json "
    "are the same measurements on the eval split's questions, where the frontier knows the "
    "reward of questions no pair asked."
)


class Settings(StrictModel):
    """The config's `lab:` section."""

    dpo_betas: list[PositiveFloat] = Field(
        min_length=2, description="DPO's beta, one dpo stage each (>= 2: reward vs beta)."
    )
    ppo_kl_coefs: list[PositiveFloat] = Field(
        min_length=1, description="PPO's KL coefficient, one ppo stage each."
    )
    frontier_betas: list[PositiveFloat] = Field(
        min_length=2, description="Betas at which pi*_beta is reported (with the ones above)."
    )
    pairs: Literal["sampled", "all"] = Field(
        "sampled",
        description="DPO's pairs: among samples_per_prompt draws from pi_ref (as the paper), or "
        "every pair of Y (each response compared equally often).",
    )
    samples_per_prompt: int = Field(8, ge=2, description="pairs sampled: draws per prompt.")

    @field_validator("dpo_betas", "ppo_kl_coefs", "frontier_betas")
    @classmethod
    def _distinct(cls, v: list[float]) -> list[float]:
        if len(set(v)) != len(v):
            raise ValueError(f"values must be distinct, got {v}")
        return v


# ---------------------------------------------------------------- stages


def _settings(raw: dict) -> Settings:
    from posttrain.config import validate

    return validate(Settings, raw.get("lab"), str(CONFIG_DIR / f"{NAME}.yaml"), "lab")


def _policies(raw: dict, s: Settings) -> tuple[dict[str, dict], dict, dict]:
    """label -> {"stage", "kind", "beta"}, and the dpo and ppo template sections (taken out of
    `raw`: the stages are their copies, one per beta or KL coefficient)."""
    templates = {}
    for key in ("dpof_dpo", "dpof_ppo"):
        if not isinstance(raw.get(key), dict):
            raise ConfigError(f"{CONFIG_DIR / f'{NAME}.yaml'}: config key {key!r} is missing "
                              "(the template of the dpo / ppo stages)")  # fmt: skip
        templates[key] = raw.pop(key)
    pol = {f"dpo b={b:g}": {"stage": f"dpof_dpo_b{b:g}", "kind": "dpo", "beta": b}
           for b in sorted(s.dpo_betas, reverse=True)}  # fmt: skip
    pol |= {f"ppo kl={c:g}": {"stage": f"dpof_ppo_kl{c:g}", "kind": "ppo", "beta": c}
            for c in sorted(s.ppo_kl_coefs, reverse=True)}  # fmt: skip
    return pol, templates["dpof_dpo"], templates["dpof_ppo"]


def _stage_sections(policies, dpo: dict, ppo: dict, pairs: Path) -> dict[str, dict]:
    """The sections of this seed's stages: the templates with each one's beta, the dpo ones
    reading `pairs`, the ppo ones on the knowledge rl prompts with reward r."""
    out = {}
    for p in policies.values():
        if p["kind"] == "dpo":
            sec = copy.deepcopy(dpo) | {"kind": "dpo", "beta": p["beta"]}
            sec["data"] = dict(sec.get("data") or {}) | {"path": str(pairs.resolve()),
                                                         "format": "pairs"}  # fmt: skip
        else:
            sec = copy.deepcopy(ppo) | {"kind": "ppo", "split": "rl", "families": ["knowledge"],
                                        "reward": {"kind": "function",
                                                   "function": REWARD_FUNCTION}}  # fmt: skip
            sec["kl"] = dict(sec.get("kl") or {}) | {"coef": p["beta"]}
        out[p["stage"]] = sec
    return out


def _write_pairs(seed_dir: Path, pairs: list[dict]) -> Path:
    """pairs.jsonl under <seed>/dpof_data/, rewritten only when its content changes."""
    import json

    from posttrain.io import atomic_write_text

    path = seed_dir / "dpof_data" / "pairs.jsonl"
    text = "".join(json.dumps(p, ensure_ascii=True) + "\n" for p in pairs)
    if not (path.is_file() and path.read_text() == text):
        atomic_write_text(path, text)
    return path


def run(lab: Lab) -> dict:
    started = time.perf_counter()
    from posttrain.models.load import resolve_device

    raw = lab.config(NAME)
    s = _settings(raw)
    policies, dpo, ppo = _policies(raw, s)
    device = resolve_device(raw.get("device", "auto"))
    rows: dict[str, dict[int, np.ndarray]] = {"train": {}, "heldout": {}}
    known: dict[str, dict[int, np.ndarray]] = {"train": {}, "heldout": {}}
    coverage = {w: {lb: {} for lb in ["sft", *policies]} for w in rows}
    for seed in lab.seeds:
        seed_dir = lab.run_stages(seed, raw, [])  # world, pretrain, sft
        tasks = {"train": knowledge_tasks(seed_dir, "rl"),
                 "heldout": knowledge_tasks(seed_dir, "eval")}  # fmt: skip
        sft = {w: response_probs(seed_dir / "sft" / "model", t, device) for w, t in tasks.items()}
        if s.pairs == "sampled":
            pairs = sampled_pairs(tasks["train"], sft["train"][0], s.samples_per_prompt, seed)
        else:
            pairs = all_pairs(tasks["train"])
        if not pairs:
            raise ValueError(f"{NAME}: seed {seed}: no pair of pi_ref's draws differs in reward "
                             "(raise lab.samples_per_prompt, or set lab.pairs: all)")  # fmt: skip
        sections = _stage_sections(policies, dpo, ppo, _write_pairs(seed_dir, pairs))
        lab.run_stages(seed, raw | sections, list(sections))
        for where, ts in tasks.items():
            measured = {"sft": sft[where]} | {
                lb: response_probs(seed_dir / p["stage"] / "model", ts, device)
                for lb, p in policies.items()
            }
            for lb, (_, mass) in measured.items():
                coverage[where][lb][seed] = float(mass.mean())
            # (P, 2 + J, Y_MAX): pi_ref, r, then each policy's distribution over Y
            chans = [sft[where][0], reward_rows(ts), *(measured[lb][0] for lb in policies)]
            rows[where][seed] = np.stack(chans, 1)
            known[where][seed] = np.array([t["gold"]["known"] for t in ts])
        f = summarise({seed: rows["train"][seed]}, policies, s, n_boot=0)
        lab.logger.info(f"{NAME}: seed {seed}, {len(pairs)} pairs; training prompts: sft reward "
                        f"{f['ref/reward'].value:.3f}; " + "; ".join(
            f"{lb}: reward {f[f'{lb}/reward'].value:.3f} kl {f[f'{lb}/kl'].value:.3f} "
            f"frontier {f[f'{lb}/frontier_reward'].value:.3f}" for lb in policies))  # fmt: skip

    figures = {"policies": policies}
    for where in rows:
        figures[where] = {
            "n_prompts": {sd: len(a) for sd, a in rows[where].items()},
            "coverage": coverage[where],  # policy -> seed -> mean mass on Y before renormalising
            "pooled": summarise(rows[where], policies, s),
            "per_seed": {sd: summarise({sd: a}, policies, s) for sd, a in rows[where].items()},
            "curve": frontier_curve(list(rows[where].values())),
            "behaviour": behaviour(
                list(rows[where].values()), list(known[where].values()), policies
            ),
        }
    criteria = _criteria(figures["train"]["pooled"], policies)
    plots = _plot(lab, figures, policies, s)
    body = (
        f"{BODY}\n\nWhere the probability went on the training prompts (pooled), beside "
        f"pi* at each policy's KL:\n\n{_behaviour_table(figures['train']['behaviour'])}"
    )
    return write_outputs(
        lab,
        NAME,
        TITLE,
        figures,
        criteria,
        plots,
        body=body,
        started=started,
        intervals="95% bootstrap over the rl split's knowledge prompts within each seed",
    )


# ---------------------------------------------------------------- figures and criteria


def _betas(policies: dict, s: Settings) -> list[float]:
    """Every beta at which pi*_beta is reported, largest first."""
    return sorted({*s.frontier_betas, *(p["beta"] for p in policies.values())}, reverse=True)


def _pool(groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Every seed's rows stacked, (N, 2 + J, Y_MAX), and their weights (N,): a seed's P prompts
    weigh 1 / (seeds x P) each, so that seeds count equally."""
    w = [np.full(len(g), 1 / (len(groups) * len(g))) for g in groups]
    return np.concatenate(groups), np.concatenate(w)


def figures_of(groups: list[np.ndarray], policies: dict, betas: list[float]) -> dict[str, float]:
    """Every figure from per-prompt rows: one (P, 2 + J, Y_MAX) array per seed holding pi_ref,
    r and each policy's distribution over Y."""
    x, w = _pool(groups)  # (N, 2 + J, Y), (N,)
    ref, r, pols = x[:, 0], x[:, 1], x[:, 2:].transpose(1, 0, 2)  # (N, Y), (N, Y), (J, N, Y)
    out = {"ref/reward": float(w @ (ref * r).sum(-1))}
    rew = (pols * r).sum(-1) @ w  # (J,)
    kl = kl_rows(pols, ref) @ w  # (J,)
    front = frontier_reward_at(ref, r, kl, w)  # (J,)
    for j, lb in enumerate(policies):
        gain = front[j] - out["ref/reward"]
        out |= {f"{lb}/reward": rew[j], f"{lb}/kl": kl[j], f"{lb}/frontier_reward": front[j],
                f"{lb}/shortfall": 1 - rew[j] / front[j] if front[j] > 0 else np.nan,
                f"{lb}/gain_share": (rew[j] - out["ref/reward"]) / gain if gain > 0 else np.nan,
                f"{lb}/gap": front[j] - rew[j]}  # fmt: skip
    lam = 1 / np.asarray(betas)[:, None, None]  # (B, 1, 1)
    star, log_z = tilt(ref, r, lam)  # (B, N, Y), (B, N)
    star_r = (star * r).sum(-1)  # (B, N)
    star_rew, star_kl = star_r @ w, (lam[:, :, 0] * star_r - log_z) @ w  # (B,)
    for b, beta in enumerate(betas):
        out |= {f"pi*/{beta:g}/reward": star_rew[b], f"pi*/{beta:g}/kl": max(star_kl[b], 0.0)}
    out["pi*/min_step"] = float(np.diff(star_rew).min())  # betas fall left to right
    dpo = [lb for lb, p in policies.items() if p["kind"] == "dpo"]  # largest beta first
    out["dpo/min_step"] = float(np.diff([out[f"{lb}/reward"] for lb in dpo]).min())
    return {k: float(v) for k, v in out.items()}


def summarise(groups: dict[int, np.ndarray], policies: dict, s: Settings, n_boot: int = 1000):
    """figures_of with a 95% interval each (stratified bootstrap over prompts, one resample
    for every figure); n_boot=0: values only."""
    betas = _betas(policies, s)
    return joint_bootstrap(lambda gs: figures_of(gs, policies, betas), list(groups.values()),
                           n_boot=n_boot)  # fmt: skip


def frontier_curve(groups: list[np.ndarray], n: int = 200) -> dict[str, list[float]]:
    """The pooled frontier at n values of lambda = 1/beta from 0 to 1000, for the plot."""
    x, w = _pool(groups)
    lam = np.concatenate([[0.0], np.geomspace(0.01, 1000, n - 1)])[:, None, None]
    star, log_z = tilt(x[:, 0], x[:, 1], lam)
    star_r = (star * x[:, 1]).sum(-1)
    return {"kl": np.maximum((lam[:, :, 0] * star_r - log_z) @ w, 0).tolist(),
            "reward": (star_r @ w).tolist()}  # fmt: skip


def behaviour(groups: list[np.ndarray], known: list[np.ndarray], policies: dict) -> dict:
    """Where each policy put its probability, beside pi* at the same mean KL: on questions
    about known entities the right answer's and the abstention's share, on unknown ones the
    abstention's (the right answer there). known: (P,) bools per seed. Values only."""
    x, w = _pool(groups)
    kn = np.concatenate(known)
    ref, r = x[:, 0], x[:, 1]
    pols = x[:, 2:].transpose(1, 0, 2)  # (J, N, Y)
    lam = frontier_lambda(ref, r, kl_rows(pols, ref) @ w, w)  # (J,)
    star = tilt(ref, r, np.minimum(lam, LAM_MAX)[:, None, None])[0]  # (J, N, Y)

    def mean(v: np.ndarray, ws: np.ndarray) -> float:
        return float(v @ ws / ws.sum()) if ws.sum() > 0 else float("nan")

    def shares(p: np.ndarray) -> dict[str, float]:  # (N, Y)
        right, credit = (p * (r == 1)).sum(-1), (p * (r == ABSTAIN_CREDIT)).sum(-1)  # (N,)
        return {"right|known": mean(right, w * kn), "abstain|known": mean(credit, w * kn),
                "abstain|unknown": mean(right, w * ~kn)}  # fmt: skip

    out = {"sft": shares(ref)}
    for j, lb in enumerate(policies):
        out |= {lb: shares(pols[j]), f"{lb}: pi* at its KL": shares(star[j])}
    return out


def _behaviour_table(b: dict) -> str:
    rows = ["| policy | P(right answer), known entity | P(abstain), known | P(abstain), "
            "unknown entity (right) |", "|---|---|---|---|"]  # fmt: skip
    for lb, v in b.items():
        rows.append(f"| {lb} | {v['right|known']:.3f} | {v['abstain|known']:.3f} | "
                    f"{v['abstain|unknown']:.3f} |")  # fmt: skip
    return "\n".join(rows)


def _criteria(fig: dict, policies: dict) -> list[Criterion]:
    out = []
    for lb, p in policies.items():
        if p["kind"] == "dpo":
            claim = (
                "DPO reaches >= 90% of the frontier's reward at its own KL (1 - reward / frontier)"
            )
            out.append(at_most(f"dpo_near_frontier[{lb}]", claim, fig[f"{lb}/shortfall"], NEAR))
    out.append(at_least("dpo_reward_monotone", "DPO's reward grows as beta falls (smallest step)",
                        fig["dpo/min_step"], 0.0))  # fmt: skip
    out.append(at_least("frontier_reward_monotone",
                        "pi*_beta's reward grows as beta falls (smallest step; a theorem)",
                        fig["pi*/min_step"], 0.0))  # fmt: skip
    for lb, p in policies.items():
        if p["kind"] == "ppo":
            out.append(at_least(f"ppo_on_or_below_frontier[{lb}]",
                                "PPO lies on or below the frontier (frontier reward - reward "
                                "at its KL; a theorem)", fig[f"{lb}/gap"], -1e-9))  # fmt: skip
    return out


def _bar(e) -> np.ndarray:
    """(2, 1) error-bar lengths of an Estimate (0 where it has no interval)."""
    return np.nan_to_num(np.array([[e.value - e.lo], [e.hi - e.value]])).clip(min=0)


def _plot(lab: Lab, figures: dict, policies: dict, s: Settings) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = lab.out / NAME / "plots"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, where, title in ((axes[0], "train", "training prompts (criteria)"),
                             (axes[1], "heldout", "held-out prompts")):  # fmt: skip
        f, curve = figures[where]["pooled"], figures[where]["curve"]
        ax.plot(curve["kl"], curve["reward"], "k-", lw=1.2, label="frontier pi*_beta")
        ax.plot([0], [f["ref/reward"].value], "ks", label="SFT (pi_ref)")
        for lb, p in policies.items():
            rew, kl = f[f"{lb}/reward"], f[f"{lb}/kl"]
            ax.errorbar([kl.value], [rew.value], xerr=_bar(kl), yerr=_bar(rew), capsize=2,
                        fmt="o" if p["kind"] == "dpo" else "^", label=lb)  # fmt: skip
        right = 1.5 * max([f[f"{lb}/kl"].value for lb in policies] + [0.5])
        ax.plot([curve["kl"][-1], right], [curve["reward"][-1]] * 2, "k-", lw=1.2)  # its end
        ax.set(xlabel="KL(pi || pi_ref) over Y (nats, mean over prompts)", ylabel="E[r] (mean "
               "over prompts)", xlim=(-0.02 * right, right), title=title)  # fmt: skip
        ax.legend(fontsize=7)
    save_figure(fig, folder / "frontier.png")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    f, betas = figures["train"]["pooled"], _betas(policies, s)
    ax.plot(betas, [f[f"pi*/{b:g}/reward"].value for b in betas], "k.-", label="pi*_beta")
    dpo = [(p["beta"], f[f"{lb}/reward"]) for lb, p in policies.items() if p["kind"] == "dpo"]
    ax.errorbar([b for b, _ in dpo], [e.value for _, e in dpo],
                yerr=np.concatenate([_bar(e) for _, e in dpo], 1), fmt="o-", capsize=2,
                label="DPO")  # fmt: skip
    ax.set(xscale="log", xlabel="beta", ylabel="E[r] on the training prompts",
           title="reward as beta falls")  # fmt: skip
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    save_figure(fig, folder / "reward_vs_beta.png")
    return {
        "frontier.png": "Mean reward against mean KL to the SFT model, both over the enumerated "
        "responses Y (each policy's distribution restricted to Y and renormalised). The black "
        "curve is the exact frontier pi*_beta ∝ pi_ref exp(r/beta): no policy over Y lies above "
        "it. DPO (circles) should lie on it; PPO (triangles) on or below. Bars: 95% intervals.",
        "reward_vs_beta.png": "Reward on the training prompts against beta (falling to the "
        "right): the exact optimum pi*_beta and DPO trained with that beta. DPO's labels are "
        "deterministic, so its beta sets how far the budget goes, not the point pi*_beta it "
        "would reach under Bradley-Terry labels.",
    }  # fmt: skip
