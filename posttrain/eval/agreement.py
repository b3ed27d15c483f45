"""Inter-annotator agreement: Cohen's kappa, Krippendorff's alpha (nominal), ranking helpers.

Pure Python (no torch). Labels may be any hashable values; the arithmetic is done in exact
fractions and converted to float at the end, so degenerate cases are detected exactly.

Rankings are lists, best first, whose elements are a candidate index (an int) or a tie group
(a list of ints), e.g. [2, [0, 3], 1]: candidate 2 is best, 0 and 3 tie for second, 1 is last.
`pair_label` turns a ranking into a pairwise label ("i", "j" or "tie") that can be fed to the
agreement coefficients.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from fractions import Fraction

PAIR_LABELS = ("i", "j", "tie")


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters' labels on the same items: (p_o - p_e) / (1 - p_e).

    p_o is the share of items where the raters agree; p_e = sum_k p_a(k) * p_b(k) is the
    agreement expected by chance from each rater's own marginal label frequencies.

    Convention: when p_e == 1 (both raters used one and the same label on every item) the formula
    is 0/0; we return 1.0, since the raters agree perfectly. A rater who is constant while the
    other is not gets the ordinary formula (which then gives exactly 0: p_o == p_e).

    Raises ValueError if the sequences differ in length or are empty.
    """
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa: raters labelled {len(a)} and {len(b)} items; need equal")
    n = len(a)
    if n == 0:
        raise ValueError("cohen_kappa: no items")
    p_o = Fraction(sum(x == y for x, y in zip(a, b, strict=True)), n)
    ca, cb = Counter(a), Counter(b)
    p_e = Fraction(sum(ca[k] * cb[k] for k in ca), n * n)
    if p_e == 1:
        return 1.0
    return float((p_o - p_e) / (1 - p_e))


def krippendorff_alpha(units: Sequence[Sequence[Hashable | None]]) -> float:
    """Krippendorff's alpha for nominal data, any number of coders, missing values allowed.

    `units[u][c]` is coder c's label on unit u; None marks a missing value (rows may also have
    different lengths). Follows Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability":
    only units with m_u >= 2 values are pairable; the coincidence matrix is
    o_ck = sum_u (number of ordered c-k pairs of values in u) / (m_u - 1), n_c = sum_k o_ck,
    n = sum_c n_c (the number of pairable values), and

        alpha = 1 - D_o / D_e = 1 - (n - 1) * sum_{c != k} o_ck / sum_{c != k} n_c * n_k.

    Conventions: if D_e == 0 (every pairable value is the same label) alpha is 1.0 (perfect
    agreement); if no unit is pairable, ValueError.
    """
    o: Counter[tuple[Hashable, Hashable]] = Counter()
    for unit in units:
        values = [v for v in unit if v is not None]
        m = len(values)
        if m < 2:
            continue
        counts = Counter(values)
        for c, nc in counts.items():
            for k, nk in counts.items():
                pairs = nc * (nc - 1) if c == k else nc * nk
                if pairs:
                    o[c, k] += Fraction(pairs, m - 1)
    if not o:
        raise ValueError("krippendorff_alpha: no pairable unit (each needs >= 2 values)")
    n_c: Counter[Hashable] = Counter()
    for (c, _), v in o.items():
        n_c[c] += v
    n = sum(n_c.values())
    disagree = sum(v for (c, k), v in o.items() if c != k)
    expected = n * n - sum(v * v for v in n_c.values())  # sum_{c != k} n_c * n_k
    if expected == 0:
        return 1.0
    return float(1 - (n - 1) * disagree / expected)


def rank_positions(order: Sequence[int | Sequence[int]]) -> dict[int, int]:
    """Candidate index -> tier index (0 = best) for a ranking like [2, [0, 3], 1].

    Raises ValueError on a candidate listed twice or an empty tie group.
    """
    pos: dict[int, int] = {}
    for tier, item in enumerate(order):
        members = [item] if isinstance(item, int) else list(item)
        if not members:
            raise ValueError(f"rank_positions: empty tie group at tier {tier} in {order!r}")
        for cand in members:
            if cand in pos:
                raise ValueError(f"rank_positions: candidate {cand} appears twice in {order!r}")
            pos[cand] = tier
    return pos


def pair_label(order: Sequence[int | Sequence[int]], i: int, j: int) -> str:
    """ "i" if candidate i is ranked above j, "j" if below, "tie" if in the same tie group.

    Raises ValueError if i or j is not in the ranking, or if i == j.
    """
    if i == j:
        raise ValueError(f"pair_label: compare two different candidates, got i == j == {i}")
    pos = rank_positions(order)
    for cand in (i, j):
        if cand not in pos:
            raise ValueError(f"pair_label: candidate {cand} is not in the ranking {order!r}")
    if pos[i] < pos[j]:
        return "i"
    if pos[i] > pos[j]:
        return "j"
    return "tie"
