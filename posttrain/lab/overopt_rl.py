"""overopt_rl: reward over-optimisation along PPO runs (Gao et al. 2210.10760, RL form).

Per world seed: the toy's PPO on its learned reward model, run long at two KL coefficients with
a snapshot every few steps (rl_runs.py). Every snapshot, and the SFT model it started from
(step 0), answers the held-out eval prompts k times at temperature 1. Per snapshot:
d = sqrt(KL(pi || pi_SFT)), the KL the mean sequence log-ratio of those samples; gold, the
world checker's mean score; proxy, the mean score of the reward model PPO optimised.

Criteria (Gao et al.): along the main (smaller-KL) run gold peaks inside the run and falls at
least 10% below its peak by the end while the proxy keeps rising past gold's peak; for each run
the fit gold(d) - gold(0) = d (alpha - beta log d) has R^2 >= 0.8 and beta > 0; the larger KL
coefficient reaches a smaller d in as many steps (it acts like early stopping) and its gold at
a given d is that of the smaller coefficient's curve within 5 points (not a better curve).
"""

from __future__ import annotations

import time

import numpy as np

from posttrain.lab import rl_runs
from posttrain.lab.base import Criterion, Lab, at_least, save_figure, write_outputs
from posttrain.lab.stats import Estimate, bootstrap, fit_rl, rl_peak

NAME = "overopt_rl"
TITLE = "RL over-optimisation along PPO runs (Gao et al. 2210.10760)"
SAME_CURVE = 0.05  # gold points: "the same curve" within this much, both ways
FALL = 0.10  # gold falls at least this share below its peak (as overopt_bon)


def run(lab: Lab) -> dict:
    started = time.perf_counter()
    raw = lab.config(NAME)
    per_seed: dict[int, np.ndarray] = {}
    steps = None
    for seed in lab.seeds:
        seed_dir, models = rl_runs.prepare(lab, seed, raw)
        evals = rl_runs.evaluate_runs(lab, seed_dir, raw, models)
        per_seed[seed], seed_steps = measure(evals)
        if steps is not None and seed_steps != steps:
            raise ValueError(f"{NAME}: seed {seed} has snapshots at {seed_steps}, not {steps}")
        steps = seed_steps
        lab.logger.info(f"{NAME}: seed {seed}: gold by step " + "; ".join(
            f"{label} " + " ".join(f"{x:.3f}" for x in per_seed[seed][:, j, :, 1].mean(0))
            for j, label in enumerate(evals)))  # fmt: skip
    labels = list(raw["lab"]["rl_runs"]["kl_coefs"])
    figures = summarise(per_seed, labels, steps)
    figures["kl_coefs"] = dict(raw["lab"]["rl_runs"]["kl_coefs"])
    criteria = _criteria(figures, labels)
    plots = _plot(lab, figures, labels)
    return write_outputs(lab, NAME, TITLE, figures, criteria, plots, started=started)


def measure(evals: dict) -> tuple[np.ndarray, list[int]]:
    """Per prompt, per run, per point: (mean log-ratio, mean gold, mean proxy) of its k samples:
    a (P, L, J, 3) array, and the J steps (the same for every run)."""
    labels = list(evals)
    steps = [s for s, _ in evals[labels[0]]]
    if any([s for s, _ in evals[lb]] != steps for lb in labels):
        raise ValueError(f"{NAME}: the runs' snapshots are at different steps")
    arr = np.array([[[[np.mean([s[key] for s in rec["samples"]])
                       for key in ("logratio", "gold", "proxy")]
                      for rec in ev["sampled"]] for _, ev in evals[lb]] for lb in labels])  # fmt: skip
    return arr.transpose(2, 0, 1, 3), steps  # (L, J, P, 3) -> (P, L, J, 3)


def _pooled(gs: list[np.ndarray]) -> np.ndarray:
    """(L, J, 3): the mean over seeds of each seed's mean over prompts."""
    return np.mean([g.mean(0) for g in gs], 0)


def _d(kl: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(kl, 0.0))


def _fit(curve: np.ndarray):
    """fit_rl of one run's (J, 3) pooled curve: gold gain over step 0 against d."""
    return fit_rl(_d(curve[:, 0]), curve[:, 1] - curve[0, 1])


def _drop(gold: np.ndarray) -> float:
    """How far the last point falls below the curve's peak, as a share of the peak."""
    peak = float(gold.max())
    return 1 - float(gold[-1]) / peak if peak > 0 else float("nan")


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else float("nan")


def gold_gap(curve: np.ndarray, other: np.ndarray) -> float:
    """Mean over `curve`'s points after step 0 of its gold minus `other`'s gold at the same d
    (linear between `other`'s points, in order of d); points beyond `other`'s largest d are
    left out (nan if none is left)."""
    d, d_o = _d(curve[:, 0]), _d(other[:, 0])
    order = np.argsort(d_o)
    inside = (d <= d_o.max()) & (np.arange(len(d)) > 0)
    if not inside.any():
        return float("nan")
    at = np.interp(d[inside], d_o[order], other[order, 1])
    return float((curve[inside, 1] - at).mean())


def statistics(labels: list[str]) -> dict:
    """name -> statistic of the per-seed (P, L, J, 3) arrays: every figure a criterion reads."""
    main = 0
    out = {}
    for i, label in enumerate(labels):
        out[f"r2[{label}]"] = lambda gs, i=i: _fit(_pooled(gs)[i]).r2
        out[f"beta[{label}]"] = lambda gs, i=i: _fit(_pooled(gs)[i]).beta
        out[f"alpha[{label}]"] = lambda gs, i=i: _fit(_pooled(gs)[i]).alpha
        out[f"d_star[{label}]"] = lambda gs, i=i: rl_peak(_fit(_pooled(gs)[i]))
        out[f"peak_index[{label}]"] = lambda gs, i=i: float(np.argmax(_pooled(gs)[i, :, 1]))
        out[f"drop_from_peak[{label}]"] = lambda gs, i=i: _drop(_pooled(gs)[i, :, 1])

    def proxy_rise(gs):  # proxy at the end minus proxy where gold peaks (main run)
        c = _pooled(gs)[main]
        return float(c[-1, 2] - c[int(np.argmax(c[:, 1])), 2])

    out[f"proxy_rise_after_peak[{labels[main]}]"] = proxy_rise
    out[f"peak_gain[{labels[main]}]"] = lambda gs: float(
        _pooled(gs)[main, :, 1].max() - _pooled(gs)[main, 0, 1]
    )
    for i, label in enumerate(labels[1:], 1):
        pair = f"{label} vs {labels[main]}"
        out[f"d_ratio_last[{pair}]"] = lambda gs, i=i: _ratio(
            _d(_pooled(gs)[i, -1, 0]), _d(_pooled(gs)[main, -1, 0])
        )
        out[f"gold_gap_same_d[{pair}]"] = lambda gs, i=i: gold_gap(
            _pooled(gs)[i], _pooled(gs)[main]
        )
    return out


def summarise(per_seed: dict[int, np.ndarray], labels: list[str], steps: list[int]) -> dict:
    """Every figure with its interval, pooled over seeds and per seed.

    per_seed: seed -> (P, L, J, 3) per-prompt (log-ratio, gold, proxy) means, runs in `labels`
    order, points at `steps`. One resample of prompts serves every run and point of a seed
    (they answered the same prompts), so differences between runs are bootstrapped jointly."""
    seeds = list(per_seed)
    gs = [per_seed[s] for s in seeds]
    stats = statistics(labels)
    figures: dict = {"steps": steps, "runs": {}, "pooled": {}, "per_seed": {}}
    for i, label in enumerate(labels):
        run: dict = {}
        for k, key in enumerate(("kl", "gold", "proxy")):
            run[key] = [bootstrap(lambda g, i=i, j=j, k=k: _pooled(g)[i, j, k], gs)
                        for j in range(len(steps))]  # fmt: skip
        run["d"] = [bootstrap(lambda g, i=i, j=j: float(_d(_pooled(g)[i, j, 0])), gs)
                    for j in range(len(steps))]  # fmt: skip
        f = _fit(_pooled(gs)[i])
        run["fit"] = {"alpha": f.alpha, "beta": f.beta, "r2": f.r2, "d_star": rl_peak(f)}
        figures["runs"][label] = run
    figures["pooled"] = {name: bootstrap(stat, gs) for name, stat in stats.items()}
    for s in seeds:
        c = _pooled([per_seed[s]])
        figures["per_seed"][s] = {
            "curves": {label: {"d": _d(c[i, :, 0]).tolist(), "gold": c[i, :, 1].tolist(),
                               "proxy": c[i, :, 2].tolist()} for i, label in enumerate(labels)},
            "stats": {name: bootstrap(stat, [per_seed[s]]) for name, stat in stats.items()},
        }  # fmt: skip
    return figures


def _criteria(figures: dict, labels: list[str]) -> list[Criterion]:
    P, steps = figures["pooled"], figures["steps"]
    main = labels[0]
    out = []
    peak = P[f"peak_index[{main}]"]
    inside = 0 < peak.value < len(steps) - 1
    out.append(Criterion(f"gold_peaks_inside[{main}]", "gold peaks inside the run",
                         f"0 < argmax step < {steps[-1]} (value)",
                         Estimate(*(steps[int(round(x))] if np.isfinite(x) else x for x in peak)),
                         inside, note=_gain_note(P[f"peak_gain[{main}]"])))  # fmt: skip
    out.append(at_least(f"gold_falls[{main}]",
                        f"gold ends >= {FALL:.0%} below its peak (share of the peak)",
                        P[f"drop_from_peak[{main}]"], FALL))  # fmt: skip
    out.append(at_least(f"proxy_keeps_rising[{main}]",
                        "the proxy rises past gold's peak (proxy at the end - at gold's peak)",
                        P[f"proxy_rise_after_peak[{main}]"], 1e-12, by="lo"))  # fmt: skip
    for label in labels:
        out.append(at_least(f"fit_r2[{label}]", "gold(d) - gold(0) = d(alpha - beta log d) fits",
                            P[f"r2[{label}]"], 0.8))  # fmt: skip
        out.append(at_least(f"fit_beta[{label}]", "beta > 0 (gold bends down)", P[f"beta[{label}]"],
                            1e-12))  # fmt: skip
    for label in labels[1:]:
        pair = f"{label} vs {main}"
        ratio = P[f"d_ratio_last[{pair}]"]
        out.append(Criterion(f"kl_is_later[{pair}]",
                             "the larger KL coefficient is at a smaller d after as many steps",
                             "d ratio at the last step: interval high end < 1", ratio,
                             bool(np.isfinite(ratio.hi) and ratio.hi < 1)))  # fmt: skip
        gap = P[f"gold_gap_same_d[{pair}]"]
        same = bool(np.isfinite(gap.lo) and -SAME_CURVE <= gap.lo and gap.hi <= SAME_CURVE)
        out.append(Criterion(f"same_curve[{pair}]",
                             "at the same d, the larger KL coefficient's gold is the smaller's "
                             "(the same curve, not a better one)",
                             f"gold gap at equal d: interval within +-{SAME_CURVE:g}", gap, same))  # fmt: skip
    return out


def _gain_note(gain: Estimate) -> str:
    return f"gold at the peak - at step 0: {gain.value:.3g} [{gain.lo:.3g}, {gain.hi:.3g}]"


def _plot(lab: Lab, figures: dict, labels: list[str]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.asarray(figures["steps"])
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
    for label in labels:
        r = figures["runs"][label]
        coef = figures.get("kl_coefs", {}).get(label)
        name = f"{label} (KL coef {coef:g})" if coef is not None else label
        d = np.array([e.value for e in r["d"]])
        g = np.array([e.value for e in r["gold"]])
        (line,) = ax1.plot(d, g, "o-", label=name)
        ax1.fill_between(d, [e.lo for e in r["gold"]], [e.hi for e in r["gold"]],
                         color=line.get_color(), alpha=0.15)  # fmt: skip
        f = r["fit"]
        dd = np.linspace(1e-6, max(d.max(), 1e-3), 200)
        ax1.plot(dd, g[0] + dd * (f["alpha"] - f["beta"] * np.log(dd)), "--",
                 color=line.get_color(), lw=1)  # fmt: skip
        p = np.array([e.value for e in r["proxy"]])
        ax2.plot(d, p, "o-", color=line.get_color(), label=name)
        ax2.fill_between(d, [e.lo for e in r["proxy"]], [e.hi for e in r["proxy"]],
                         color=line.get_color(), alpha=0.15)  # fmt: skip
        ax3.plot(steps, d, "o-", color=line.get_color(), label=name)
        ax3.fill_between(steps, [e.lo for e in r["d"]], [e.hi for e in r["d"]],
                         color=line.get_color(), alpha=0.15)  # fmt: skip
    ax1.set(xlabel="d = sqrt(KL(pi || pi_SFT))", ylabel="gold score (held-out samples)",
            title="gold (fit d(alpha - beta log d) dashed)")  # fmt: skip
    ax2.set(xlabel="d = sqrt(KL(pi || pi_SFT))", ylabel="proxy reward (reward model)",
            title="proxy")  # fmt: skip
    ax3.set(xlabel="PPO step", ylabel="d", title="distance travelled")
    for ax in (ax1, ax2, ax3):
        ax.legend(fontsize=8)
    save_figure(fig, lab.out / NAME / "plots" / "gold_proxy_vs_d.png")
    return {"gold_proxy_vs_d.png": "PPO snapshots against d = sqrt(KL to the SFT model), 95% "
            "bands over held-out prompts. Left: gold with the fit d(alpha - beta log d) dashed; "
            "over-optimisation is gold that rises, peaks and falls while the proxy (middle) keeps "
            "rising. Right: d by step; the larger KL coefficient should travel more slowly yet "
            "trace the same gold curve on the left (early stopping, not a better curve)."}  # fmt: skip
