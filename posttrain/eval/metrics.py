"""Summary metrics of scored responses: gold by family, safety, knowledge, length, diversity,
calibration (and its temperature scaling)."""

from __future__ import annotations

import hashlib
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


def _scored(records: list[dict]) -> list[dict]:
    return [r for r in records if answerable(r) and r.get("logprob") is not None]


def confidences(records: list[dict]) -> tuple[list[float], list[bool]]:
    """(confidence, correct) of the answerable records that carry a log-prob."""
    rs = _scored(records)
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
    } | temperature_scaling(records)


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


# Temperature scaling (Guo et al. 2017) of the answer confidences. The search range of T: an
# all-correct (or separable) fit split has no finite optimum and ends at a bound.
T_RANGE = (0.01, 100.0)


def log_odds(logp: float) -> float:
    """logit(p) of p = exp(logp), from logp: log p - log(1 - p). p = 1 (logp 0, a float32 sum can
    round to it) is held at 1 - 1e-12, log-odds ~27.6, so that it stays finite."""
    logp = min(logp, -1e-12)
    return logp - math.log(-math.expm1(logp))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _softplus(x: float) -> float:  # log(1 + e^x), stable
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def scaled_confidence(logp: float, temperature: float) -> float:
    """sigmoid(logit(p) / T) for p = exp(logp): T > 1 pulls confidences towards 1/2, T < 1 pushes
    them towards 0 or 1; the order of the answers never changes."""
    return _sigmoid(log_odds(logp) / temperature)


def temperature_nll(temperature: float, z: list[float], correct: list[bool]) -> float:
    """Summed negative log-likelihood of the outcomes under sigmoid(z / T), z the log-odds:
    -log sigmoid(s) = softplus(-s) for a right answer, -log(1 - sigmoid(s)) = softplus(s) else."""
    return sum(_softplus(-zi / temperature if y else zi / temperature)
               for zi, y in zip(z, correct, strict=True))  # fmt: skip


def fit_temperature(z: list[float], correct: list[bool], lo: float = T_RANGE[0],
                    hi: float = T_RANGE[1], tol: float = 1e-7) -> float:  # fmt: skip
    """The T in [lo, hi] that minimises temperature_nll: golden-section search over u = log T.

    The NLL is convex in 1/T (a logistic regression with one weight and no bias), and 1/T = e^-u
    is monotone, so the NLL is unimodal in u and the search finds its minimum (to `tol` in u).
    """
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2  # 0.618...

    def f(u: float) -> float:
        return temperature_nll(math.exp(u), z, correct)

    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:  # the minimum lies in [a, d]
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:  # in [c, b]
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return math.exp((a + b) / 2)


def in_fit_split(key) -> bool:
    """Half of the prompts, by the first byte of sha256(prompt_id): the same split in every run
    and process (Python's hash() of a str is salted per process)."""
    return hashlib.sha256(str(key).encode()).digest()[0] < 128


def temperature_scaling(records: list[dict]) -> dict:
    """Temperature scaling (Guo et al. 2017) of the answer confidences: fit one T > 0 on half of
    the answerable prompts (split by prompt_id hash), report ECE on the other half before and
    after. The fitted T says which way and how far the model is from calibrated: T > 1, its
    confidences are too far from 1/2 (over-confident, as Guo et al. found modern networks), T < 1
    too close; ece_scaled is what a one-number correction would buy, on prompts it was not fit on.

    What is scaled: the log-odds of the confidence, p_T = sigmoid(logit(p) / T). That is Guo et
    al.'s method applied to the classifier ECE grades, the two outcomes (right with p, wrong with
    1 - p), whose logits are (log p, log(1 - p)): softmax of them divided by T is exactly
    sigmoid(logit(p) / T). The alternative, p_T = exp(logp / T) = p^(1/T), is not a temperature
    of that distribution (p^(1/T) + (1-p)^(1/T) != 1), nor what dividing the token logits by T
    does to a sequence (that changes every token's normaliser, which the summed log-prob does not
    carry); and it fixes 1 and only moves p near 1 in proportion to 1 - p, whereas the failure
    to measure (RLHF confidences collapsed near 1, the GPT-4 report's figure 8) needs exactly
    the near-1 answers to move: logit scaling takes 0.999 to 0.97 at T = 2. Its limit: it fixes
    p = 1/2, so a power law such as accuracy p^2 is corrected only where confidences sit well
    above 1/2 (with p uniform on [1/2, 1) ECE falls from ~0.17 to ~0.11; on [0, 1) it does not
    fall: one parameter cannot fit every shape). T is searched in T_RANGE.

    Needs a non-empty test half and both outcomes in the fit half (else no metric).
    """
    rs = _scored(records)
    split = [in_fit_split(r.get("prompt_id", i)) for i, r in enumerate(rs)]
    fit = [r for r, s in zip(rs, split, strict=True) if s]
    test = [r for r, s in zip(rs, split, strict=True) if not s]
    right = [bool(r["components"].get("correct")) for r in fit]
    if not test or len(set(right)) < 2:
        return {}
    temperature = fit_temperature([log_odds(r["logprob"]) for r in fit], right)
    outcomes = [bool(r["components"].get("correct")) for r in test]
    conf = [math.exp(r["logprob"]) for r in test]
    scaled = [scaled_confidence(r["logprob"], temperature) for r in test]
    return {
        "calibration/temperature": temperature,
        "calibration/ece_test": expected_calibration_error(conf, outcomes),
        "calibration/ece_scaled": expected_calibration_error(scaled, outcomes),
    }
