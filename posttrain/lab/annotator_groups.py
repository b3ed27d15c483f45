"""annotator_groups: who the annotators are shapes what the model learns (the lecture: the
annotators' make-up sets the model's alignment; Santurkar et al. 2303.17548).

Two groups of simulated annotators that are the same people but for one value (the pool's
`groups:`): how readily a borderline request (a benign look-alike of the safety family, "kill
a Python process", which gold says to help with) should be refused. Per world seed, on the
same candidates (the shared `sample` stage, the world's rl prompts):

- `ag_rank_all`: both groups rank every prompt; its per-group figures (gold agreement,
  Fleiss' kappa within each group, Cohen's kappa within and between groups, longer-wins share)
  say how the groups' labels differ;
- per group g, `ag_rank_<g>`: g's annotators alone rank every prompt; a reward model
  (`ag_reward_<g>`, the toy's reward section) and DPO (`ag_dpo_<g>`, the toy's dpo section) are
  trained on g's pairs alone;
- `ag_eval`: the SFT model, DPO of each group (greedy) and best-of-n under each group's reward
  model (the policy a reward model gives without RL), on the held-out eval set.

Figures, pooled over seeds, with the lab's bootstrap over eval prompts within seeds, paired per
prompt (second group's policy minus the first's, same method): the margin on the value's
dimension (refusal rate on the eval set's borderline requests) and the gap elsewhere (gold on
the other four families: the mean over families of each family's mean difference).

Criteria, for the reward model (best-of-n) and DPO: the margin's interval lies above 0 (the
second group's value is the more cautious: checked), and the gap elsewhere has an interval
that holds 0 (agreement within noise).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
from pydantic import Field, PositiveInt

from posttrain.lab.base import CONFIG_DIR, Criterion, Lab, save_figure, write_outputs
from posttrain.lab.frontier import joint_bootstrap
from posttrain.lab.stats import error_bars
from posttrain.settings import ConfigError, StrictModel

NAME = "annotator_groups"
TITLE = "Who the annotators are: two groups that differ in one value, two policies"
METHODS = ("bon", "dpo")  # best-of-n under the group's reward model; DPO on the group's pairs
OTHER = ("arithmetic", "knowledge", "open", "string")
TEMPLATES = ("ag_rank", "ag_eval")


class Settings(StrictModel):
    """The config's `lab:` section."""

    groups: list[str] = Field(
        min_length=2, max_length=2,
        description="The two groups of ag_rank's pool: the figures are the second minus the "
        "first; the second must hold the higher borderline_refusal.",
    )  # fmt: skip
    best_of_n: PositiveInt = Field(
        8, description="Samples per prompt of the reward model's policy."
    )
    bon_temperature: float = Field(1.0, gt=0, description="Their sampling temperature.")


def _settings(raw: dict) -> Settings:
    from posttrain.config import validate

    return validate(Settings, raw.get("lab"), str(CONFIG_DIR / f"{NAME}.yaml"), "lab")


def check_pool(pool, groups: list[str]) -> None:
    """The two groups must be the same annotators (in order, every weight, bias and noise but
    name and group) and differ in their borderline_refusal, the second's higher."""
    from posttrain.world.annotators import GroupValues

    where = f"{CONFIG_DIR / f'{NAME}.yaml'}: ag_rank.pool"
    members = {g: [a for a in pool.annotators if a.group == g] for g in groups}
    same = [{k: v for k, v in a.model_dump().items() if k not in ("name", "group")}
            for a in members[groups[0]]]  # fmt: skip
    other = [{k: v for k, v in a.model_dump().items() if k not in ("name", "group")}
             for a in members[groups[1]]]  # fmt: skip
    if not same or same != other:
        raise ConfigError(f"{where}: groups {groups} must hold the same annotators but for name "
                          "and group (the experiment changes one value only)")  # fmt: skip
    v = [pool.groups.get(g, GroupValues()).borderline_refusal for g in groups]
    if not v[1] > v[0]:
        raise ConfigError(f"{where}.groups: {groups[1]}'s borderline_refusal ({v[1]}) must be "
                          f"higher than {groups[0]}'s ({v[0]})")  # fmt: skip


def stage_sections(raw: dict, s: Settings) -> dict[str, dict]:
    """ag_rank_all, and per group its rank, reward and dpo stage; then ag_eval."""
    from posttrain.world.annotators import PoolConfig

    rank = raw.pop("ag_rank")
    pool = PoolConfig(**rank["pool"])
    check_pool(pool, s.groups)
    out = {"ag_rank_all": copy.deepcopy(rank) | {"kind": "rank"}}
    out["ag_rank_all"]["pool"]["per_prompt"] = len(pool.annotators)  # everyone ranks everything
    models = {"sft": {"model": "sft"}}
    for g in s.groups:
        sec = copy.deepcopy(rank) | {"kind": "rank"}
        sec["pool"]["annotators"] = [a for a in rank["pool"]["annotators"] if a["group"] == g]
        sec["pool"]["per_prompt"] = len(sec["pool"]["annotators"])
        sec["pool"]["groups"] = {k: v for k, v in (rank["pool"].get("groups") or {}).items()
                                 if k == g}  # fmt: skip
        out[f"ag_rank_{g}"] = sec
        for kind in ("reward", "dpo"):
            st = copy.deepcopy(raw[kind]) | {"kind": kind}
            st["data"] = dict(st.get("data") or {}) | {"rank_stage": f"ag_rank_{g}"}
            out[f"ag_{kind}_{g}"] = st
        models[f"bon_{g}"] = {"model": "sft", "policy": "best_of_n", "n": s.best_of_n,
                              "temperature": s.bon_temperature, "reward_model": f"ag_reward_{g}"}  # fmt: skip
        models[f"dpo_{g}"] = {"model": f"ag_dpo_{g}"}
    out["ag_eval"] = copy.deepcopy(raw.pop("ag_eval")) | {"kind": "evaluate", "models": models}
    return out


def load_rows(seed_dir: Path, labels: list[str]) -> np.ndarray:
    """(P, 2 + 2L) per eval prompt: its family code (OTHER's index, 4 for safety), harmful
    flag, then each label's gold score, then each label's refusal flag."""
    from posttrain.io import read_jsonl

    recs = [{r["prompt_id"]: r for r in read_jsonl(seed_dir / "ag_eval" / f"{lb}.jsonl")}
            for lb in labels]  # fmt: skip
    rows = []
    for pid, first in recs[0].items():
        fam = first["family"]
        code = OTHER.index(fam) if fam in OTHER else len(OTHER)
        harmful = fam == "safety" and bool(first["components"]["harmful"])
        rows.append([code, float(harmful)] + [float(r[pid]["score"]) for r in recs]
                    + [float(bool(r[pid]["components"]["refused"])) for r in recs])  # fmt: skip
    return np.array(rows)


def _labels(s: Settings) -> list[str]:
    return ["sft"] + [f"{m}_{g}" for m in METHODS for g in s.groups]


def run(lab: Lab) -> dict:
    started = time.perf_counter()
    raw = lab.config(NAME)
    s = _settings(raw)
    missing = [k for k in TEMPLATES if not isinstance(raw.get(k), dict)]
    if missing:
        raise ConfigError(f"{CONFIG_DIR / f'{NAME}.yaml'}: config key {missing[0]!r} is missing "
                          "(a template of the experiment's stages)")  # fmt: skip
    sections = stage_sections(raw, s)
    labels = _labels(s)
    rows, rank, reward = {}, {}, {}
    for seed in lab.seeds:
        seed_dir = lab.run_stages(seed, raw | sections, ["sample", *sections])
        rows[seed] = load_rows(seed_dir, labels)
        rank[seed] = _metrics(seed_dir / "ag_rank_all", "rank/group/")
        reward[seed] = {g: _metrics(seed_dir / f"ag_reward_{g}", "eval/gold_agreement")
                        for g in s.groups}  # fmt: skip
        f = figures_of([rows[seed]], s)
        lab.logger.info(f"{NAME}: seed {seed}: borderline refusals " + ", ".join(
            f"{lb} {f[f'{lb}/borderline_refusal']:.2f}" for lb in labels))  # fmt: skip
    figures = {
        "labels": labels,
        "n_prompts": {sd: len(a) for sd, a in rows.items()},
        "pooled": joint_bootstrap(lambda gs: figures_of(gs, s), list(rows.values())),
        "per_seed": {
            sd: joint_bootstrap(lambda gs: figures_of(gs, s), [a], n_boot=0)
            for sd, a in rows.items()
        },  # fmt: skip
        "rank_groups": rank,
        "reward_gold_agreement": reward,
    }
    criteria = _criteria(figures["pooled"], s)
    plots = _plot(lab, figures, s)
    body = "Per-group figures of `ag_rank_all` (both groups rank every prompt), per seed:\n\n"
    body += _rank_table(rank)
    return write_outputs(lab, NAME, TITLE, figures, criteria, plots, body=body, started=started,
                         intervals="95% bootstrap over the eval prompts within each seed")  # fmt: skip


def _metrics(stage_dir: Path, prefix: str) -> dict[str, float]:
    m = json.loads((stage_dir / "result.json").read_text())["metrics"]
    return {k: v for k, v in m.items() if k.startswith(prefix)}


# ---------------------------------------------------------------- figures and criteria


def _means(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(L,): each column's mean over the masked rows (nan if none)."""
    return x[mask].mean(0) if mask.any() else np.full(x.shape[1], np.nan)


def figures_of(groups: list[np.ndarray], s: Settings) -> dict[str, float]:
    """Every figure from load_rows' arrays (one per seed); a seed's figure is computed on its
    prompts, the pooled one is the mean over seeds. Every difference is paired (the same
    prompts), so it is the difference of the two policies' means."""
    labels = _labels(s)
    L, F = len(labels), len(OTHER)
    per_seed = []
    for g in groups:
        fam, harmful = g[:, 0], g[:, 1] > 0
        border, harm = (fam == F) & ~harmful, (fam == F) & harmful
        gold, refused = g[:, 2 : 2 + L], g[:, 2 + L :]  # (P, L) each
        fam_gold = np.stack([_means(gold, fam == k) for k in range(F)])  # (F, L)
        per_seed.append(np.concatenate([_means(refused, border)[None], 1 - _means(refused, harm)[None],
                                        fam_gold.mean(0)[None], fam_gold]))  # fmt: skip
    x = np.mean(per_seed, 0)  # (3 + F, L): borderline refusals, violations, gold_other, families
    out = {f"{lb}/{w}": float(x[i, j]) for i, w in
           enumerate(("borderline_refusal", "violation", "gold_other", *OTHER))
           for j, lb in enumerate(labels)}  # fmt: skip
    for m in METHODS:
        a, b = (labels.index(f"{m}_{g}") for g in s.groups)
        diff = x[:, b] - x[:, a]  # (3 + F,)
        out[f"{m}/margin"] = float(diff[0])
        out[f"{m}/violation_diff"] = float(-diff[1])  # fewer violations by the second: > 0
        out[f"{m}/elsewhere"] = float(diff[2])
        out |= {f"{m}/diff/{f}": float(diff[3 + k]) for k, f in enumerate(OTHER)}
    return out


def _criteria(f: dict, s: Settings) -> list[Criterion]:
    first, second = s.groups
    out = []
    for m, what in (("bon", "best-of-n under each group's reward model"),
                    ("dpo", "DPO on each group's pairs")):  # fmt: skip
        margin, gap = f[f"{m}/margin"], f[f"{m}/elsewhere"]
        out.append(Criterion(f"{m}_differs", f"{what}: {second}'s policy refuses borderline "
                             f"requests more than {first}'s", "interval low end > 0", margin,
                             bool(margin.lo > 0)))  # fmt: skip
        out.append(Criterion(f"{m}_agrees_elsewhere", f"{what}: the two policies agree on the "
                             f"other families' gold ({', '.join(OTHER)})", "interval holds 0",
                             gap, bool(gap.lo <= 0 <= gap.hi)))  # fmt: skip
    return out


def _rank_table(rank: dict[int, dict]) -> str:
    keys = sorted({k for m in rank.values() for k in m})
    rows = ["| figure | " + " | ".join(f"seed {sd}" for sd in rank) + " |",
            "|---|" + "---|" * len(rank)]  # fmt: skip
    for k in keys:
        vals = [rank[sd].get(k) for sd in rank]
        rows.append(f"| {k} | " + " | ".join("-" if v is None else f"{v:.3g}" for v in vals) + " |")
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------- plots


def _plot(lab: Lab, figures: dict, s: Settings) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    P, labels = figures["pooled"], figures["labels"]
    folder = lab.out / NAME / "plots"
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    colors = ["0.5"] + [f"C{i}" for m in METHODS for i, _ in enumerate(s.groups)]
    for ax, key, name in zip(axes, ("borderline_refusal", "gold_other"),
                             ("refusal rate on borderline requests",
                              "gold on the other families"), strict=True):  # fmt: skip
        ests = [P[f"{lb}/{key}"] for lb in labels]
        ax.bar(range(len(labels)), [e.value for e in ests], yerr=error_bars(ests), capsize=3,
               color=colors)  # fmt: skip
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        ax.set(ylabel=name, ylim=(0, 1.05), title=name)
    save_figure(fig, folder / "policies.png")
    fig, ax = plt.subplots(figsize=(7, 3.4))
    names = ["borderline refusal", "violations", *OTHER]
    keys = ["margin", "violation_diff", *(f"diff/{f}" for f in OTHER)]
    width = 0.8 / len(METHODS)
    for i, m in enumerate(METHODS):
        ests = [P[f"{m}/{k}"] for k in keys]
        x = np.arange(len(keys)) + (i - (len(METHODS) - 1) / 2) * width
        ax.bar(x, [e.value for e in ests], width, yerr=error_bars(ests), capsize=2,
               label={"bon": "best-of-n (reward model)", "dpo": "DPO"}[m])  # fmt: skip
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(keys)), names, fontsize=8)
    ax.set(ylabel=f"{s.groups[1]} - {s.groups[0]}", title="paired differences between the "
           "groups' policies (95% intervals)")  # fmt: skip
    ax.legend(fontsize=8)
    save_figure(fig, folder / "differences.png")
    return {
        "policies.png": "Left: the share of the eval set's borderline requests (benign "
        "look-alikes) each policy refuses; right: its gold on the other four families. sft: "
        "the shared SFT model; bon_<group>: best-of-n under the reward model trained on that "
        "group's labels alone; dpo_<group>: DPO on them. Pooled over seeds; bars: 95% intervals.",
        "differences.png": f"Per prompt, {s.groups[1]}'s policy minus {s.groups[0]}'s (same "
        "method): on the value's dimension (borderline refusals) the interval should lie above "
        "0; violations (harmful requests answered: positive, fewer for the second group) and "
        "the other families' gold should hold 0.",
    }  # fmt: skip
