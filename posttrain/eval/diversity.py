"""Lexical diversity of sampled responses, per input and across inputs (Kirk et al. 2023,
"Understanding the Effects of RLHF on LLM Generalisation and Diversity", 2310.06452).

Per input: the k samples of one prompt, scored as a group, averaged over prompts (does the model
say different things when asked the same thing?). Across inputs: one sample of each prompt,
scored as one group (does it say the same thing whatever it is asked?). RLHF lowers both.

- EAD, expectation-adjusted distinct n-grams (Liu et al. 2022, "Rethinking and Refining the
  Distinct Metric"): distinct n-grams over the number a uniform draw of as many n-grams from a
  vocabulary of V would give, V (1 - ((V-1)/V)^C) for C n-grams. Plain distinct-n falls with
  length (long texts must repeat); EAD does not. As in Liu et al., V is the vocabulary size for
  every n (not V^n). Averaged over n = 1..5 as Kirk et al. do (from our reading of the paper;
  the count is a setting); an n with no n-gram (responses shorter than n) is left out.
- Self-BLEU (Zhu et al. 2018, Texygen): the mean over samples of the BLEU of one sample against
  the others as references. Reported as self-BLEU itself: higher = more alike = LESS diverse.

Every function takes sequences of hashable items; the evaluate stage passes token ids of the
model's tokenizer (V = len(tokenizer): fixed per tokenizer, so the same for every model that
shares it, unlike a word vocabulary counted from the responses themselves).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Hashable, Sequence

Seq = Sequence[Hashable]


def ngram_counts(seq: Seq, n: int) -> Counter:
    return Counter(tuple(seq[i : i + n]) for i in range(len(seq) - n + 1))


def expected_distinct(count: int, vocab_size: int) -> float:
    """Expected number of distinct items among `count` uniform draws from `vocab_size` items:
    each item is missed by every draw with probability ((V-1)/V)^C, so V (1 - ((V-1)/V)^C)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if count == 0:
        return 0.0
    if vocab_size == 1:  # ((V-1)/V)^C = 0: the one item is always drawn
        return 1.0
    return -vocab_size * math.expm1(count * math.log1p(-1 / vocab_size))


def ead(seqs: Sequence[Seq], vocab_size: int, n: int = 1) -> float | None:
    """Distinct n-grams of the pooled `seqs` / expected_distinct(their count, V); None if none."""
    grams: Counter = Counter()
    for s in seqs:
        grams.update(ngram_counts(s, n))
    total = sum(grams.values())
    return len(grams) / expected_distinct(total, vocab_size) if total else None


def mean_ead(seqs: Sequence[Seq], vocab_size: int, max_n: int = 5) -> float | None:
    """EAD averaged over n = 1..max_n, leaving out the n that have no n-gram (None: no item)."""
    vals = [v for n in range(1, max_n + 1) if (v := ead(seqs, vocab_size, n)) is not None]
    return sum(vals) / len(vals) if vals else None


def bleu(hyp: Seq, refs: Sequence[Seq], max_n: int = 4) -> float:
    """Sentence BLEU (Papineni et al. 2002) of `hyp` against `refs`: the brevity penalty times
    the geometric mean of the clipped n-gram precisions, n = 1..max_n.

    Smoothing: add one to the matches and the count of n >= 2 (Lin & Och 2004; Chen & Cherry
    2014's method 2), none for unigrams. So a hypothesis that shares no item with any reference
    scores exactly 0, identical ones exactly 1, and one shorter than n has precision 1 at n
    (a short answer is not punished for having no 4-grams; the brevity penalty sees length).
    An empty hypothesis scores 1 against an empty reference (they are identical), else 0.
    """
    if not refs:
        raise ValueError("bleu needs at least one reference")
    if not hyp:
        return float(any(len(r) == 0 for r in refs))
    log_precision = 0.0
    for n in range(1, max_n + 1):
        counts = ngram_counts(hyp, n)
        most: Counter = Counter()  # the most times any one reference holds each n-gram
        for r in refs:
            most |= ngram_counts(r, n)
        matches = sum(min(c, most[g]) for g, c in counts.items())
        total = sum(counts.values())
        if n > 1:
            matches, total = matches + 1, total + 1
        if matches == 0:
            return 0.0
        log_precision += math.log(matches / total) / max_n
    c = len(hyp)
    r = min((abs(len(x) - c), len(x)) for x in refs)[1]  # closest reference length, shorter on ties
    brevity = 1.0 if c > r else math.exp(1 - r / c)
    return brevity * math.exp(log_precision)


def self_bleu(samples: Sequence[Seq], n_refs: int | None = None, seed: int = 0) -> float:
    """Mean over samples of bleu(sample, the other samples). With n_refs, each sample is scored
    against n_refs of the others drawn with a seeded RNG (BLEU rises with the number of
    references, so compare self-BLEUs only at the same count)."""
    samples = list(samples)
    if len(samples) < 2:
        raise ValueError(f"self-BLEU needs >= 2 samples, got {len(samples)}")
    rng = random.Random(seed)
    scores = []
    for i, s in enumerate(samples):
        others = samples[:i] + samples[i + 1 :]
        if n_refs is not None and n_refs < len(others):
            others = rng.sample(others, n_refs)
        scores.append(bleu(s, others))
    return sum(scores) / len(scores)


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def diversity_metrics(groups: Sequence[Sequence[Seq]], vocab_size: int, max_n: int = 5) -> dict:
    """EAD and self-BLEU of k samples per prompt: groups[i][j] is sample j of prompt i (k >= 2).

    diversity/ead, diversity/self_bleu: within each prompt's k samples, averaged over prompts.
    diversity/across_ead, diversity/across_self_bleu: over the first sample of every prompt; its
    self-BLEU scores each against k - 1 other prompts' samples (a seeded draw), the number of
    references the per-input self-BLEU has, so the two are on one scale and the cost is bounded.
    """
    k = min(len(g) for g in groups)
    firsts = [g[0] for g in groups]
    m = {
        "diversity/ead": _mean(mean_ead(g, vocab_size, max_n) for g in groups),
        "diversity/self_bleu": _mean(self_bleu(g) for g in groups),
        "diversity/across_ead": mean_ead(firsts, vocab_size, max_n),
        "diversity/across_self_bleu": self_bleu(firsts, n_refs=k - 1) if len(firsts) > 1 else None,
    }
    return {key: v for key, v in m.items() if v is not None}
