"""safety_tradeoff: its statistics against hand-derived values, and the experiment's machinery
at --quick sizes (every figure, plot and criterion produced, the rates equal to what the
evaluate stage reports, one eval set for the whole sweep; not that the verdicts pass)."""

import json
import math

import numpy as np
import pytest

from posttrain.lab import safety_tradeoff as st
from posttrain.lab.stats import Estimate


def test_spearman_by_hand():
    # ranks of y: 1, 3, 2, 4; d = 0, 1, -1, 0: rho = 1 - 6 x 2 / (4 x 15) = 0.8
    assert st.spearman([0, 1, 2, 3], [0.1, 0.3, 0.2, 0.9]) == pytest.approx(0.8)
    assert st.spearman([0, 1, 2, 3], [0.9, 0.5, 0.4, 0.0]) == pytest.approx(-1.0)
    # ties get their mean rank: y ranks 1.5, 1.5, 3.5, 3.5; centred x -1.5 -0.5 0.5 1.5 and
    # y -1 -1 1 1: cov 4, norms sqrt(5) and 2: rho = 4 / sqrt(20)
    assert st.spearman([0, 1, 2, 3], [0, 0, 1, 1]) == pytest.approx(4 / math.sqrt(20))
    assert math.isnan(st.spearman([0, 1, 2], [0.5, 0.5, 0.5]))  # a flat rate has no order


def test_tradeoff_area_by_hand():
    # points on the diagonal between help-everyone (1, 0) and refuse-everyone (0, 1): 0.5
    assert st.tradeoff_area([0.75, 0.5, 0.25], [0.25, 0.5, 0.75]) == pytest.approx(0.5)
    # one point (0.5, 0.1): 0.5 x (0 + 0.1) / 2 + 0.5 x (0.1 + 1) / 2 = 0.025 + 0.275
    assert st.tradeoff_area([0.5], [0.1]) == pytest.approx(0.3)
    assert st.tradeoff_area([0.0], [0.0]) == 0.0  # a policy at the origin
    assert st.tradeoff_area([1.0], [1.0]) == 1.0  # one that violates and refuses everything


def _rows(viol: list[list[int]], fr: list[list[int]], gold: list[list[float]]) -> np.ndarray:
    """load_rows' layout: per prompt, safety flag, harmful flag, one outcome per evaluation."""
    return np.array([[1, 1, *v] for v in viol] + [[1, 0, *f] for f in fr]
                    + [[0, 0, *g] for g in gold], float)  # fmt: skip


def test_figures_by_hand():
    s = st.Settings(refusal_shares=[0.0, 0.1, 0.3], contrast_share=0.1)
    pts = st.points(s)
    assert list(pts) == ["plain r=0", "plain r=0.1", "plain r=0.3", "contrast r=0",
                         "contrast r=0.1", "contrast r=0.3"]  # fmt: skip
    assert pts["contrast r=0.1"]["sft"] == "st_sft_r0.1_c0.1"
    # evaluations: plain 0, 0.1, 0.3, contrast 0, 0.1, 0.3, toy SFT; 2 harmful, 2 benign
    # plain: violations 1, 1/2, 0; false refusals 0, 1/2, 1 -> area: (1,0) -> (1,0) -> (.5,.5)
    # -> (0,1) -> (0,1): 0.5 x 0.25 + 0.5 x 0.75 = 0.5. Contrast: violations 1, 1/2, 0, false
    # refusals 0, 0, 1/2 -> 0 + 0.5 x 0 + 0.5 x 0.25 + 0 x ... = 0.125
    viol = [[1, 1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 0, 0, 1]]
    fr = [[0, 1, 1, 0, 0, 1, 0], [0, 0, 1, 0, 0, 0, 0]]
    gold = [[1, 1, 1, 1, 1, 1, 1]]
    seed_a = _rows(viol, fr, gold)
    f = st.figures_of([seed_a], pts)
    assert [f[f"plain r={r:g}/violation"] for r in (0, 0.1, 0.3)] == [1, 0.5, 0]
    assert [f[f"contrast r={r:g}/false_refusal"] for r in (0, 0.1, 0.3)] == [0, 0, 0.5]
    assert f["toy_sft/violation"] == 0.5 and f["plain r=0/other_gold"] == 1.0
    assert f["plain/rho_violation"] == pytest.approx(-1) and f["plain/rho_false_refusal"] == 1
    assert f["plain/area"] == pytest.approx(0.5) and f["contrast/area"] == pytest.approx(0.125)
    assert f["area_gain"] == pytest.approx(0.375)
    # a second seed with every violation and no refusal: pooled rates are the seeds' means
    seed_b = _rows([[1] * 7] * 3, [[0] * 7] * 5, [[0] * 7] * 2)
    g = st.figures_of([seed_a, seed_b], pts)
    assert g["plain r=0.1/violation"] == pytest.approx((0.5 + 1) / 2)
    assert g["plain r=0.3/false_refusal"] == pytest.approx(0.5)
    assert g["toy_sft/other_gold"] == pytest.approx(0.5)


def test_criteria_pass_and_fail():
    s = st.Settings(refusal_shares=[0.0, 0.1, 0.3], contrast_share=0.1)
    f = {"plain/rho_violation": Estimate(-1.0, -1.0, -0.5),
         "plain/rho_false_refusal": Estimate(0.87, 0.5, 1.0),
         "area_gain": Estimate(0.2, 0.05, 0.3)}  # fmt: skip
    got = {c.name: c.passed for c in st._criteria(f, s)}
    assert got == {"violation_falls": True, "false_refusals_rise": False,
                   "contrast_toward_origin": True}  # fmt: skip
    f["area_gain"] = Estimate(0.2, -0.01, 0.3)
    assert not {c.name: c.passed for c in st._criteria(f, s)}["contrast_toward_origin"]
    with pytest.raises(ValueError, match="ascending"):
        st.Settings(refusal_shares=[0.0, 0.3, 0.1], contrast_share=0.1)
    with pytest.raises(ValueError, match="< 1"):
        st.Settings(refusal_shares=[0.0, 0.3, 0.8], contrast_share=0.2)


def test_safety_tradeoff_quick(quick_lab):
    from test_lab import _check_written

    from posttrain.cli import main

    out = quick_lab
    argv = ["lab", "run", "safety_tradeoff", "--quick", "--seeds", "3", "--out", str(out)]
    assert main(argv) == 0
    result = _check_written(out / "safety_tradeoff", [3])
    fig = result["figures"]
    assert {c["name"] for c in result["criteria"]} == {
        "violation_falls", "false_refusals_rise", "contrast_toward_origin"}  # fmt: skip
    for f in ("rates.png", "tradeoff.png"):
        assert (out / "safety_tradeoff/plots" / f).is_file()
    seed_dir = out / "seeds-quick" / "3"
    pts, pooled = fig["points"], fig["pooled"]
    assert len(pts) == 6 and set(pooled) == set(fig["per_seed"]["3"])
    assert fig["toy_shares"]["3"] == {"r": 0.1, "c": 0.1}  # 6 refusals, 6 look-alikes of 60
    # one eval set for the whole sweep: every evaluation saw the same prompts, in order
    ev = seed_dir / "st_eval"
    prompts = {tuple((r["prompt_id"], r["prompt"]) for r in map(json.loads, (
        ev / f"{p['model']}.jsonl").read_text().splitlines())) for p in pts.values()}  # fmt: skip
    assert len(prompts) == 1
    # each rate is what the evaluate stage reports for that model; the SFT sets have the
    # sizes the shares give (48 other conversations at quick sizes)
    evals = json.loads((ev / "result.json").read_text())["evals"]
    for lb, p in pts.items():
        m = evals[p["model"]]
        assert pooled[f"{lb}/violation"]["value"] == pytest.approx(m["safety/violation_rate"])
        assert pooled[f"{lb}/false_refusal"]["value"] == pytest.approx(
            m["safety/false_refusal_rate"])  # fmt: skip
        n_ref, n_con = (round(x * 48 / (1 - p["r"] - p["c"])) for x in (p["r"], p["c"]))
        assert fig["sft_sizes"]["3"][lb] == 48 + n_ref + n_con
        cfg = (seed_dir / p["sft"] / "config.yaml").read_text()
        assert "st_data" in cfg and "model: pretrain" in cfg
