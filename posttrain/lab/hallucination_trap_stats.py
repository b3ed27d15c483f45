"""hallucination_trap's figures, criteria, plots and report text, from the measurements that
hallucination_trap.run_seed makes (per seed, per arm, per epoch 0..E: the training examples'
losses and the dev / known / unknown questions' scores)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from posttrain.data.probe import CATEGORIES
from posttrain.lab.base import Criterion, at_least, at_most, save_figure
from posttrain.lab.frontier import joint_bootstrap
from posttrain.lab.stats import error_bars

FIT_RATIO, R2_MIN, HALVED, RELABEL_COST = 2.0, 0.8, 0.5, 0.05  # the thresholds
SENSITIVITY = (0.05, 0.1, 0.2, 0.3)  # other fit thresholds whose ratio the report states


def epochs_to_fit(curve: Sequence[float], threshold: float) -> tuple[float, bool]:
    """(the first epoch at which `curve` (epochs 0..E) is <= threshold, linear between epochs;
    whether it never is: then E, a lower bound)."""
    c = np.asarray(curve, float)
    if c[0] <= threshold:
        return 0.0, False
    for e in range(1, len(c)):
        if c[e] <= threshold:
            return e - 1 + (c[e - 1] - threshold) / (c[e - 1] - c[e]), False
    return float(len(c) - 1), True


def line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares y = a + b x: (b, a, R^2); R^2 nan when y is constant."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    b, a = np.polyfit(x, y, 1)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - float(((y - a - b * x) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return float(b), float(a), r2


def early_stop(dev: np.ndarray) -> int:
    """The epoch (1..E) of the best mean dev score, the earliest of ties. dev: (E + 1, P)."""
    return 1 + int(np.argmax(dev[1:].mean(1)))


def _pooled(groups: list[np.ndarray]) -> np.ndarray:
    """Column means of each seed's (items, columns) array, averaged over seeds: (columns,)."""
    return np.mean([g.mean(0) for g in groups], 0)


def accuracy_stats(x: list[float], relabel_col: int | None):
    """groups: per seed (P_known, 2A [+ 1]): known scores at the end of training for each
    share, at the early stop for each, then (relabel_col) the relabelled arm at the end."""
    A = len(x)

    def stat(groups: list[np.ndarray]) -> dict[str, float]:
        y = _pooled(groups)
        b, _, r2 = line(x, y[:A])
        b_es, _, r2_es = line(x, y[A : 2 * A])
        out = {"slope": b, "r2": r2, "slope_es": b_es, "r2_es": r2_es,
               "slope_ratio": b_es / b if b != 0 else float("nan")}  # fmt: skip
        out |= {f"acc[{u:g}]": y[i] for i, u in enumerate(x)}
        out |= {f"acc_es[{u:g}]": y[A + i] for i, u in enumerate(x)}
        if relabel_col is not None:
            out["acc_relabel"] = y[-1]
            out["relabel_cost"] = y[relabel_col] - y[-1]
        return out

    return stat


def hallucination_stats(x: list[float], relabel_col: int):
    """groups: per seed (P_unknown, A + 1): hallucinated at the end of training per share,
    then the relabelled arm."""

    def stat(groups: list[np.ndarray]) -> dict[str, float]:
        y = _pooled(groups)
        out = {f"hal[{u:g}]": y[i] for i, u in enumerate(x)}
        return out | {"hal_relabel": y[-1], "relabel_change": y[-1] - y[relabel_col]}

    return stat


def fit_stats(threshold: float):
    """groups: per seed (N, 1 + E + 1): is-Unknown, then the example's loss at epochs 0..E.
    Epochs to fit per subset (its mean loss curve), averaged over seeds; their ratio."""

    def stat(groups: list[np.ndarray]) -> dict[str, float]:
        eps = {"known": [], "unknown": []}
        for g in groups:
            unknown = g[:, 0] > 0.5
            if unknown.all() or not unknown.any():
                return {"epochs_known": np.nan, "epochs_unknown": np.nan, "ratio": np.nan}
            eps["unknown"].append(epochs_to_fit(g[unknown, 1:].mean(0), threshold)[0])
            eps["known"].append(epochs_to_fit(g[~unknown, 1:].mean(0), threshold)[0])
        k, u = np.mean(eps["known"]), np.mean(eps["unknown"])
        return {"epochs_known": k, "epochs_unknown": u, "ratio": u / k if k > 0 else np.inf}

    return stat


def seed_arrays(m: dict, arms: dict, s) -> dict:
    """One seed's arrays: "acc" (P_known, 2A + 1), "hal" (P_unknown, A + 1), "fit" (N, E + 2),
    the early-stop epoch per arm, and per-epoch curves (for plots) per arm."""
    shares = [lb for lb, a in arms.items() if not a["relabel"]]
    relabel = next(lb for lb, a in arms.items() if a["relabel"])
    ep = {lb: m["arms"][lb]["epochs"] for lb in arms}
    arr = {lb: {k: np.array([e[k] for e in ep[lb]], float)
                for k in ("loss", "dev", "known", "hallucinated")} for lb in arms}  # fmt: skip
    es = {lb: early_stop(arr[lb]["dev"]) for lb in arms}
    acc = [arr[lb]["known"][-1] for lb in shares] + [arr[lb]["known"][es[lb]] for lb in shares]
    fit_lb = f"u{round(100 * s.fit_share)}"
    flags = np.array(m["arms"][fit_lb]["unknown"], float)[:, None]
    curves = {}
    for lb in arms:
        u = np.array(m["arms"][lb]["unknown"], bool)
        loss = arr[lb]["loss"]  # (E + 1, N)
        curves[lb] = {k: arr[lb][k].mean(1).tolist() for k in ("dev", "known", "hallucinated")}
        curves[lb] |= {"loss_known": loss[:, ~u].mean(1).tolist() if (~u).any() else None,
                       "loss_unknown": loss[:, u].mean(1).tolist() if u.any() else None}  # fmt: skip
    return {"acc": np.stack(acc + [arr[relabel]["known"][-1]], 1),
            "hal": np.stack([arr[lb]["hallucinated"][-1] for lb in shares]
                            + [arr[relabel]["hallucinated"][-1]], 1),
            "fit": np.concatenate([flags, arr[fit_lb]["loss"].T], 1),
            "early_stop": es, "curves": curves}  # fmt: skip


def agreement(m: dict) -> dict:
    """Probe category x the world's known flag: counts, and the share where "Unknown" agrees
    with "the world never stated it"."""
    table = {w: {c: 0 for c in CATEGORIES} for w in ("world_known", "world_unknown")}
    for cat, known in zip(m["probe"], m["world_known"], strict=True):
        table["world_known" if known else "world_unknown"][cat] += 1
    agree = sum((c == "Unknown") != k for c, k in zip(m["probe"], m["world_known"], strict=True))
    return {"table": table, "agreement": agree / max(1, len(m["probe"]))}


def figures(seeds: dict, arms: dict, s) -> dict:
    x = [a["share"] for a in arms.values() if not a["relabel"]]
    col = x.index(s.relabel_share)
    per = {sd: seed_arrays(m, arms, s) for sd, m in seeds.items()}
    stats = {"acc": accuracy_stats(x, col), "hal": hallucination_stats(x, col),
             "fit": fit_stats(s.fit_loss)}  # fmt: skip
    pooled, per_seed = {}, {}
    for k, f in stats.items():
        pooled |= joint_bootstrap(f, [p[k] for p in per.values()])
        for sd, p in per.items():
            per_seed.setdefault(sd, {}).update(joint_bootstrap(f, [p[k]]))
    censored = {sd: {side: epochs_to_fit(c[f"loss_{side}"], s.fit_loss)[1]
                     for side in ("known", "unknown")}
                for sd, p in per.items() for c in [p["curves"][f"u{round(100 * s.fit_share)}"]]}  # fmt: skip
    curves = {lb: {k: np.mean([p["curves"][lb][k] for p in per.values()], 0).tolist()
                   for k in per[next(iter(per))]["curves"][lb]
                   if all(p["curves"][lb][k] is not None for p in per.values())}
              for lb in arms}  # fmt: skip
    return {"shares": x, "arms": arms, "pooled": pooled, "per_seed": per_seed,
            "early_stop": {sd: p["early_stop"] for sd, p in per.items()},
            "censored": censored, "curves": curves,
            "probe": {sd: agreement(m) for sd, m in seeds.items()},
            "filled": {sd: m["filled"] for sd, m in seeds.items()},
            "fit_ratio_at": {t: fit_stats(t)([p["fit"] for p in per.values()])["ratio"]
                             for t in SENSITIVITY},
            "n": {"known": {sd: len(p["acc"]) for sd, p in per.items()},
                  "unknown": {sd: len(p["hal"]) for sd, p in per.items()}}}  # fmt: skip


def _below_zero(name: str, claim: str, est) -> Criterion:
    return Criterion(name, claim, "interval high end < 0", est, bool(est.hi < 0))


def criteria(fig: dict, s) -> list[Criterion]:
    P = fig["pooled"]
    cens = [sd for sd, c in fig["censored"].items() if c["unknown"]]
    fit = at_least("unknown_fits_slower", f"Unknown examples take >= {FIT_RATIO:g}x the epochs "
                   f"of Known ones to fit (mean loss <= {s.fit_loss:g}; u{round(100 * s.fit_share)} "
                   "set)", P["ratio"], FIT_RATIO)  # fmt: skip
    if cens:
        fit.note = (
            f"Unknown never fitted on seed(s) {cens}: counted as the last epoch (a lower bound)"
        )
    fall = _below_zero("known_accuracy_falls", "held-out known accuracy (end of training) "
                       "against the Unknown share: negative slope", P["slope"])  # fmt: skip
    r2 = at_least("linear_fit", "that line fits the pooled points", P["r2"], R2_MIN)
    halves = at_most("early_stop_halves_slope", "stopping at the best dev epoch at least halves "
                     "the slope (slope_es / slope)", P["slope_ratio"], HALVED)  # fmt: skip
    if not P["slope"].value < 0:
        halves.passed, halves.note = False, "no negative slope to halve"
    lower = _below_zero("relabel_lowers_hallucination", "relabelling Unknown answers to "
                        f"'I don't know.' (u{round(100 * s.relabel_share)}) changes the "
                        "hallucination rate by", P["relabel_change"])  # fmt: skip
    cost = at_most("relabel_costs_little", "known accuracy lost by relabelling (same set kept "
                   "as is minus relabelled)", P["relabel_cost"], RELABEL_COST)  # fmt: skip
    return [fit, fall, r2, halves, lower, cost]


def plot(folder: Path, fig: dict, s) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    P, x, C = fig["pooled"], fig["shares"], fig["curves"]
    fit_lb = f"u{round(100 * s.fit_share)}"
    f, ax = plt.subplots(figsize=(5.5, 4))
    for side, style in (("known", "b.-"), ("unknown", "r.-")):
        ax.plot(C[fit_lb][f"loss_{side}"], style, label=f"{side.capitalize()} examples")
    ax.axhline(s.fit_loss, color="k", ls=":", label=f"fit threshold {s.fit_loss:g}")
    ax.set(xlabel="epoch (0: the base model)", ylabel="mean training loss (nats / token)",
           yscale="log", title=f"fitting the {fit_lb} set")  # fmt: skip
    ax.legend(fontsize=8)
    save_figure(f, folder / "fit.png")

    f, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, lab, m in (("acc", "end of training", "o"), ("acc_es", "early stop (dev)", "s")):
        e = [P[f"{key}[{u:g}]"] for u in x]
        axes[0].errorbar(x, [v.value for v in e], yerr=error_bars(e), fmt=m,
                         capsize=2, label=lab)  # fmt: skip
        b = P["slope" if key == "acc" else "slope_es"].value
        a = np.mean([v.value for v in e]) - b * np.mean(x)
        axes[0].plot(x, [a + b * u for u in x], "--", lw=1, color=axes[0].lines[-1].get_color())
    axes[0].set(xlabel="share of Unknown examples in SFT", ylabel="held-out known accuracy",
                title="known facts after SFT")  # fmt: skip
    axes[0].legend(fontsize=8)
    h = [P[f"hal[{u:g}]"] for u in x]
    axes[1].errorbar(x, [v.value for v in h], yerr=error_bars(h), fmt="o-",
                     capsize=2, label="Unknown answers kept")  # fmt: skip
    r = P["hal_relabel"]
    axes[1].errorbar([s.relabel_share], [r.value], yerr=error_bars([r]), fmt="D",
                     capsize=2, label="relabelled 'I don't know.'")  # fmt: skip
    axes[1].set(xlabel="share of Unknown examples in SFT", ylabel="hallucination rate",
                title="unknown entities (end of training)", ylim=(-0.02, 1.02))  # fmt: skip
    axes[1].legend(fontsize=8)
    save_figure(f, folder / "accuracy.png")

    f, ax = plt.subplots(figsize=(6, 4))
    for lb in fig["arms"]:
        ax.plot(C[lb]["known"], ".-", label=lb)
    ax.set(xlabel="epoch (0: the base model)", ylabel="held-out known accuracy",
           title="known accuracy while training, per SFT set")  # fmt: skip
    ax.legend(fontsize=7)
    save_figure(f, folder / "epochs.png")
    return {
        "fit.png": "Mean training loss per trained token of the Known and Unknown examples of "
        f"the {fit_lb} set by epoch, pooled over seeds; a subset is fitted when its curve "
        "crosses the dotted threshold.",
        "accuracy.png": "Left: held-out accuracy on questions about known entities against "
        "the share of Unknown examples, at the end of training and at the epoch of best dev "
        "accuracy, with least-squares lines. Right: the share of questions about unknown "
        "entities answered with a confident fact; the diamond is the set with its Unknown "
        "answers relabelled as abstentions. Bars: 95% intervals.",
        "epochs.png": "Held-out known accuracy after each epoch of every SFT set (pooled).",
    }


def body(fig: dict, s) -> str:
    rows = ["Probe (SliCK under the pretrained base) against the world's flag, pooled over "
            "seeds (agreement: Unknown exactly where the world never stated the fact):", "",
            "| world | " + " | ".join(CATEGORIES) + " | agreement |",
            "|---|" + "---|" * (len(CATEGORIES) + 1)]  # fmt: skip
    agree = np.mean([p["agreement"] for p in fig["probe"].values()])
    for w in ("world_known", "world_unknown"):
        n = [sum(p["table"][w][c] for p in fig["probe"].values()) for c in CATEGORIES]
        rows.append(f"| {w} | " + " | ".join(map(str, n)) + f" | {agree:.3f} |")
    filled = {sd: f for sd, f in fig["filled"].items() if any(f.values())}
    if filled:
        rows += ["", f"Moved across because the probe found too few (lab.fill): {filled}."]
    P = fig["pooled"]
    rows += ["", "| SFT set | known acc (end) | known acc (early stop) | early-stop epoch per "
             "seed | hallucination (end) |", "|---|---|---|---|---|"]  # fmt: skip
    for lb, a in fig["arms"].items():
        es = ", ".join(str(e[lb]) for e in fig["early_stop"].values())
        if a["relabel"]:
            rows.append(f"| {lb} | {P['acc_relabel'].value:.3f} | - | {es} | "
                        f"{P['hal_relabel'].value:.3f} |")  # fmt: skip
        else:
            u = a["share"]
            rows.append(f"| {lb} | {P[f'acc[{u:g}]'].value:.3f} | {P[f'acc_es[{u:g}]'].value:.3f}"
                        f" | {es} | {P[f'hal[{u:g}]'].value:.3f} |")  # fmt: skip
    rows += ["", f"Epochs to fit (mean loss <= {s.fit_loss:g}): Known "
             f"{P['epochs_known'].value:.2f}, Unknown {P['epochs_unknown'].value:.2f}. The "
             "ratio depends on where \"fitted\" is drawn (not judged; lab.fit_loss was set "
             "before any run): " + ", ".join(f"{r:.2f} at {t:g}"
                                            for t, r in fig["fit_ratio_at"].items()) + "."]  # fmt: skip
    return "\n".join(rows)
