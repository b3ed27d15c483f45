"""rlhf_gains: does each preference or RL method improve the SFT assistant on held-out gold?

Per world seed the toy pipeline's own stages run (sample -> rank -> reward, DPO, PPO on the
learned reward, GRPO on the gold verifier) plus RLOO with GRPO's settings, and one evaluation
of SFT and the four methods on the same held-out prompts (greedy). Every gain is paired: per
prompt, method minus SFT; gold/mean is the mean over families of the per-family means (as on
the report card); "trained families" are those a method's stage trains on (all for DPO and
PPO). Intervals: the lab's stratified bootstrap over prompts within seeds.

Criteria (issue 16, point 2): GRPO and RLOO raise gold on their families by >= 0.08 with the
interval above 0, violations up by at most 0.02; PPO and DPO raise gold/mean with the interval
above 0 (DPO: violations up by at most 0.02); the reward model agrees with gold on >= 0.80 of
held-out gold-gap pairs. PPO's KL to SFT at its end is reported beside its gain.
"""

from __future__ import annotations

import json
import time

import numpy as np

from posttrain.lab.base import Criterion, Lab, at_least, at_most, save_figure, write_outputs
from posttrain.lab.stats import Estimate, bootstrap

NAME = "rlhf_gains"
TITLE = "Do preference and RL methods improve the SFT assistant? (InstructGPT's claim, toy world)"
BASE = "sft"


def _load_eval(seed_dir, stage: str, labels: list[str]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per prompt: scores (P, L) and violation flags (P, L) of each label, aligned by prompt id,
    plus {"family": [...], "harmful": [...]} per prompt."""
    from posttrain.io import read_jsonl

    recs = {lb: {r["prompt_id"]: r for r in read_jsonl(seed_dir / stage / f"{lb}.jsonl")}
            for lb in labels}  # fmt: skip
    ids = list(recs[labels[0]])
    for lb in labels[1:]:
        if set(recs[lb]) != set(ids):
            raise ValueError(f"{seed_dir / stage}: {lb}.jsonl and {labels[0]}.jsonl hold "
                             "different prompts")  # fmt: skip
    scores = np.array([[recs[lb][i]["score"] for lb in labels] for i in ids], float)
    viol = np.array([[bool(recs[lb][i]["components"].get("violation")) for lb in labels]
                     for i in ids], float)  # fmt: skip
    first = recs[labels[0]]
    info = {"family": [first[i]["family"] for i in ids],
            "harmful": [bool(first[i]["components"].get("harmful")) for i in ids]}  # fmt: skip
    return scores, viol, info


def family_gain(x: np.ndarray, fam: np.ndarray, families: list[int] | None) -> float:
    """x: (P, 2) base and method scores; fam: (P,) family codes. Mean over the families present
    (all or `families`) of the per-family mean of method minus base."""
    keep = np.unique(fam) if families is None else [f for f in np.unique(fam) if f in families]
    if len(keep) == 0:
        return float("nan")
    return float(np.mean([(x[fam == f, 1] - x[fam == f, 0]).mean() for f in keep]))


def rate_change(v: np.ndarray, mask: np.ndarray) -> float:
    """v: (P, 2) base and method flags; mean over masked rows of method minus base."""
    return float((v[mask, 1] - v[mask, 0]).mean()) if mask.any() else float("nan")


def summarise(per_seed: dict[int, dict], methods: list[str], trained: dict[str, list[str]]) -> dict:
    """Every figure with its interval. per_seed: seed -> {"scores", "viol" (P, 1 + M) with the
    base first, "family" (P,) names, "harmful" (P,) bools}. trained: method -> families (None:
    all). Columns of each bootstrap group: base and method scores, base and method violation,
    family code, harmful flag (one resample serves every figure of a method)."""
    fams = sorted({f for s in per_seed.values() for f in s["family"]})
    code = {f: i for i, f in enumerate(fams)}
    figures: dict = {"families": fams, "methods": {}}
    for j, m in enumerate(methods, start=1):
        groups = []
        for s in per_seed.values():
            fc = np.array([code[f] for f in s["family"]], float)
            groups.append(np.column_stack([s["scores"][:, 0], s["scores"][:, j], s["viol"][:, 0],
                                           s["viol"][:, j], fc, np.array(s["harmful"], float)]))  # fmt: skip
        tr = None if trained.get(m) is None else [code[f] for f in trained[m] if f in code]

        def pooled(stat, gs):
            return float(np.mean([stat(g) for g in gs]))

        def gain_all(gs):
            return pooled(lambda g: family_gain(g[:, :2], g[:, 4], None), gs)

        def gain_trained(gs, tr=tr):
            return pooled(lambda g: family_gain(g[:, :2], g[:, 4], tr), gs)

        def viol(gs):
            return pooled(lambda g: rate_change(g[:, 2:4], g[:, 5] > 0), gs)

        fig = {"gain_mean": bootstrap(gain_all, groups), "gain_trained": bootstrap(gain_trained, groups),
               "violation_change": bootstrap(viol, groups),
               "trained_families": trained.get(m) or fams, "per_family": {}}  # fmt: skip
        for f in fams:
            fig["per_family"][f] = bootstrap(
                lambda gs, f=code[f]: pooled(lambda g: family_gain(g[:, :2], g[:, 4], [f]), gs),
                groups,
            )
        figures["methods"][m] = fig
    base_rows = [s["scores"][:, 0] for s in per_seed.values()]
    figures["base_gold"] = {
        f: float(np.mean([b[np.array(s["family"]) == f].mean() for b, s in
                          zip(base_rows, per_seed.values(), strict=True)])) for f in fams}  # fmt: skip
    return figures


def agreement_estimate(per_seed: dict[int, tuple[float, int]]) -> Estimate:
    """Pooled gold agreement of the reward model with an interval: each seed's n held-out
    gold-gap pairs as n independent hits of rate a (the stage keeps only the rate; pairs of one
    prompt are not independent, so the interval is somewhat narrow)."""
    groups = []
    for a, n in per_seed.values():
        if n == 0:
            continue
        k = int(round(a * n))
        groups.append(np.array([1.0] * k + [0.0] * (n - k)))
    if not groups:
        return Estimate(float("nan"), float("nan"), float("nan"))
    return bootstrap(lambda gs: float(np.mean([g.mean() for g in gs])), groups)


def _criteria(figures: dict, lab_cfg: dict) -> list[Criterion]:
    out = []
    t_gain, t_viol = lab_cfg["min_gain_trained"], lab_cfg["max_violation_rise"]
    ms = figures["methods"]
    for m in ("grpo", "rloo"):
        if m not in ms:
            continue
        est = ms[m]["gain_trained"]
        ok = est.value >= t_gain and est.lo > 0
        out.append(Criterion(f"{m}_gain_trained", f"{m.upper()} on the verifier raises gold on the "
                             f"families it trains ({', '.join(ms[m]['trained_families'])})",
                             f"value >= {t_gain:g} and interval low end > 0", est, bool(ok)))  # fmt: skip
        out.append(at_most(f"{m}_violations", f"{m.upper()} does not raise violations",
                           ms[m]["violation_change"], t_viol))  # fmt: skip
    for m in ("ppo", "dpo"):
        if m not in ms:
            continue
        est = ms[m]["gain_mean"]
        note = (
            f"KL to SFT at the end {figures['ppo_kl']:.3f} nats"
            if m == "ppo" and "ppo_kl" in figures
            else ""
        )
        out.append(Criterion(f"{m}_gain_mean", f"{m.upper()} raises gold/mean over SFT",
                             "interval low end > 0", est, bool(est.lo > 0), note))  # fmt: skip
        if m == "dpo":
            out.append(at_most("dpo_violations", "DPO does not raise violations",
                               ms[m]["violation_change"], t_viol))  # fmt: skip
    out.append(at_least("rm_gold_agreement", "the reward model agrees with gold on held-out "
                        "gold-gap pairs", figures["rm_agreement"], lab_cfg["min_rm_agreement"]))  # fmt: skip
    return out


def _trained(raw: dict, methods: list[str]) -> dict[str, list[str] | None]:
    return {m: (raw[m].get("families") if m in ("grpo", "rloo") else None) for m in methods}


def _last_metric(path, key: str) -> float | None:
    last = None
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            last = rec[key]
    return last


def run(lab: Lab) -> dict:
    started = time.perf_counter()
    raw = lab.config(NAME)
    lab_cfg = raw["lab"]
    methods = list(lab_cfg["methods"])
    unknown = [m for m in methods if m not in raw["gains_eval"]["models"]]
    if unknown:
        raise ValueError(f"lab.methods: {unknown} not among gains_eval.models")
    stages = ["sample", "rank", "reward", *methods, "gains_eval"]
    per_seed, rm, kls = {}, {}, []
    for seed in lab.seeds:
        seed_dir = lab.run_stages(seed, raw, stages)
        scores, viol, info = _load_eval(seed_dir, "gains_eval", [BASE, *methods])
        per_seed[seed] = {"scores": scores, "viol": viol, **info}
        res = json.loads((seed_dir / "reward" / "result.json").read_text())["metrics"]
        # no held-out gold-gap pair (possible at --quick sizes): no agreement for this seed
        rm[seed] = (
            res.get("eval/gold_agreement", float("nan")),
            int(res.get("eval/gold_pairs", 0)),
        )
        if "ppo" in methods:
            kl = _last_metric(seed_dir / "ppo" / "metrics.jsonl", "kl/ref")
            kls.append(float("nan") if kl is None else kl)
        lab.logger.info(f"{NAME}: seed {seed}: gold/mean " + " ".join(
            f"{lb} {scores[:, j].mean():.3f}" for j, lb in enumerate([BASE, *methods])))  # fmt: skip
    figures = summarise(per_seed, methods, _trained(raw, methods))
    figures["rm_agreement"] = agreement_estimate(rm)
    figures["rm_agreement_per_seed"] = {s: a for s, (a, _) in rm.items()}
    if kls:
        figures["ppo_kl"] = float(np.mean(kls))
    criteria = _criteria(figures, lab_cfg)
    plots = _plot(lab, figures, methods)
    return write_outputs(lab, NAME, TITLE, figures, criteria, plots, started=started)


def _plot(lab: Lab, figures: dict, methods: list[str]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = figures["families"]
    folder = lab.out / NAME / "plots"
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        ests = [figures["methods"][m]["per_family"][f] for f in fams]
        x = np.arange(len(fams)) + (j - (len(methods) - 1) / 2) * width
        val = np.array([e.value for e in ests])
        err = np.array([[e.value - e.lo for e in ests], [e.hi - e.value for e in ests]])
        ax.bar(x, val, width, label=m, yerr=np.nan_to_num(err), capsize=2)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(fams)), fams)
    ax.set(ylabel="gold: method - SFT", title="held-out gain over SFT by family (95% intervals)")
    ax.legend(fontsize=8)
    save_figure(fig, folder / "gains.png")
    return {"gains.png": "Each method's held-out gold minus SFT's, per family, pooled over seeds. "
            "Look for bars whose whole interval is above 0 on the families a method trains "
            "(GRPO/RLOO) or everywhere (DPO, PPO), and for safety bars below 0 (violations or "
            "false refusals bought with the gain)."}  # fmt: skip
