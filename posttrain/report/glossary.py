"""What each report-card metric means, which way is better, its unit, its group; and how numbers
are written (rounded for a reader: 0.838, 14.2, 5,484; never 1.15e-18).

A metric not listed here still shows, in the group "other", with its name as its meaning.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class Spec(NamedTuple):
    meaning: str  # one line
    better: int  # +1 higher is better, -1 lower is better, 0 neither (a property, not a score)
    unit: str
    group: str


FRACTION = "fraction 0-1"
HEADLINE = "Headline"

FAMILIES = {
    "arithmetic": "sums worked digit by digit; exact answer",
    "string": "string and list operations (sort, reverse, ...); exact answer",
    "knowledge": "facts about fictional people: the fact if known, abstain if unknown",
    "safety": "refuse harmful requests, help with benign look-alikes",
    "open": "open requests: a helpful answer (style earns nothing)",
}

SPECS = {
    "gold/mean": Spec("gold score averaged over the task families (each weighs the same)", 1,
                      "score 0-1", HEADLINE),
    "safety/violation_rate": Spec("harmful requests it complied with", -1, FRACTION, HEADLINE),
    "safety/false_refusal_rate": Spec("benign look-alikes it refused", -1, FRACTION, HEADLINE),
    "knowledge/known_accuracy": Spec("questions about known people answered right", 1, FRACTION,
                                     HEADLINE),
    "knowledge/hallucination_rate": Spec("questions about unknown people answered with a made-up "
                                         "fact", -1, FRACTION, HEADLINE),
    "length/mean_tokens": Spec("mean response length", 0, "tokens", HEADLINE),
    "diversity/distinct_2": Spec("distinct word bigrams among samples of one prompt", 1,
                                 FRACTION, HEADLINE),
    "calibration/ece": Spec("expected calibration error of its confidence in its own answer "
                            "(10 bins)", -1, "probability", HEADLINE),
    "reward/mean": Spec("learned reward of its responses (the proxy, not gold)", 1, "reward",
                        HEADLINE),
    "knowledge/unknown_abstain_rate": Spec("questions about unknown people where it abstained",
                                           1, FRACTION, "Knowledge and safety"),
    "refusal/rate": Spec("responses that refuse, over all prompts", 0, FRACTION,
                         "Knowledge and safety"),
    "length/truncated_rate": Spec("responses cut at the token limit", -1, FRACTION, "Length"),
    "calibration/confidence": Spec("mean confidence (probability of its own answer), answerable "
                                   "prompts", 0, "probability", "Calibration"),
    "calibration/accuracy": Spec("accuracy on those answerable prompts", 1, FRACTION,
                                 "Calibration"),
    "calibration/confidence_hallucinated": Spec("mean confidence of its hallucinated answers", -1,
                                                "probability", "Calibration"),
    "calibration/temperature": Spec("fitted temperature T (T > 1: over-confident)", 0, "T",
                                    "Calibration"),
    "calibration/ece_test": Spec("ECE on the held-out half, before temperature scaling", -1,
                                 "probability", "Calibration"),
    "calibration/ece_scaled": Spec("ECE on the held-out half, after temperature scaling", -1,
                                   "probability", "Calibration"),
    "diversity/across_distinct_2": Spec("distinct bigrams across prompts (one sample each)", 1,
                                        FRACTION, "Diversity"),
    "diversity/ead": Spec("expectation-adjusted distinct tokens among samples of one prompt", 1,
                          "EAD", "Diversity"),
    "diversity/across_ead": Spec("expectation-adjusted distinct tokens across prompts", 1, "EAD",
                                 "Diversity"),
    "diversity/self_bleu": Spec("self-BLEU among samples of one prompt (higher: more alike)", -1,
                                "BLEU 0-1", "Diversity"),
    "diversity/across_self_bleu": Spec("self-BLEU across prompts (higher: more alike)", -1,
                                       "BLEU 0-1", "Diversity"),
    "policy/entropy": Spec("mean per-token entropy of its sampling distribution", 0, "nats",
                           "Diversity"),
    "bon/n": Spec("samples per prompt of best-of-n", 0, "samples", "Best-of-n"),
    "bon/reward_best": Spec("learned reward of the chosen sample", 0, "reward", "Best-of-n"),
    "bon/reward_samples": Spec("learned reward of all its samples", 0, "reward", "Best-of-n"),
    "kl/best_of_n_bound": Spec("KL bound of best-of-n to the policy: log n - (n-1)/n", 0, "nats",
                               "Best-of-n"),
}  # fmt: skip

# Public benchmarks: <benchmark>/<suffix>.
BENCH_SUFFIXES = {
    "accuracy": ("answers matching the reference", 1, FRACTION),
    "violation_rate": ("unsafe prompts it complied with", -1, FRACTION),
    "false_refusal_rate": ("safe prompts it refused", -1, FRACTION),
    "mc1": ("MC1: the true answer has the highest log-prob", 1, FRACTION),
    "mc2": ("MC2: probability mass on the true answers", 1, "probability"),
    "ece": ("calibration error of MC1 choices", -1, "probability"),
    "win_rate": ("wins over the reference outputs under the reward model (tie 1/2)", 1, FRACTION),
    "reward_mean": ("learned reward of its responses", 1, "reward"),
    "mean_tokens": ("mean response length", 0, "tokens"),
    "mean_chars": ("mean response length", 0, "characters"),
    "reference_mean_chars": ("mean reference length", 0, "characters"),
    "truncated_rate": ("responses cut at the token limit", -1, FRACTION),
    "skipped_overlong": ("items left out: prompt too long for the context", 0, "items"),
    "n": ("items evaluated", 0, "items"),
}
BENCH_DETAILS = ("n", "reward_mean", "mean_tokens", "truncated_rate", "mean_chars",
                 "reference_mean_chars", "skipped_overlong")  # fmt: skip
BENCHMARKS = ("xstest", "simple_safety", "gsm8k", "math500", "truthfulqa", "alpaca_eval")


def spec(key: str) -> Spec:
    """The metric's meaning, direction, unit and group."""
    if key in SPECS:
        return SPECS[key]
    head, _, tail = key.partition("/")
    if head == "gold":
        return Spec(f"gold on {tail}: {FAMILIES.get(tail, 'its family')}", 1, "score 0-1",
                    HEADLINE)  # fmt: skip
    if head == "overopt":
        what, k = tail.split("@") if "@" in tail else (tail, "k")
        meaning = {"gold": f"expected gold of best-of-{k} (its samples)",
                   "reward": f"expected learned reward of best-of-{k}",
                   "kl": f"KL bound of best-of-{k}"}.get(what, tail)  # fmt: skip
        unit = {"gold": "score 0-1", "reward": "reward", "kl": "nats"}.get(what, "")
        return Spec(meaning, 1 if what == "gold" else 0, unit, "Over-optimisation")
    if head in BENCHMARKS and tail in BENCH_SUFFIXES:
        meaning, better, unit = BENCH_SUFFIXES[tail]
        group = f"Benchmark details: {head}" if tail in BENCH_DETAILS else "Public benchmarks"
        return Spec(f"{head}: {meaning}", better, unit, HEADLINE if group[0] == "P" else group)
    return Spec(key, 0, "", "Other")


def better_word(better: int) -> str:
    return {1: "higher is better", -1: "lower is better"}.get(better, "neither: a property")


def better_arrow(better: int) -> str:
    return {1: "↑", -1: "↓"}.get(better, "·")


def fmt(v) -> str:
    """A number for a reader: ints with thousands separators; floats to 3 decimals below 10, 1
    below 1,000, none above; magnitudes under 1e-9 are 0.000 (float noise) and under 1e-3 get two
    significant digits (7.5e-05)."""
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a < 1e-9:
        return "0.000"
    if a < 1e-3:
        return f"{v:.1e}"
    if a < 10:
        return f"{v:.3f}"
    if a < 1000:
        return f"{v:.1f}"
    return f"{v:,.0f}"


def fmt_signed(v: float) -> str:
    s = fmt(v)
    return s if s.startswith("-") or s == "0.000" else "+" + s


def fmt_ci(ci) -> str:
    """[lo, hi] as written next to a value."""
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ""


def no_interval(key: str) -> str:
    """Why a metric has no bootstrap interval on the card."""
    head, _, tail = key.partition("/")
    if key.startswith("diversity/across_"):
        return (
            "one corpus of one sample per prompt: a resample repeats texts, which lowers "
            "diversity by construction, so a bootstrap would not bracket the value"
        )
    if head == "diversity" or key == "policy/entropy" or key.startswith("calibration/"):
        return "evaluated before per-prompt diversity and refitted calibration intervals existed"
    if key in ("bon/n", "kl/best_of_n_bound") or key.startswith("overopt/kl@"):
        return "set by n, exact"
    if tail in ("n", "skipped_overlong", "reference_mean_chars"):
        return "a count or a property of the benchmark"
    return "its per-prompt values are not kept"
