"""length_hacking's plots and the report's text beside the verdict table (length_hacking.py
computes every figure they show)."""

from __future__ import annotations

import numpy as np

from posttrain.lab.base import save_figure
from posttrain.lab.length_hacking import LABELS, PROXY, ROLES, TOK

NAMES = {"sft": "SFT", "ppo": "PPO (learned RM)", "length_only": "PPO, length-only reward",
         "length_penalty": "PPO, length penalty", "balanced_rm": "PPO, length-balanced RM"}  # fmt: skip


def plot(lab, figures: dict, per_seed: dict, name: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = lab.out / name / "plots"
    P, colors = figures["pooled"], {lb: f"C{i}" for i, lb in enumerate(LABELS)}
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    st = figures["by_step"]
    steps = np.asarray(st["steps"])
    tok = np.array([e.value for e in st["tokens"]])
    ax1.plot(steps, tok, "o-", color=colors["ppo"], label=NAMES["ppo"])
    ax1.fill_between(steps, [e.lo for e in st["tokens"]], [e.hi for e in st["tokens"]],
                     color=colors["ppo"], alpha=0.15)  # fmt: skip
    ax1.axhline(tok[0] * 1.3, color="k", ls=":", lw=1, label="SFT + 30% (criterion)")
    for i, lb in enumerate(ROLES):
        e = P[f"tokens[{lb}]"]
        ax1.errorbar(steps[-1] + (i + 1) * 0.02 * steps[-1], e.value, yerr=_err(e), fmt="s",
                     color=colors[lb], label=NAMES[lb], capsize=3)  # fmt: skip
    ax1.set(xlabel="PPO step (0: SFT)", ylabel="mean response tokens (held-out samples)",
            title="length along the main run; the other runs at its end")  # fmt: skip
    ax1.legend(fontsize=7)
    fams = list(figures["per_family_tokens"]["sft"])
    width = 0.8 / len(LABELS)
    for i, lb in enumerate(LABELS):
        x = np.arange(len(fams)) + (i - (len(LABELS) - 1) / 2) * width
        ax2.bar(x, [figures["per_family_tokens"][lb][f] for f in fams], width, color=colors[lb],
                label=NAMES[lb])  # fmt: skip
    ax2.set_xticks(np.arange(len(fams)), fams)
    ax2.set(ylabel="mean response tokens", title="length per family (after each run)")
    ax2.legend(fontsize=7)
    for lb in LABELS[1:]:
        g, p = P[f"growth[{lb}]"], P[f"proxy_gain[{lb}]"]
        ax3.errorbar(g.value, p.value, xerr=_err(g), yerr=_err(p), fmt="o", color=colors[lb],
                     label=NAMES[lb], capsize=3)  # fmt: skip
    ax3.axvline(0, color="k", lw=0.8)
    ax3.axhline(0, color="k", lw=0.8)
    ax3.set(xlabel="length growth (mean tokens / SFT - 1)", ylabel="proxy gain over SFT",
            title="reward-model gain against length growth")  # fmt: skip
    ax3.legend(fontsize=7)
    save_figure(fig, folder / "lengths.png")
    _plot_buckets(plt, folder, per_seed, figures["bucket_width"], colors)
    return {
        "lengths.png": "Left: mean response tokens of held-out samples along the main PPO run "
        "(step 0 is SFT; 95% band), the dotted line the 30% growth the paper's claim needs, and "
        "the other runs at the main run's last step. Length hacking is a curve that climbs "
        "through the dotted line; the length penalty and the length-balanced RM should sit well "
        "below it. Middle: tokens per family after each run (where length moved, and which "
        "way). Right: each run's proxy (learned RM) gain against its length growth, 95% "
        "intervals: in Singhal et al. the runs line up, with the length-only run near the main "
        "run's gain.",
        "buckets.png": "Left: mean proxy score per length bucket (the buckets of the "
        "within-bucket share), samples of every seed together, marker area the bucket's "
        "sample count. The within-bucket gain is the PPO curve's height over SFT's where both "
        "have samples; a gain made by moving to other buckets (right: the length "
        "distributions) is a gain from length, longer or shorter.",
    }


def _err(e) -> np.ndarray:
    return np.nan_to_num(np.array([[e.value - e.lo], [e.hi - e.value]]))


def _plot_buckets(plt, folder, per_seed: dict, width: float, colors: dict) -> None:
    arr = np.concatenate([a.transpose(1, 0, 2, 3).reshape(len(LABELS), -1, 3)
                          for a in per_seed.values()], 1)  # (M, N, 3) over seeds  # fmt: skip
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    top = int(arr[:, :, TOK].max() // width) + 1
    for lb in ("sft", "ppo", "length_only"):
        a = arr[LABELS.index(lb)]
        j = (a[:, TOK] // width).astype(int)
        n = np.bincount(j, minlength=top)
        s = np.bincount(j, weights=a[:, PROXY], minlength=top)
        keep = n > 0
        x = (np.arange(top)[keep] + 0.5) * width
        ax1.plot(x, s[keep] / n[keep], "-", color=colors[lb], lw=1)
        ax1.scatter(x, s[keep] / n[keep], s=300 * n[keep] / n.sum(), color=colors[lb],
                    label=NAMES[lb])  # fmt: skip
    ax1.set(xlabel=f"response tokens (buckets of {width:g})", ylabel="mean proxy score",
            title="proxy by length bucket")  # fmt: skip
    ax1.legend(fontsize=7)
    bins = np.arange(0, top + 1) * width
    for lb in LABELS:
        ax2.hist(arr[LABELS.index(lb), :, TOK], bins=bins, histtype="step", density=True,
                 color=colors[lb], label=NAMES[lb], lw=1.5)  # fmt: skip
    ax2.set(xlabel="response tokens", ylabel="share of samples", title="length distribution")
    ax2.legend(fontsize=7)
    save_figure(fig, folder / "buckets.png")


def body(figures: dict, info: dict, seed: int) -> str:
    """Definitions, the reward models' length evidence per seed, and what seed `seed`'s
    samples look like."""
    P = figures["pooled"]
    lines = [
        f"**After PPO** is the main run's ({figures['main_stage']}) last snapshot, step "
        f"{figures['after_step']}: the longest optimisation of the learned reward, where a "
        "length exploit has had every chance; the left plot shows the length at every snapshot "
        "(the toy's own PPO budget is 30 steps). The other runs are judged after as many steps.",
        "",
        f"**Within-bucket share**: buckets of {figures['bucket_width']:g} response tokens, the "
        "same for SFT and PPO; in each bucket both reach, PPO's mean proxy minus SFT's, weighted "
        "by the bucket's share of all samples (Singhal et al.'s weighted reward gain); divided "
        f"by the proxy gain. Main run: within-bucket gain "
        f"{P['within_bucket_gain[ppo]'].value:.3g} of {P['proxy_gain[ppo]'].value:.3g}; "
        f"length-only run: {P['within_bucket_gain[length_only]'].value:.3g} of "
        f"{P['proxy_gain[length_only]'].value:.3g}.",
        "",
        "| run | mean tokens | growth | proxy gain | gold gain |",
        "|---|---|---|---|---|",
    ]
    for lb in LABELS:
        t = P[f"tokens[{lb}]"]
        row = f"| {NAMES[lb]} | {t.value:.1f} [{t.lo:.1f}, {t.hi:.1f}] |"
        if lb == "sft":
            row += f" - | (proxy {P['proxy[sft]'].value:.3g}) | (gold {P['gold[sft]'].value:.3g}) |"
        else:
            row += "".join(
                f" {_fmt(P[f'{k}[{lb}]'])} |" for k in ("growth", "proxy_gain", "gold_gain")
            )
        lines.append(row)
    fam = figures["per_family_tokens"]
    d = {f: fam["ppo"][f] - fam["sft"][f] for f in fam["sft"]}
    total = sum(d.values())
    lines += ["", "**Where the length went**: mean tokens per family (pooled), and each family's "
              "share of the main run's change in mean tokens (families weigh equally).", "",
              "| family | " + " | ".join(NAMES[lb] for lb in LABELS) + " | share of PPO's change |",
              "|---|" + "---|" * (len(LABELS) + 1)]  # fmt: skip
    for f in fam["sft"]:
        share = f"{d[f] / total:.0%}" if total else "-"
        lines.append(
            f"| {f} | " + " | ".join(f"{fam[lb][f]:.1f}" for lb in LABELS) + f" | {share} |"
        )
    lines += ["", "**The learned reward model and length**, per seed: correlation of its score "
              "with response tokens on SFT's held-out samples (overall, and within families), its "
              "within-family slope per token (the length penalty, when the config says rm_slope); "
              "its held-out length correlation as the reward stage reports it, and that of the "
              "length-balanced reward model (with the pairs balancing kept).", "",
              "| seed | corr (SFT samples) | corr within families | slope / token | length "
              "penalty / token | RM held-out length corr | balanced RM held-out length corr | "
              "pairs kept (chosen longer : shorter before) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s, si in figures["seeds_info"].items():
        rm = list(si["reward_stages"].values())
        lines.append(f"| {s} | {si['rm_corr_sft']:.3g} | {si['rm_corr_within_family']:.3g} | "
                     f"{si['rm_slope_per_token_within_family']:.3g} | {si['length_penalty']:.3g} | "
                     f"{rm[0].get('length_corr', float('nan')):.3g} | "
                     f"{rm[1].get('length_corr', float('nan')):.3g} | "
                     f"{rm[1].get('train_pairs')} ({rm[1].get('chosen_longer')} : "
                     f"{rm[1].get('chosen_shorter')}) |")  # fmt: skip
    lines += ["", f"**What the samples look like** (seed {seed}): each family's most frequent "
              "response and its share of the samples.", "",
              "| family | " + " | ".join(NAMES[lb] for lb in ("sft", "ppo", "length_only")) + " |",
              "|---|---|---|---|"]  # fmt: skip
    for f in info["samples"]["sft"]:
        cells = []
        for lb in ("sft", "ppo", "length_only"):
            text, share = info["samples"][lb][f][0]
            cells.append(f"{_quote(text)} ({share:.0%})")
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(e) -> str:
    return f"{e.value:.3g} [{e.lo:.3g}, {e.hi:.3g}]"


def _quote(text: str, n: int = 60) -> str:
    text = text.replace("|", "\\|").replace("\n", " ").replace("`", "'") or "(empty)"
    return "`" + (text[:n] + "..." if len(text) > n else text) + "`"
