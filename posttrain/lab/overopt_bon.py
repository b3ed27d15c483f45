"""overopt_bon: reward over-optimisation under best-of-n (Gao et al. 2210.10760, fig. 1/2).

Per world seed: n samples of the SFT model for each held-out prompt (stage `bon_sample`, with
gold per sample), scored by reward models ("proxies") trained on more or fewer comparisons
from the same noisy, length-biased annotators. For k = 1, 2, 4, ..., n the gold score and the
proxy score of best-of-k come from those n samples with the unbiased estimator
(generate.best_of_n.best_of_k_expectation), against d = sqrt(KL_bon), KL_bon = log k - (k-1)/k.

Criteria (Gao et al.): the proxy rises monotonically in k; for the smallest proxy gold peaks
inside the range and falls at least 10% below its peak; the fit gold(d) - gold(0) =
d (alpha - beta d) has R^2 >= 0.9 and beta > 0; a proxy trained on more comparisons moves the
peak d* = alpha / 2 beta right.
"""

from __future__ import annotations

import time

import numpy as np

from posttrain.lab.base import Criterion, Lab, at_least, save_figure, write_outputs
from posttrain.lab.stats import bon_peak, bootstrap, fit_bon

NAME = "overopt_bon"
TITLE = "Best-of-n over-optimisation (Gao et al. 2210.10760)"


def _curves(rewards: np.ndarray, golds: np.ndarray, ks: list[int]) -> tuple[np.ndarray, ...]:
    """Per prompt, best-of-k gold and proxy for each k: two (P, K) arrays.

    rewards, golds: (P, n). Sorted by reward (ties: the first sample wins, as best_index), the
    sample of rank i (0 = worst) wins a k-subset with probability C(i, k-1) / C(n, k)."""
    from math import comb

    P, n = rewards.shape
    # stable sort on -index then reward: among equals the earlier sample ranks higher
    order = np.lexsort((-np.arange(n)[None, :].repeat(P, 0), rewards), axis=1)  # (P, n) worst first
    r_sorted = np.take_along_axis(rewards, order, 1)
    g_sorted = np.take_along_axis(golds, order, 1)
    weights = np.array([[comb(i, k - 1) / comb(n, k) for i in range(n)] for k in ks])  # (K, n)
    return g_sorted @ weights.T, r_sorted @ weights.T  # (P, K) each


def rm_agreement(result_file) -> dict:
    """A reward stage's comparisons and its agreement with gold on held-out gold-gap pairs
    (overall and per family), from its result.json: how agreement grows with comparisons."""
    import json

    m = json.loads(result_file.read_text())["metrics"]
    return {"train_pairs": m.get("data/train_pairs", 0),
            "gold_agreement": m.get("eval/gold_agreement", float("nan")),
            "gold_pairs": m.get("eval/gold_pairs", 0),
            "per_family": {k.rsplit("/", 1)[1]: v for k, v in m.items()
                           if k.startswith("eval/gold_agreement/")}}  # fmt: skip


def _chain(reward_stage: str) -> list[str]:
    suffix = reward_stage.removeprefix("reward")
    return [f"sample{suffix}", f"rank{suffix}", reward_stage]


def _proxy_stages(raw: dict) -> dict[str, str]:
    """The reward models compared, from `lab.proxies` (label: prompts per family whose ranked
    candidates train it). The toy's own sample -> rank -> reward chain serves the label whose
    count equals sample.n_prompts; the others get copies of those three sections under
    suffixed names (same annotators, same settings, only the prompt count differs), added to
    `raw`."""
    import copy

    out = {}
    for label, n_prompts in raw["lab"]["proxies"].items():
        if n_prompts == raw["sample"]["n_prompts"]:
            out[label] = "reward"
            continue
        sfx = f"_{label}"
        raw[f"sample{sfx}"] = copy.deepcopy(raw["sample"]) | {"kind": "sample",
                                                              "n_prompts": n_prompts}  # fmt: skip
        raw[f"rank{sfx}"] = copy.deepcopy(raw["rank"]) | {"kind": "rank",
                                                          "sample_stage": f"sample{sfx}"}  # fmt: skip
        rew = copy.deepcopy(raw["reward"]) | {"kind": "reward"}
        rew["data"] = dict(rew.get("data") or {}) | {"rank_stage": f"rank{sfx}",
                                                     "sample_stage": f"sample{sfx}"}  # fmt: skip
        raw[f"reward{sfx}"] = rew
        out[label] = f"reward{sfx}"
    return out


def _load(seed_dir, stage: str) -> tuple[list[dict], np.ndarray]:
    from posttrain.io import read_jsonl

    recs = list(read_jsonl(seed_dir / stage / "candidates.jsonl"))
    golds = np.array([[r["gold"] for r in rec["responses"]] for rec in recs], float)
    return recs, golds


def _score(seed_dir, recs: list[dict], rm_stage: str) -> np.ndarray:
    from posttrain.rl.rewards import ModelReward

    rm = ModelReward(seed_dir / rm_stage / "model", batch_size=64)
    prompts = [rec for rec in recs for _ in rec["responses"]]
    texts = [r["text"].strip() for rec in recs for r in rec["responses"]]
    scores = [c["reward"] for c in rm(prompts, texts)]
    return np.array(scores, float).reshape(len(recs), -1)


def run(lab: Lab) -> dict:
    started = time.perf_counter()
    raw = lab.config(NAME)
    n = int(raw["bon_sample"]["n"])
    ks = [k for k in (2**i for i in range(20)) if k <= n]
    proxies = _proxy_stages(raw)  # label -> reward stage, fewest comparisons first
    stages = ["bon_sample"] + [s for st in proxies.values() for s in _chain(st)]
    per_seed: dict[str, dict[int, dict[str, np.ndarray]]] = {p: {} for p in proxies}
    agreement: dict[str, dict[int, dict]] = {p: {} for p in proxies}
    for seed in lab.seeds:
        seed_dir = lab.run_stages(seed, raw, stages)
        recs, golds = _load(seed_dir, "bon_sample")
        for label, stage in proxies.items():
            agreement[label][seed] = rm_agreement(seed_dir / stage / "result.json")
            rewards = _score(seed_dir, recs, stage)
            g, r = _curves(rewards, golds, ks)
            per_seed[label][seed] = {"gold": g, "proxy": r}
            lab.logger.info(f"{NAME}: seed {seed}, proxy {label}: gold@k "
                            + " ".join(f"{x:.3f}" for x in g.mean(0)))  # fmt: skip

    figures = summarise(per_seed, ks)
    for label, stage in proxies.items():
        figures["proxies"][label]["stage"] = stage
        per = agreement[label]
        figures["proxies"][label]["rm"] = {"per_seed": per, "gold_agreement": float(np.mean(
            [a["gold_agreement"] for a in per.values()])), "train_pairs": float(np.mean(
            [a["train_pairs"] for a in per.values()]))}  # fmt: skip
    criteria = _criteria(figures, list(proxies), ks)
    plots = _plot(lab, figures, list(proxies))
    return write_outputs(lab, NAME, TITLE, figures, criteria, plots, started=started)


def summarise(per_seed: dict[str, dict[int, dict[str, np.ndarray]]], ks: list[int]) -> dict:
    """Every figure of the experiment with its interval, from per-prompt best-of-k curves.

    per_seed: proxy label (fewest comparisons first) -> seed -> {"gold", "proxy"}: (P, K)
    arrays. Every statistic is recomputed on each bootstrap resample of prompts within seeds;
    the proxies share their prompts and samples, so the peak shift between the first and the
    last proxy is bootstrapped jointly (one resample serves both)."""
    K = len(ks)
    d = np.sqrt([np.log(k) - (k - 1) / k for k in ks])
    labels = list(per_seed)
    seeds = list(per_seed[labels[0]])
    # (P, 2K per proxy) per seed: gold then proxy of each proxy, side by side
    joint = [np.concatenate([np.concatenate([per_seed[lb][s]["gold"], per_seed[lb][s]["proxy"]], 1)
                             for lb in labels], 1) for s in seeds]  # fmt: skip

    def pooled(gs, j):  # (2K,) of proxy j: mean over seeds of the mean over prompts
        return np.mean([g[:, 2 * K * j : 2 * K * (j + 1)].mean(0) for g in gs], 0)

    def fit_of(gs, j):
        c = pooled(gs, j)
        return fit_bon(d, c[:K] - c[0])

    def peak_k(gs, j):
        return float(ks[int(np.argmax(pooled(gs, j)[:K]))])

    figures: dict = {"ks": ks, "d": d.tolist(), "proxies": {}}
    for j, label in enumerate(labels):
        f = fit_of(joint, j)
        figures["proxies"][label] = {
            "gold": [bootstrap(lambda g, i=i, j=j: pooled(g, j)[i], joint) for i in range(K)],
            "proxy": [bootstrap(lambda g, i=i, j=j: pooled(g, j)[K + i], joint) for i in range(K)],
            "per_seed": {
                s: {
                    "gold": per_seed[label][s]["gold"].mean(0).tolist(),
                    "proxy": per_seed[label][s]["proxy"].mean(0).tolist(),
                }
                for s in seeds
            },  # fmt: skip
            "fit": {"alpha": f.alpha, "beta": f.beta, "r2": f.r2, "d_star": bon_peak(f)},
            "peak_k": bootstrap(lambda g, j=j: peak_k(g, j), joint),
            "r2": bootstrap(lambda g, j=j: fit_of(g, j).r2, joint),
            "beta": bootstrap(lambda g, j=j: fit_of(g, j).beta, joint),
            "d_star": bootstrap(lambda g, j=j: bon_peak(fit_of(g, j)), joint),
            "min_proxy_step": bootstrap(
                lambda g, j=j: float(np.diff(pooled(g, j)[K:]).min()), joint
            ),
            "drop_from_peak": bootstrap(lambda g, j=j: _drop(pooled(g, j)[:K]), joint),
        }
    last = len(labels) - 1
    figures["peak_shift"] = bootstrap(
        lambda g: bon_peak(fit_of(g, last)) - bon_peak(fit_of(g, 0)), joint
    )
    return figures


def _drop(gold: np.ndarray) -> float:
    """How far the last point falls below the curve's peak, as a share of the peak."""
    peak = float(gold.max())
    return 1 - float(gold[-1]) / peak if peak > 0 else float("nan")


def _criteria(figures: dict, labels: list[str], ks: list[int]) -> list[Criterion]:
    P = figures["proxies"]
    small, large = labels[0], labels[-1]
    out = []
    for label in labels:
        out.append(at_least(f"proxy_monotone[{label}]", "proxy rises monotonically in n",
                            P[label]["min_proxy_step"], 0.0))  # fmt: skip
    peak = P[small]["peak_k"]
    out.append(Criterion(
        f"gold_peaks_inside[{small}]", "for a small/noisy proxy gold peaks inside the range",
        f"1 < argmax k < {ks[-1]} (value)", peak, 1 < peak.value < ks[-1]))  # fmt: skip
    out.append(at_least(f"gold_falls[{small}]", "gold falls >= 10% below its peak at the largest n",
                        P[small]["drop_from_peak"], 0.10))  # fmt: skip
    for label in labels:
        out.append(at_least(f"fit_r2[{label}]", "gold(d) - gold(0) = d(alpha - beta d) fits",
                            P[label]["r2"], 0.9))  # fmt: skip
        out.append(at_least(f"fit_beta[{label}]", "beta > 0 (gold bends down)", P[label]["beta"],
                            1e-12))  # fmt: skip
    # the peak moves right: d*(large) - d*(small), interval from the two proxies' own bootstraps
    out.append(at_least(f"peak_moves_right[{large} vs {small}]",
                        "a proxy trained on more comparisons moves d* right (d*_large - d*_small)",
                        figures["peak_shift"], 1e-12, by="lo"))  # fmt: skip
    return out


def _plot(lab: Lab, figures: dict, labels: list[str]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = np.asarray(figures["d"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for label in labels:
        p = figures["proxies"][label]
        g = np.array([e.value for e in p["gold"]])
        lo = np.array([e.lo for e in p["gold"]])
        hi = np.array([e.hi for e in p["gold"]])
        rm = p["rm"]
        (line,) = ax1.plot(d, g, "o-", label=f"{label} ({rm['train_pairs']:.0f} pairs, gold "
                           f"agreement {rm['gold_agreement']:.2f})")  # fmt: skip
        ax1.fill_between(d, lo, hi, color=line.get_color(), alpha=0.15)
        f = p["fit"]
        dd = np.linspace(0, d.max(), 100)
        ax1.plot(dd, g[0] + dd * (f["alpha"] - f["beta"] * dd), "--", color=line.get_color(),
                 lw=1)  # fmt: skip
        pr = np.array([e.value for e in p["proxy"]])
        ax2.plot(d, pr - pr[0], "o-", color=line.get_color(), label=label)
    ax1.set(xlabel="d = sqrt(KL_bon)", ylabel="gold score of best-of-n", title="gold (fit dashed)")
    ax2.set(xlabel="d = sqrt(KL_bon)", ylabel="proxy reward - proxy at n=1", title="proxy")
    for ax, k in ((ax1, figures["ks"]), (ax2, figures["ks"])):
        top = ax.secondary_xaxis("top", functions=(lambda x: x, lambda x: x))
        top.set_xticks(list(d), [str(v) for v in k], fontsize=7)
        ax.legend(fontsize=8)
    save_figure(fig, lab.out / NAME / "plots" / "gold_proxy_vs_d.png")
    return {"gold_proxy_vs_d.png": "Best-of-n against d = sqrt(KL) (top axis: n). Left: gold "
            "with 95% bands and the fit d(alpha - beta d) dashed; over-optimisation is gold that "
            "rises, peaks and falls while the proxy (right) keeps rising. A proxy trained on more "
            "comparisons should peak further right."}  # fmt: skip
