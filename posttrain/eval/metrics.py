"""Summary metrics of scored responses: gold by family, safety, knowledge, length, diversity,
calibration."""

from __future__ import annotations

import math
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
    m |= calibration(records)
    return {k: v for k, v in m.items() if v is not None}


def answerable(r: dict) -> bool:
    """A response with one right answer: arithmetic, string, or a question about a known entity."""
    return r.get("family") in ("arithmetic", "string") or (
        r.get("family") == "knowledge" and bool(r["components"].get("known"))
    )


def confidences(records: list[dict]) -> tuple[list[float], list[bool]]:
    """(confidence, correct) of the answerable records that carry a log-prob."""
    rs = [r for r in records if answerable(r) and r.get("logprob") is not None]
    return [math.exp(r["logprob"]) for r in rs], [bool(r["components"].get("correct")) for r in rs]


def calibration(records: list[dict]) -> dict:
    """How well the model's confidence in its own answer predicts that the answer is right.

    Confidence = the probability of the whole greedy response (exp of its summed token log-probs,
    record "logprob"), over the answerable prompts. RLHF is known to cost calibration (the GPT-4
    report's figure 8); the toy world shows whether a stage did. Also the mean confidence of
    hallucinated answers about unknown entities: tail knowledge stated with certainty.
    """
    conf, correct = confidences(records)
    if not conf:
        return {}
    hallucinated = [math.exp(r["logprob"]) for r in records
                    if r.get("logprob") is not None and r["components"].get("hallucinated")]  # fmt: skip
    return {
        "calibration/ece": expected_calibration_error(conf, correct),
        "calibration/confidence": _mean(conf),
        "calibration/accuracy": _mean(map(float, correct)),
        "calibration/confidence_hallucinated": _mean(hallucinated),
    }


def _bin_members(conf: list[float], bins: int, lo: float, hi: float) -> list[list[int]]:
    """Indices of `conf` in each of `bins` equal-width bins over [lo, hi] (the last one closed)."""
    if bins < 1 or not hi > lo:
        raise ValueError(f"calibration bins: need bins >= 1 and hi > lo, got {bins}, [{lo}, {hi}]")
    out: list[list[int]] = [[] for _ in range(bins)]
    for i, c in enumerate(conf):
        if not lo <= c <= hi:
            raise ValueError(f"confidence {c} outside [{lo}, {hi}]")
        out[min(bins - 1, int((c - lo) / (hi - lo) * bins))].append(i)
    return out


def reliability(conf: list[float], correct: list[bool], bins: int = 10, lo: float = 0.0,
                hi: float = 1.0) -> list[tuple[float, float, int]]:  # fmt: skip
    """(mean confidence, accuracy, count) of each non-empty bin: a reliability diagram's points."""
    out = []
    for idx in _bin_members(conf, bins, lo, hi):
        if idx:
            out.append((sum(conf[i] for i in idx) / len(idx),
                        sum(correct[i] for i in idx) / len(idx), len(idx)))  # fmt: skip
    return out


def expected_calibration_error(conf: list[float], correct: list[bool], bins: int = 10,
                               lo: float = 0.0, hi: float = 1.0) -> float:  # fmt: skip
    """ECE: sum over equal-width confidence bins of (bin share) x |accuracy - mean confidence|."""
    if len(conf) != len(correct):
        raise ValueError(f"ECE: {len(conf)} confidences but {len(correct)} outcomes")
    if not conf:
        return 0.0
    return sum(
        n / len(conf) * abs(acc - c) for c, acc, n in reliability(conf, correct, bins, lo, hi)
    )


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct word n-grams over all n-grams of a group of samples (Li et al. 2016)."""
    grams = [tuple(w[i : i + n]) for t in texts for w in [t.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
