"""ROUGE-L (Lin 2004): the F-measure of the longest common subsequence of two token lists.

Tokens as the `rouge_score` package makes them by default (which Self-Instruct's near-duplicate
filter used): lower-cased, every run of characters other than a-z and 0-9 a separator, no
stemming. P = LCS / len(candidate), R = LCS / len(reference), F = 2PR / (P + R).
"""

from __future__ import annotations

import re
from collections import Counter

_SPLIT = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    return [t for t in _SPLIT.split(text.lower()) if t]


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (one row of the DP table at a time)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str | list[str], reference: str | list[str]) -> float:
    """ROUGE-L F-measure in [0, 1]; 0 when either side has no tokens."""
    c = rouge_tokens(candidate) if isinstance(candidate, str) else candidate
    r = rouge_tokens(reference) if isinstance(reference, str) else reference
    if not c or not r:
        return 0.0
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def max_rouge_l(candidate: str, pool: list[list[str]]) -> float:
    """The highest ROUGE-L of `candidate` against any tokenised text of `pool` (0 if empty)."""
    c = rouge_tokens(candidate)
    return max((rouge_l(c, r) for r in pool), default=0.0)


class NearDuplicates:
    """A growing pool of texts, asked whether a new text is a near duplicate of any of them
    (ROUGE-L >= threshold), as Self-Instruct filters its instruction pool. Exact repeats are a
    dictionary lookup; otherwise a pair is scored only when the bound LCS <= (shared tokens,
    counted with multiplicity) leaves it able to reach the threshold, and the scan stops at the
    first near duplicate. Same answers as `max_rouge_l(text, pool) >= threshold`."""

    def __init__(self, threshold: float):
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold {threshold} must be in (0, 1]")
        self.threshold = threshold
        self._exact: set[tuple[str, ...]] = set()
        self._pool: list[tuple[list[str], Counter]] = []

    def __len__(self) -> int:
        return len(self._pool)

    def add(self, text: str) -> None:
        toks = rouge_tokens(text)
        self._exact.add(tuple(toks))
        self._pool.append((toks, Counter(toks)))

    def is_near_duplicate(self, text: str) -> bool:
        toks = rouge_tokens(text)
        if not toks:
            return False
        if tuple(toks) in self._exact:
            return True
        bag, n, t = Counter(toks), len(toks), self.threshold
        for other, other_bag in self._pool:
            # F = 2 LCS / (n + m) for the LCS-based P and R; LCS <= shared <= min(n, m)
            need = t * (n + len(other)) / 2
            if min(n, len(other)) < need:
                continue
            shared = sum((bag & other_bag).values())
            if shared < need:
                continue
            if rouge_l(toks, other) >= t:
                return True
        return False
