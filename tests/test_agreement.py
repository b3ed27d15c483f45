"""Agreement coefficients checked against values derived by hand (see the comments)."""

from __future__ import annotations

import pytest

from posttrain.eval.agreement import (
    cohen_kappa,
    krippendorff_alpha,
    pair_label,
    rank_positions,
)


def _from_table(table: dict[tuple[str, str], int]) -> tuple[list[str], list[str]]:
    """Expand a contingency table {(label_a, label_b): count} into two label lists."""
    a, b = [], []
    for (x, y), count in table.items():
        a += [x] * count
        b += [y] * count
    return a, b


# ---------------------------------------------------------------- Cohen's kappa


def test_kappa_two_labels_classic_table():
    # 50 items, rows = rater A, columns = rater B:
    #              B yes  B no
    #   A yes        20     5    | 25
    #   A no         10    15    | 25
    #                30    20    | 50
    # p_o = (20 + 15) / 50 = 0.7
    # p_e = (25/50)(30/50) + (25/50)(20/50) = 0.30 + 0.20 = 0.5
    # kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    a, b = _from_table({("yes", "yes"): 20, ("yes", "no"): 5, ("no", "yes"): 10, ("no", "no"): 15})
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(b, a) == pytest.approx(0.4)  # symmetric


def test_kappa_three_labels():
    # 40 items, rows = rater A, columns = rater B:
    #          a    b    c
    #   a     12    2    1   | 15
    #   b      3   10    2   | 15
    #   c      1    1    8   | 10
    #         16   13   11   | 40
    # p_o = (12 + 10 + 8) / 40 = 0.75
    # p_e = (15*16 + 15*13 + 10*11) / 40^2 = (240 + 195 + 110) / 1600 = 545/1600 = 0.340625
    # kappa = (0.75 - 0.340625) / (1 - 0.340625) = 0.409375 / 0.659375 = 655/1055 = 131/211
    table = {
        ("a", "a"): 12, ("a", "b"): 2, ("a", "c"): 1,
        ("b", "a"): 3, ("b", "b"): 10, ("b", "c"): 2,
        ("c", "a"): 1, ("c", "b"): 1, ("c", "c"): 8,
    }  # fmt: skip
    a, b = _from_table(table)
    assert cohen_kappa(a, b) == pytest.approx(131 / 211)


def test_kappa_perfect_agreement():
    labels = ["x", "y", "z", "x", "y", 1, None]  # any hashable label
    assert cohen_kappa(labels, labels) == 1.0


def test_kappa_one_rater_constant():
    # A says "yes" on all 10 items, B says yes on 6 and no on 4.
    # p_o = 6/10 = 0.6; p_e = (10/10)(6/10) + (0/10)(4/10) = 0.6; kappa = (0.6-0.6)/(1-0.6) = 0
    a = ["yes"] * 10
    b = ["yes"] * 6 + ["no"] * 4
    assert cohen_kappa(a, b) == 0.0
    assert cohen_kappa(b, a) == 0.0


def test_kappa_both_constant_same_label_is_one():
    # p_o = 1, p_e = 1 -> 0/0; convention: perfect agreement.
    assert cohen_kappa(["tie"] * 5, ["tie"] * 5) == 1.0


def test_kappa_both_constant_different_labels():
    # p_o = 0, p_e = 1*0 + 0*1 = 0 -> kappa = 0
    assert cohen_kappa(["a"] * 4, ["b"] * 4) == 0.0


def test_kappa_chance_and_below_chance():
    # Independent-looking raters: p_o = 2/4, p_e = 0.5*0.5 + 0.5*0.5 = 0.5 -> kappa = 0
    assert cohen_kappa([1, 1, 0, 0], [1, 0, 1, 0]) == 0.0
    # Systematic disagreement: p_o = 0, p_e = 0.5 -> kappa = (0 - 0.5) / 0.5 = -1
    assert cohen_kappa(["x", "y", "x", "y"], ["y", "x", "y", "x"]) == -1.0
    # Mostly disagreeing: p_o = 1/4, p_e = 0.5 -> kappa = -0.25/0.5 = -0.5
    assert cohen_kappa(["x", "y", "x", "y"], ["x", "x", "y", "x"]) == pytest.approx(-0.5)


def test_kappa_errors():
    with pytest.raises(ValueError, match="equal"):
        cohen_kappa([1, 2], [1])
    with pytest.raises(ValueError, match="no items"):
        cohen_kappa([], [])


# ---------------------------------------------------------------- Krippendorff's alpha


def test_alpha_small_table_with_missing():
    # units x coders (None = missing):
    #   u1: a a a        m=3  ordered a-a pairs 3*2=6, /(m-1)=2 -> o_aa += 3
    #   u2: a b .        m=2  a-b 1, b-a 1, /1                  -> o_ab += 1, o_ba += 1
    #   u3: b b b        m=3  b-b 6, /2                         -> o_bb += 3
    #   u4: a . .        m=1  not pairable, ignored
    #   u5: b a b        m=3  b-b 2, b-a 2, a-b 2, /2           -> o_bb += 1, o_ab += 1, o_ba += 1
    # coincidence matrix:      a   b  | n_c
    #                     a    3   2  |  5
    #                     b    2   4  |  6
    #                                    n = 11
    # alpha = 1 - (n-1) * sum_{c!=k} o_ck / (n^2 - sum n_c^2) = 1 - 10*4 / (121 - 25 - 36)
    #       = 1 - 40/60 = 1/3
    units = [
        ["a", "a", "a"],
        ["a", "b", None],
        ["b", "b", "b"],
        ["a", None, None],
        ["b", "a", "b"],
    ]
    assert krippendorff_alpha(units) == pytest.approx(1 / 3)


# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C (nominal data,
# any number of observers, missing data). Rows = observers A-D, columns = units 1-12.
KRIPPENDORFF_2011 = [
    [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
]


def test_alpha_krippendorff_2011_worked_example():
    # Our input is unit-major (units[u][c]), the paper's table is observer-major: transpose.
    units = [list(col) for col in zip(*KRIPPENDORFF_2011, strict=True)]
    # Hand calculation. Unit 12 has one value -> not pairable. Per unit, o_ck += pairs/(m_u-1):
    #   u1  1 1 1    (m=3): o11 += 6/2 = 3
    #   u2  2 2 3 2  (m=4): o22 += 6/3 = 2; o23 += 3/3 = 1; o32 += 1
    #   u3, u4  3333      : o33 += 12/3 = 4 each          -> 8
    #   u5, u9  2222      : o22 += 4 each                 -> 8
    #   u6  1 2 3 4  (m=4): every off-diagonal pair of {1,2,3,4} += 1/3
    #   u7  4444          : o44 += 4
    #   u8  1 1 2 1  (m=4): o11 += 6/3 = 2; o12 += 3/3 = 1; o21 += 1
    #   u10 5 5 5    (m=3): o55 += 6/2 = 3
    #   u11 1 1      (m=2): o11 += 2/1 = 2
    # coincidence matrix:
    #           1     2     3     4     5   | n_c
    #     1     7    4/3   1/3   1/3    0   |  9
    #     2    4/3   10    4/3   1/3    0   | 13
    #     3    1/3   4/3    8    1/3    0   | 10
    #     4    1/3   1/3   1/3    4     0   |  5
    #     5     0     0     0     0     3   |  3
    #                                           n = 40
    # sum_{c!=k} o_ck = n - trace = 40 - 32 = 8;  sum_{c!=k} n_c n_k = 40^2 - (81+169+100+25+9)
    #   = 1600 - 384 = 1216
    # alpha = 1 - (n-1) * 8 / 1216 = 1 - 312/1216 = 113/152 = 0.74342 (the paper: 0.743)
    alpha = krippendorff_alpha(units)
    assert alpha == pytest.approx(113 / 152)
    assert round(alpha, 3) == 0.743


def test_alpha_perfect_and_identical():
    # Perfect agreement with several labels: D_o = 0, D_e > 0 -> alpha = 1
    assert krippendorff_alpha([[1, 1, None], [2, 2, 2], [3, None, 3]]) == 1.0
    # Every pairable value identical: D_e = 0 -> convention 1.0 (single values are ignored)
    assert krippendorff_alpha([["x", "x"], ["x", "x", "x"], ["y", None]]) == 1.0


def test_alpha_systematic_disagreement_is_negative():
    # u1: a b, u2: b a -> o_ab = o_ba = 2, n_a = n_b = 2, n = 4
    # alpha = 1 - 3 * 4 / (16 - 4 - 4) = 1 - 12/8 = -0.5
    assert krippendorff_alpha([["a", "b"], ["b", "a"]]) == pytest.approx(-0.5)


def test_alpha_no_pairable_units():
    with pytest.raises(ValueError, match="pairable"):
        krippendorff_alpha([[1, None], [None, 2], []])


# ---------------------------------------------------------------- ranking helpers


def test_rank_positions_and_pair_label():
    order = [2, [0, 3], 1]
    assert rank_positions(order) == {2: 0, 0: 1, 3: 1, 1: 2}
    assert pair_label(order, 2, 0) == "i"
    assert pair_label(order, 1, 3) == "j"
    assert pair_label(order, 0, 3) == "tie"
    assert pair_label(order, 3, 0) == "tie"
    assert pair_label([0, 1], 0, 1) == "i"


def test_ranking_helpers_errors():
    with pytest.raises(ValueError, match="not in the ranking"):
        pair_label([0, 1], 0, 5)
    with pytest.raises(ValueError, match="twice"):
        rank_positions([0, [1, 0]])
    with pytest.raises(ValueError, match="empty tie group"):
        rank_positions([0, []])
    with pytest.raises(ValueError, match="i == j"):
        pair_label([0, 1], 1, 1)


def test_pair_labels_feed_agreement():
    # Two annotators' rankings of 3 candidates on 2 prompts -> pairwise labels -> kappa.
    r1 = [[0, 1, 2], [[0, 1], 2]]
    r2 = [[0, 2, 1], [[0, 1], 2]]
    pairs = [(0, 1), (0, 2), (1, 2)]
    a = [pair_label(o, i, j) for o in r1 for i, j in pairs]  # i i i | tie i i
    b = [pair_label(o, i, j) for o in r2 for i, j in pairs]  # i i j | tie i i
    # p_o = 5/6; A: i 5, tie 1; B: i 4, j 1, tie 1 -> p_e = (5*4 + 1*1)/36 = 21/36
    # kappa = (30/36 - 21/36) / (15/36) = 9/15 = 0.6
    assert cohen_kappa(a, b) == pytest.approx(0.6)
