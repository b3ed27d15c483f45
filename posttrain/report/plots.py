"""The report's plots, each with a one-line caption saying what to look for.

No empty axes: a panel without data is left out (a figure without any is not drawn). Model
labels never sit on the data: one colour and marker per model, named in a legend outside the
axes. The trade-off plots draw each model's 95% interval (evaluate's `ci95`) as error bars.
Every plotter reads the run directory `src` and writes to `out` (<run>/plots normally).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from posttrain.io import atomic_path, read_jsonl


class Plot(NamedTuple):
    path: Path
    caption: str


MARKERS = "osD^vP*Xhp<>"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    _pyplot().close(fig)
    return out


def style(labels: list[str]) -> dict[str, dict]:
    """One colour and marker per model, the same in every plot of the report."""
    plt = _pyplot()
    colors = plt.get_cmap("tab10").colors
    return {lb: {"color": colors[i % 10], "marker": MARKERS[i % len(MARKERS)]}
            for i, lb in enumerate(labels)}  # fmt: skip


def _series(src: Path, stage: str, key: str) -> tuple[list, list]:
    path = src / stage / "metrics.jsonl"
    rows = [r for r in read_jsonl(path) if key in r] if path.is_file() else []
    return [r["step"] for r in rows], [r[key] for r in rows]


def plot_curves(src: Path, out: Path, stage: str, m: dict) -> Plot | None:
    """Training loss (and lr) against step, from the stage's metrics.jsonl."""
    path = src / stage / "metrics.jsonl"
    rows = [r for r in read_jsonl(path) if "train/loss" in r] if path.is_file() else []
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.3), dpi=100)
    ax.plot([r["step"] for r in rows], [r["train/loss"] for r in rows], lw=1.2, label="train/loss")
    evals = [r for r in rows if "eval/loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "o-", ms=3,
                label="eval/loss (held out)")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("loss (log scale)")
    ax.set_yscale("log")
    ax.set_title(f"{stage}: loss")
    ax.grid(alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    if "train/lr" in rows[0]:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in rows], [r["train/lr"] for r in rows], color="tab:orange",
                 lw=0.8, alpha=0.6, label="learning rate (right)")  # fmt: skip
        ax2.set_ylabel("learning rate", color="tab:orange")
        h2, n2 = ax2.get_legend_handles_labels()
        handles, names = handles + h2, names + n2
    ax.legend(handles, names, fontsize=8, loc="upper left", bbox_to_anchor=(1.12, 1))
    look = ("a held-out loss that rises while the training loss falls is over-fitting"
            if evals else "a steady fall that flattens; spikes or a rise mean the step size is too big")  # fmt: skip
    return Plot(_save(fig, out / f"{stage}_loss.png"), f"{stage}: training loss per step; {look}.")


def plot_rank(src: Path, out: Path, stage: str, m: dict) -> Plot | None:
    """Chosen-minus-rejected length histogram, and each annotator's agreement with gold."""
    path = src / stage / "length_diffs.jsonl"
    if not path.is_file():
        return None
    diffs = [r["diff"] for r in read_jsonl(path)]
    who = {k.rsplit("/", 1)[1]: v for k, v in m.items() if k.startswith("rank/agreement_gold/")}
    panels = bool(diffs) + bool(who)
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.3), dpi=100, squeeze=False)
    axes = list(axes[0])
    if diffs:
        ax = axes.pop(0)
        ax.hist(diffs, bins=min(40, max(5, len(set(diffs)))), color="tab:blue", alpha=0.8)
        ax.axvline(0, color="k", lw=0.8)
        share = m.get("rank/longer_wins")
        ax.set_title("chosen - rejected length" + (f" (longer wins {share:.2f})" if share is not None
                                                     else ""), fontsize=10)  # fmt: skip
        ax.set_xlabel("tokens")
        ax.set_ylabel("pairs")
    if who:
        ax = axes.pop(0)
        ax.bar(list(who), list(who.values()), color="tab:green", alpha=0.8)
        ax.axhline(0.5, color="k", lw=0.8, ls="--")
        ax.set_ylim(0, 1)
        ax.set_ylabel("agreement with gold")
        ax.set_title("per annotator (dashed: chance)", fontsize=10)
    fig.tight_layout()
    return Plot(_save(fig, out / f"{stage}_pairs.png"),
                f"{stage}: a histogram leaning right of 0 means annotators prefer longer "
                "responses (the lever of length hacking); bars far above 0.5 mean their labels "
                "follow gold.")  # fmt: skip


def plot_lines(src: Path, out: Path, stage: str, keys: dict[str, str], title: str, name: str,
               caption: str) -> Plot | None:  # fmt: skip
    """Several metrics of one stage against step, on one axis (keys: metric -> legend label)."""
    series = {k: _series(src, stage, k) for k in keys}
    if not any(xs for xs, _ in series.values()):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.3), dpi=100)
    for k, (xs, ys) in series.items():
        if xs:
            ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", ms=3, lw=1.2, label=keys[k])
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("step")
    ax.set_title(f"{stage}: {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return Plot(_save(fig, out / f"{stage}_{name}.png"), f"{stage}: {caption}")


def plot_reward(src: Path, out: Path, stage: str, m: dict) -> Plot | None:
    keys = {"train/reward/accuracy": "train accuracy", "reward/accuracy": "accuracy",
            "eval/accuracy": "held-out accuracy", "eval/gold_agreement": "held-out gold agreement"}  # fmt: skip
    return plot_lines(src, out, stage, keys, "reward-model accuracy", "accuracy",
                      "how often the reward model ranks the chosen response first; held-out "
                      "agreement with gold is what RL will get out of it.")  # fmt: skip


def plot_dpo(src: Path, out: Path, stage: str, m: dict) -> Plot | None:
    keys = {"rewards/chosen": "chosen", "rewards/rejected": "rejected", "rewards/margin": "margin",
            "eval/rewards/margin": "held-out margin"}  # fmt: skip
    return plot_lines(src, out, stage, keys, "implicit rewards", "rewards",
                      "implicit rewards (beta x log-ratio to the reference); a training margin "
                      "that grows while the held-out margin stays flat is memorising pairs.")  # fmt: skip


def plot_rl(src: Path, out: Path, stage: str, m: dict) -> Plot | None:
    """Reward, gold and KL to the reference over steps: one figure per RL method."""
    keys = {"reward/mean": "reward (rollouts)", "gold/mean": "gold (rollouts)",
            "eval/reward": "reward (held-out)", "eval/gold": "gold (held-out)"}  # fmt: skip
    series = {k: _series(src, stage, k) for k in [*keys, "kl/ref"]}
    if not series["reward/mean"][0]:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.3), dpi=100)
    for k, label in keys.items():
        xs, ys = series[k]
        if xs:
            ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", ms=3, lw=1.2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("reward / gold")
    ax.grid(alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    xs, ys = series["kl/ref"]
    if xs:
        ax2 = ax.twinx()
        ax2.plot(xs, ys, color="tab:red", lw=1, ls="--", label="KL to reference (right)")
        ax2.set_ylabel("KL (nats per sequence)", color="tab:red")
        h2, n2 = ax2.get_legend_handles_labels()
        handles, names = handles + h2, names + n2
    ax.legend(handles, names, fontsize=8, loc="upper left", bbox_to_anchor=(1.15, 1))
    ax.set_title(f"{stage} ({m['kind']}): reward, gold and KL")
    return Plot(_save(fig, out / f"{stage}_rl.png"),
                f"{stage}: the reward it optimises against gold and the KL it spends; reward "
                "rising while held-out gold falls is over-optimisation.")  # fmt: skip


def plot_calibration(src: Path, out: Path, stage: str, result: dict, styles: dict) -> Plot | None:
    """Reliability diagram: accuracy against confidence in its own answer, one line per model."""
    from posttrain.eval.metrics import confidences, reliability

    curves = {}
    for label, rel in result.get("artifacts", {}).items():
        f = src / rel
        if label not in result.get("evals", {}) or not f.is_file():  # a benchmark's records
            continue
        conf, correct = confidences(read_jsonl(f))
        pts = [p for p in reliability(conf, correct) if p[2] >= 5] if conf else []
        if pts:  # a bin of fewer than 5 answers is noise, not a point
            curves[label] = pts
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":", label="calibrated")
    for label, pts in curves.items():
        ece = result["evals"][label].get("calibration/ece")
        st = styles.get(label, {})
        ax.plot([c for c, _, _ in pts], [a for _, a, _ in pts], "-", ms=4, lw=1.2,
                label=label if ece is None else f"{label} (ECE {ece:.3f})", **st)  # fmt: skip
    ax.set_xlabel("confidence (probability of its own answer)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(f"{stage}: calibration (answerable prompts, bins of 5+)")
    return Plot(_save(fig, out / f"{stage}_calibration.png"),
                f"{stage}: points on the dotted diagonal are calibrated; below it the model is "
                "over-confident (RLHF is known to push confidences up).")  # fmt: skip


def plot_over_optimisation(src: Path, out: Path, stage: str, result: dict,
                           styles: dict) -> Plot | None:  # fmt: skip
    """Best-of-k gold (with its interval) and proxy reward against the KL bound."""
    found = {label: m for label, m in result.get("evals", {}).items() if "overopt/kl@1" in m}
    if not found:
        return None
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.3), dpi=100)
    for label, m in found.items():
        ks = sorted(int(key.split("@")[1]) for key in m if key.startswith("overopt/kl@"))
        kl = [m[f"overopt/kl@{k}"] for k in ks]
        st = styles.get(label, {})
        for axis, what in ((ax, "gold"), (ax2, "reward")):
            ys = [m[f"overopt/{what}@{k}"] for k in ks]
            ci = [m.get("ci95", {}).get(f"overopt/{what}@{k}") for k in ks]
            err = _yerr(ys, ci)
            axis.errorbar(kl, ys, yerr=err, capsize=3, lw=1.2, ms=4, label=label, **st)
        ax.set_xticks(kl, [f"{x:.2f}\nn={k}" for x, k in zip(kl, ks, strict=True)], fontsize=7)
        ax2.set_xticks(kl, [f"{x:.2f}\nn={k}" for x, k in zip(kl, ks, strict=True)], fontsize=7)
    ax.set_ylabel("gold (mean score)")
    ax2.set_ylabel("proxy: learned reward")
    for axis, t in ((ax, "gold of best-of-n"), (ax2, "proxy reward of best-of-n")):
        axis.set_xlabel("KL bound (nats): log n - (n-1)/n")
        axis.set_title(t, fontsize=10)
        axis.grid(alpha=0.3)
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return Plot(_save(fig, out / f"{stage}_over_optimisation.png"),
                f"{stage}: the proxy rises with n by construction; gold that stops rising or falls "
                "while it does is reward over-optimisation (bars: 95% intervals).")  # fmt: skip


def _yerr(ys: list, ci: list):
    """Asymmetric error bars from [lo, hi] intervals (0 where a point has none)."""
    if not any(ci):
        return None
    lo = [y - c[0] if c else 0 for y, c in zip(ys, ci, strict=True)]
    hi = [c[1] - y if c else 0 for y, c in zip(ys, ci, strict=True)]
    return [[max(0, v) for v in lo], [max(0, v) for v in hi]]


# (x, y, panel title, what to look for) of the trade-off scatter: each model one point per panel
TRADEOFFS = [
    ("safety/false_refusal_rate", "safety/violation_rate", "safety: violations vs false refusals",
     "lower-left is better"),
    ("xstest/false_refusal_rate", "xstest/violation_rate", "XSTest: violations vs false refusals",
     "lower-left is better"),
    ("length/mean_tokens", "gold/mean", "length vs gold", "up is better; right is only longer"),
    ("knowledge/hallucination_rate", "knowledge/known_accuracy", "hallucination vs known facts",
     "upper-left is better"),
]  # fmt: skip


def plot_tradeoffs(src: Path, out: Path, stage: str, result: dict, styles: dict) -> Plot | None:
    """One point per evaluated model, with 95% intervals on both axes, on the trade-offs
    post-training moves along; the models are named in one legend under the panels."""
    evals = result.get("evals", {})
    panels = [p for p in TRADEOFFS if sum(p[0] in m and p[1] in m for m in evals.values()) >= 2]
    if not panels:
        return None
    plt = _pyplot()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.7 * n, 3.6), dpi=100, squeeze=False)
    for ax, (x, y, title, look) in zip(axes[0], panels, strict=True):
        for label, m in evals.items():
            if x in m and y in m:
                ci = m.get("ci95", {})
                ax.errorbar(m[x], m[y], xerr=_yerr([m[x]], [ci.get(x)]),
                            yerr=_yerr([m[y]], [ci.get(y)]), capsize=2, lw=0.8, ms=6,
                            label=label, **styles.get(label, {}))  # fmt: skip
        ax.set_xlabel(x, fontsize=8)
        ax.set_ylabel(y, fontsize=8)
        ax.set_title(f"{title}\n({look})", fontsize=9)
        ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 8), fontsize=8,
               frameon=False)  # fmt: skip
    return Plot(_save(fig, out / f"{stage}_tradeoffs.png"),
                f"{stage}: each model is one point with its 95% intervals; overlapping bars mean "
                "the two models are not told apart on these prompts.")  # fmt: skip


def plot_evaluate(src: Path, out: Path, stage: str, m: dict) -> list[Plot | None]:
    """The evaluate stage's plots, from its result.json (evals and the records it wrote)."""
    result = json.loads((src / stage / "result.json").read_text())
    if m.get("_evals"):  # the report's evals: intervals included (backfilled if need be)
        result["evals"] = {k: v for k, v in m["_evals"].items() if k in result.get("evals", {})}
    styles = style(list(m.get("_evals") or result.get("evals", {})))
    return [plot(src, out, stage, result, styles)
            for plot in (plot_tradeoffs, plot_calibration, plot_over_optimisation)]  # fmt: skip


PLOTTERS = {"rank": plot_rank, "reward": plot_reward, "dpo": plot_dpo, "ppo": plot_rl,
            "grpo": plot_rl, "rloo": plot_rl, "online_dpo": plot_rl, "evaluate": plot_evaluate}  # fmt: skip


def stage_plots(src: Path, out: Path, stage: str, m: dict, evals: dict | None = None) -> list[Plot]:
    """Every plot of one stage: its loss curve if it trained, then its kind's own plots.
    evals: the report's evals (with intervals), for the evaluate stage's plots."""
    found = [plot_curves(src, out, stage, m)]
    if m["kind"] in PLOTTERS:
        made = PLOTTERS[m["kind"]](src, out, stage, m | {"_evals": evals or {}})
        found += made if isinstance(made, list) else [made]
    return [p for p in found if p is not None]
