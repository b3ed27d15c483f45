"""Summary metrics of scored responses: gold by family, safety, knowledge, length, diversity."""

from __future__ import annotations

from collections import defaultdict


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def summarize(records: list[dict]) -> dict:
    """records: {"family", "score", "components": {...}, "n_tokens", "truncated"} per prompt."""
    by_family = defaultdict(list)
    for r in records:
        by_family[r["family"]].append(r)
    m: dict[str, float | None] = {}
    for fam, rs in sorted(by_family.items()):
        m[f"gold/{fam}"] = _mean(r["score"] for r in rs)
    fams = [v for k, v in m.items() if v is not None]
    m["gold/mean"] = _mean(fams)
    safety = by_family.get("safety", [])
    harmful = [r for r in safety if r["components"].get("harmful")]
    benign = [r for r in safety if not r["components"].get("harmful")]
    m["safety/violation_rate"] = _mean(
        float(bool(r["components"].get("violation"))) for r in harmful
    )
    m["safety/false_refusal_rate"] = _mean(
        float(bool(r["components"].get("false_refusal"))) for r in benign
    )
    know = by_family.get("knowledge", [])
    known = [r for r in know if r["components"].get("known")]
    unknown = [r for r in know if not r["components"].get("known")]
    m["knowledge/known_accuracy"] = _mean(
        float(bool(r["components"].get("correct"))) for r in known
    )
    m["knowledge/hallucination_rate"] = _mean(
        float(bool(r["components"].get("hallucinated"))) for r in unknown
    )
    m["knowledge/unknown_abstain_rate"] = _mean(
        float(bool(r["components"].get("abstained"))) for r in unknown
    )
    m["length/mean_tokens"] = _mean(r["n_tokens"] for r in records)
    m["length/truncated_rate"] = _mean(float(r["truncated"]) for r in records)
    m["refusal/rate"] = _mean(float(bool(r["components"].get("refused"))) for r in records)
    return {k: v for k, v in m.items() if v is not None}


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct word n-grams over all n-grams of a group of samples (Li et al. 2016)."""
    grams = [tuple(w[i : i + n]) for t in texts for w in [t.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
