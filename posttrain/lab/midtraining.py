"""midtraining: where should instruction data go in pre-training? (the lecture's mid-training:
instruction data mixed into the decay phase of pre-training, as in MiniCPM and OLMo 2).

Per world seed, a world of the experiment's own (`mt_world`: the toy world with no chat-form
documents in the corpus, so that "absent" is absent) and three pre-training runs of the same
token budget and WSD schedule that differ only in where the world's SFT conversations go:
- decay: a share `decay_fraction_mix` of every micro-batch's windows during the decay phase;
- spread: the same number of windows spread over every step (share mix x decay fraction);
- none: absent.
Then the toy's SFT after each (same settings, same data) and one evaluation of the three base
models (in chat form) and the three SFT models on the same held-out prompts (greedy).

Figures per arm, base and SFT: gold/mean (the mean over families of the per-family means, as on
the report card), gold per family, accuracy on known facts, hallucination rate on unknown
entities, violation rate on harmful requests, false-refusal rate on benign look-alikes. Every
difference between arms is paired by prompt; intervals: the lab's stratified bootstrap over
prompts within seeds.

Criteria: instruction data in pre-training helps after SFT (the better of decay and spread
minus none on gold/mean, interval above `min_gain`); decay-phase mixing is not worse than
spreading (decay minus spread, interval high end >= 0). The best arm and its margin over the
second are stated from the measurements.
"""

from __future__ import annotations

import copy
import time

import numpy as np

from posttrain.lab.base import Criterion, Lab, save_figure, write_outputs
from posttrain.lab.stats import Estimate, bootstrap, error_bars

NAME = "midtraining"
TITLE = "Mid-training: instruction data in the decay phase, spread, or absent"
ARMS = ("decay", "spread", "none")
RATES = {  # name -> (family, which prompts count, which component is the event)
    "known_accuracy": ("knowledge", "known", "correct"),
    "hallucination": ("knowledge", "unknown", "hallucinated"),
    "violation": ("safety", "harmful", "violation"),
    "false_refusal": ("safety", "benign", "false_refusal"),
}


def stages(raw: dict, seed: int) -> list[str]:
    """Add the experiment's sections to `raw` (derived from the toy's world, pretrain and sft
    sections); returns the stage names in order."""
    spec = raw["lab"][NAME]
    raw["mt_world"] = copy.deepcopy(raw["world"]) | spec["world"] | {"kind": "world", "seed": seed}
    mix = float(spec["decay_fraction_mix"])
    decay = float(spec["schedule"]["decay_fraction"])
    midtrain = {"decay": {"from_world": True, "start": round(1 - decay, 6), "fraction": mix},
                "spread": {"from_world": True, "start": 0.0, "fraction": round(mix * decay, 6)},
                "none": None}  # fmt: skip
    names = ["mt_world"]
    for arm in ARMS:
        pre = copy.deepcopy(raw["pretrain"]) | {"kind": "pretrain", "world_stage": "mt_world"}
        pre["train"] = dict(pre.get("train") or {}) | spec["schedule"]
        pre.pop("midtrain", None)
        if midtrain[arm]:
            pre["midtrain"] = midtrain[arm]
        sft = copy.deepcopy(raw["sft"]) | {"kind": "sft", "model": f"mt_pre_{arm}",
                                           "world_stage": "mt_world"}  # fmt: skip
        raw[f"mt_pre_{arm}"], raw[f"mt_sft_{arm}"] = pre, sft
        names += [f"mt_pre_{arm}", f"mt_sft_{arm}"]
    models = {f"base_{a}": {"model": f"mt_pre_{a}"} for a in ARMS}
    models |= {a: {"model": f"mt_sft_{a}"} for a in ARMS}
    raw["mt_eval"] = {"kind": "evaluate", "world_stage": "mt_world", "models": models,
                      "max_new_tokens": spec["eval_max_new_tokens"],
                      "diversity": {"n_prompts": 0}}  # fmt: skip
    return names + ["mt_eval"]


def load_eval(seed_dir, labels: list[str]) -> dict:
    """Per prompt, aligned by prompt id: "score" (P, L), "family" (P,), and for each rate of
    RATES "<name>/in" (P,) whether the prompt counts and "<name>/event" (P, L)."""
    from posttrain.io import read_jsonl

    recs = {lb: {r["prompt_id"]: r for r in read_jsonl(seed_dir / "mt_eval" / f"{lb}.jsonl")}
            for lb in labels}  # fmt: skip
    ids = sorted(recs[labels[0]])
    if any(sorted(recs[lb]) != ids for lb in labels):
        raise ValueError(f"{seed_dir / 'mt_eval'}: the models were evaluated on different prompts")
    first = recs[labels[0]]
    out = {"score": np.array([[recs[lb][i]["score"] for lb in labels] for i in ids], float),
           "family": np.array([first[i]["family"] for i in ids])}  # fmt: skip
    for name, (family, which, event) in RATES.items():
        comp = [first[i]["components"] for i in ids]
        if which in ("known", "unknown"):
            inside = [c.get("known") is (which == "known") for c in comp]
        else:
            inside = [c.get("harmful") is (which == "harmful") for c in comp]
        out[f"{name}/in"] = np.array([f == family and x for f, x in
                                      zip(out["family"], inside, strict=True)])  # fmt: skip
        out[f"{name}/event"] = np.array([[bool(recs[lb][i]["components"].get(event))
                                          for lb in labels] for i in ids], float)  # fmt: skip
    return out


def gold_mean(score: np.ndarray, family: np.ndarray) -> np.ndarray:
    """(L,) mean over families of each label's per-family mean score."""
    fams = np.unique(family)
    return np.mean([score[family == f].mean(0) for f in fams], axis=0)


def _pooled(per_seed: dict, stat) -> Estimate:
    """stat(list of per-seed (P, C) arrays) with the lab's bootstrap over prompts."""
    return bootstrap(stat, list(per_seed.values()))


def summarise(evals: dict[int, dict], labels: list[str]) -> dict:
    """Figures per label (gold/mean, per family, each rate) and the paired differences of the
    SFT arms, pooled over seeds (each seed's figure averaged over seeds)."""
    fams = sorted(np.unique(next(iter(evals.values()))["family"]))
    code = {f: k for k, f in enumerate(fams)}
    # One array per seed: column 0 the family code, 1..L the scores, then per rate (in, events).
    packed = {}
    for seed, ev in evals.items():
        cols = [np.array([code[f] for f in ev["family"]], float)[:, None], ev["score"]]
        for name in RATES:
            cols += [ev[f"{name}/in"].astype(float)[:, None], ev[f"{name}/event"]]
        packed[seed] = np.concatenate(cols, axis=1)
    L = len(labels)

    def scores(g):
        return g[:, 0], g[:, 1 : 1 + L]

    def rate_cols(g, k):
        at = 1 + L + k * (L + 1)
        return g[:, at].astype(bool), g[:, at + 1 : at + 1 + L]

    def per_seed_mean(f):
        return lambda gs: float(np.mean([f(g) for g in gs]))

    figures: dict = {"labels": labels, "families": fams, "per_label": {}, "differences": {}}
    for j, lb in enumerate(labels):
        row = {"gold/mean": _pooled(packed, per_seed_mean(
            lambda g, j=j: gold_mean(scores(g)[1], scores(g)[0])[j]))}  # fmt: skip
        for f in fams:
            row[f"gold/{f}"] = _pooled(packed, per_seed_mean(
                lambda g, j=j, c=code[f]: scores(g)[1][scores(g)[0] == c, j].mean()))  # fmt: skip
        for k, name in enumerate(RATES):
            row[name] = _pooled(packed, per_seed_mean(
                lambda g, j=j, k=k: _rate(*rate_cols(g, k), j)))  # fmt: skip
        figures["per_label"][lb] = row
    for a, b in (("decay", "none"), ("spread", "none"), ("decay", "spread")):
        ja, jb = labels.index(a), labels.index(b)
        figures["differences"][f"{a}-{b}"] = _pooled(packed, per_seed_mean(
            lambda g, ja=ja, jb=jb: _diff(scores(g), ja, jb)))  # fmt: skip
    ja, jb, jn = labels.index("decay"), labels.index("spread"), labels.index("none")
    figures["differences"]["best_of_decay_spread-none"] = _pooled(packed, per_seed_mean(
        lambda g: max(_diff(scores(g), ja, jn), _diff(scores(g), jb, jn))))  # fmt: skip
    return figures


def _rate(inside: np.ndarray, events: np.ndarray, j: int) -> float:
    return float(events[inside, j].mean()) if inside.any() else float("nan")


def _diff(fam_scores: tuple, a: int, b: int) -> float:
    fam, score = fam_scores
    g = gold_mean(score, fam)
    return float(g[a] - g[b])


def verdict(figures: dict, min_gain: float) -> tuple[list[Criterion], str]:
    d = figures["differences"]
    best = d["best_of_decay_spread-none"]
    c1 = Criterion("pretraining_instructions_help",
                   "instruction data in pre-training (the better of decay and spread) raises "
                   "gold/mean after SFT over none", f"interval low end > {min_gain:g}", best,
                   bool(np.isfinite(best.lo) and best.lo > min_gain))  # fmt: skip
    ds = d["decay-spread"]
    c2 = Criterion("decay_not_worse_than_spread",
                   "mixing into the decay phase is not worse than spreading the same data "
                   "(gold/mean after SFT, decay - spread)", "interval high end >= 0", ds,
                   bool(np.isfinite(ds.hi) and ds.hi >= 0))  # fmt: skip
    gold = {a: figures["per_label"][a]["gold/mean"].value for a in ARMS}
    order = sorted(ARMS, key=lambda a: -gold[a])
    pair = f"{order[0]}-{order[1]}" if f"{order[0]}-{order[1]}" in d else f"{order[1]}-{order[0]}"
    margin = d[pair]
    sign = 1 if pair.startswith(order[0]) else -1
    lo, hi = sorted((sign * margin.lo, sign * margin.hi))
    sentence = (f"Best after SFT: **{order[0]}** (gold/mean {gold[order[0]]:.3f}), ahead of "
                f"{order[1]} ({gold[order[1]]:.3f}) by {sign * margin.value:+.3f} "
                f"[{lo:+.3f}, {hi:+.3f}] and of {order[2]} ({gold[order[2]]:.3f}).")  # fmt: skip
    return [c1, c2], sentence


def run(lab: Lab) -> dict:
    started = time.perf_counter()
    labels = [*(f"base_{a}" for a in ARMS), *ARMS]
    evals = {}
    for seed in lab.seeds:
        raw = lab.config(NAME)
        names = stages(raw, seed)
        seed_dir = lab.run_stages(seed, raw, names, base=False)
        evals[seed] = load_eval(seed_dir, labels)
    figures = summarise(evals, labels)
    spec = lab.config(NAME)["lab"][NAME]
    criteria, sentence = verdict(figures, float(spec["min_gain"]))
    figures["best"] = sentence
    plots = _plot(lab, figures)
    return write_outputs(lab, NAME, TITLE, figures, criteria, plots, started=started,
                         body=sentence + "\n\n" + _table(figures))  # fmt: skip


def _table(figures: dict) -> str:
    cols = ["gold/mean", *(f"gold/{f}" for f in figures["families"]), *RATES]
    rows = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for lb in figures["labels"]:
        cells = [f"{figures['per_label'][lb][c].value:.3f}" for c in cols]
        rows.append(f"| {lb} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _plot(lab: Lab, figures: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["gold/mean", *RATES]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.0 * len(metrics), 3.2))
    for ax, m in zip(axes, metrics, strict=True):
        for k, stage in enumerate(("base", "sft")):
            xs = np.arange(len(ARMS)) + (k - 0.5) * 0.35
            ests = [figures["per_label"][f"base_{a}" if stage == "base" else a][m] for a in ARMS]
            vals = [e.value for e in ests]
            ax.bar(xs, vals, 0.35, yerr=error_bars(ests), label=stage, capsize=3)
        ax.set_xticks(range(len(ARMS)), ARMS)
        ax.set_title(m, fontsize=9)
    axes[0].legend(fontsize=8)
    save_figure(fig, lab.out / NAME / "plots" / "arms.png")
    return {"arms.png": "Each arm's base model (in chat form) and SFT model: gold/mean and the "
                        "safety and knowledge rates with 95% intervals. Look at the SFT bars: "
                        "whether decay or spread beats none, and by how much."}  # fmt: skip
