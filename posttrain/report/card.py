"""The report card as rows a renderer writes: headline metrics first, the rest in groups; each
value with its 95% interval, the best model of the row, and its difference from SFT said to be
within noise (the paired interval holds 0) or not. Also the sample responses side by side.

Everything comes from report.json's "evals" and "samples"; nothing here computes a figure.
"""

from __future__ import annotations

from typing import NamedTuple

from posttrain.eval.intervals import REFERENCE
from posttrain.report.glossary import BENCHMARKS, HEADLINE, Spec, spec

EXTRA = ("ci95", f"vs_{REFERENCE}")  # the keys of an eval summary that are not metrics
# The order of the card's first rows (then gold by family, then any other headline metric).
HEADLINE_ORDER = ["gold/mean", "safety/violation_rate", "safety/false_refusal_rate",
                  "knowledge/known_accuracy", "knowledge/hallucination_rate",
                  "length/mean_tokens", "diversity/distinct_2", "calibration/ece", "reward/mean"]  # fmt: skip
GROUP_ORDER = [HEADLINE, "Knowledge and safety", "Length", "Calibration", "Diversity",
               "Best-of-n", "Over-optimisation"]  # fmt: skip


class Cell(NamedTuple):
    value: float | int | None
    ci: list | None  # [lo, hi]
    best: bool
    diff: list | None  # [this - sft, lo, hi], paired
    verdict: str  # "" (no comparison), "reference", "within noise", "better", "worse", "differs"


class Row(NamedTuple):
    key: str
    spec: Spec
    cells: list[Cell]


def card_heading(evals: dict) -> str:
    """What the report card measured: the toy world's held-out prompts (gold scores), public
    benchmarks (named), or both; a run on a user's own model has no toy world to name."""
    keys = {k for m in evals.values() for k in m}
    parts = ["toy-world held-out prompts"] if "gold/mean" in keys else []
    benches = [b for b in BENCHMARKS if any(k.startswith(f"{b}/") for k in keys)]
    if benches:
        parts.append("public benchmarks: " + ", ".join(benches))
    return "Report card" + (f" ({'; '.join(parts)})" if parts else "")


def metric_keys(evals: dict) -> list[str]:
    keys: list[str] = []
    for m in evals.values():
        keys += [k for k in m if k not in keys and k not in EXTRA]
    return keys


def card_rows(evals: dict) -> list[tuple[str, list]]:
    """Report-card rows: one per metric, one value per evaluated model (None where missing)."""
    return [(k, [evals[label].get(k) for label in evals]) for k in metric_keys(evals)]


def verdict(diff: list | None, better: int) -> str:
    """What a paired difference from the reference says: within noise when its interval holds
    0, else better or worse (by the metric's direction), or just "differs"."""
    if diff is None:
        return ""
    d, lo, hi = diff
    if lo <= 0 <= hi:
        return "within noise"
    return {1: "better" if d > 0 else "worse", -1: "worse" if d > 0 else "better"}.get(
        better, "differs"
    )


def _best(values: list, better: int) -> list[bool]:
    """The best model(s) of a row; none when the row has no direction or every value ties."""
    nums = [v for v in values if isinstance(v, int | float)]
    if better == 0 or len(set(nums)) < 2:
        return [False] * len(values)
    top = max(nums) if better > 0 else min(nums)
    return [isinstance(v, int | float) and v == top for v in values]


def row(evals: dict, key: str) -> Row:
    s = spec(key)
    values = [m.get(key) for m in evals.values()]
    best = _best(values, s.better)
    cells = []
    for (label, m), v, b in zip(evals.items(), values, best, strict=True):
        diff = m.get(f"vs_{REFERENCE}", {}).get(key)
        why = "reference" if label == REFERENCE and v is not None else verdict(diff, s.better)
        cells.append(Cell(v, m.get("ci95", {}).get(key), b, diff, why))
    return Row(key, s, cells)


def card_groups(evals: dict) -> list[tuple[str, list[Row]]]:
    """(group, rows): the headline group first, in HEADLINE_ORDER, then the others."""
    keys = metric_keys(evals)
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(spec(k).group, []).append(k)
    head = groups.get(HEADLINE, [])
    first = [k for k in HEADLINE_ORDER[:1] if k in head]
    fams = [k for k in head if k.startswith("gold/") and k != "gold/mean"]  # gold by family
    listed = [k for k in HEADLINE_ORDER[1:] if k in head]
    groups[HEADLINE] = first + fams + listed + [k for k in head if k not in first + fams + listed]
    order = GROUP_ORDER + sorted(g for g in groups if g not in GROUP_ORDER and g != "Other")
    order.append("Other")
    return [(g, [row(evals, k) for k in groups[g]]) for g in order if groups.get(g)]


def noise_summary(evals: dict, key: str = "gold/mean") -> dict[str, str]:
    """label -> verdict of its difference from the reference on `key`."""
    return {label: verdict(m.get(f"vs_{REFERENCE}", {}).get(key), spec(key).better)
            for label, m in evals.items() if label != REFERENCE}  # fmt: skip


def sample_prompts(samples: dict[str, list]) -> list[dict]:
    """The sample responses regrouped by prompt: [{"family", "prompt", "responses": {label:
    row}}], prompts in the order they first appear (every model answered the same prompts)."""
    out: dict[tuple, dict] = {}
    for label, rows in samples.items():
        for r in rows:
            k = (r.get("family", ""), r["prompt"])
            out.setdefault(k, {"family": k[0], "prompt": k[1], "responses": {}})
            out[k]["responses"][label] = r
    return list(out.values())


def response_marks(r: dict) -> list[str]:
    """What a reader must know about a response before reading it: empty, truncated."""
    marks = []
    if not str(r.get("response", "")).strip():
        marks.append("empty response")
    if r.get("truncated"):
        n = r.get("n_tokens")
        marks.append(f"truncated at {n} tokens" if n else "truncated at the token limit")
    return marks


def gold_mark(score) -> str:
    """✓ right (gold 1), ✗ wrong (gold 0), else the partial score."""
    if score is None:
        return ""
    if score >= 1:
        return "✓"
    if score <= 0:
        return "✗"
    return f"{score:.2f}"
