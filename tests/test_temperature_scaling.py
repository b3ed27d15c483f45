"""Temperature scaling of answer confidences (Guo et al. 2017): hand values, identities, and
recovery of a known temperature on synthetic records."""

import math
import random

import pytest

from posttrain.eval.metrics import (
    T_RANGE,
    expected_calibration_error,
    fit_temperature,
    in_fit_split,
    log_odds,
    scaled_confidence,
    summarize,
    temperature_scaling,
)


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def records(n: int, draw, seed: int) -> list[dict]:
    """n answerable records: draw(rng) -> (log-prob of the answer, probability it is right)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        logp, q = draw(rng)
        right = rng.random() < q
        out.append({"prompt_id": f"p{i}", "family": "arithmetic", "score": float(right),
                    "components": {"correct": right}, "n_tokens": 2, "truncated": False,
                    "logprob": logp})  # fmt: skip
    return out


def log_sigmoid(z):
    return -math.log1p(math.exp(-z)) if z > 0 else z - math.log1p(math.exp(z))


def logit_draw(beta: float):
    """Confidence sigmoid(z), z ~ N(0, 2); right with probability sigmoid(beta z): calibrated at
    beta = 1, over-confident (log-odds beta^-1 times too large: T = 1/beta) at beta < 1."""
    return lambda rng: (lambda z: (log_sigmoid(z), _sigmoid(beta * z)))(rng.gauss(0, 2))


def tolerance(rs: list[dict], beta: float) -> float:
    """4 standard errors of the fitted 1/T. The fit is a one-weight logistic regression of the
    outcome on z; its MLE has variance 1 / I, I = sum z^2 s(1 - s), s = sigmoid(beta z) over
    the fit half (Fisher information at the true weight beta)."""
    zs = [log_odds(r["logprob"]) for r in rs if in_fit_split(r["prompt_id"])]
    info = sum(z * z * _sigmoid(beta * z) * (1 - _sigmoid(beta * z)) for z in zs)
    return 4 / math.sqrt(info)  # ~0.18 for 2,000 fit records at beta = 1; ~0.12 at beta = 1/2


def test_fit_temperature_by_hand():
    # confidence 0.8 (log-odds log 4 = 2 log 2), 2 of 3 right: the MLE sets sigmoid(z / T) to the
    # accuracy 2/3, log-odds log 2, so T = 2 log 2 / log 2 = 2
    assert fit_temperature([math.log(4)] * 3, [True, True, False]) == pytest.approx(2, rel=1e-5)
    # confidence 2/3 and accuracy 2/3: calibrated, T = 1
    assert fit_temperature([math.log(2)] * 3, [True, False, True]) == pytest.approx(1, rel=1e-5)
    # all right with positive log-odds: the NLL falls as T -> 0; the search stops at its bound
    assert fit_temperature([1.0, 2.0], [True, True]) == pytest.approx(T_RANGE[0], rel=1e-4)


def test_log_odds_and_identity_at_t_1():
    assert log_odds(math.log(0.8)) == pytest.approx(math.log(4))
    assert log_odds(0.0) == pytest.approx(math.log(1e12), rel=1e-6)  # p = 1 held finite
    conf = [0.12, 0.35, 0.55, 0.72, 0.87, 0.93, 0.999]
    right = [False, True, False, True, True, False, True]
    scaled = [scaled_confidence(math.log(p), 1.0) for p in conf]
    assert scaled == pytest.approx(conf, abs=1e-12)  # T = 1 changes no confidence ...
    assert expected_calibration_error(scaled, right) == pytest.approx(
        expected_calibration_error(conf, right), abs=1e-12
    )  # ... so no ECE
    # T > 1 pulls towards 1/2 from both sides, T < 1 pushes away; 1/2 itself stays
    assert scaled_confidence(math.log(0.9), 2) < 0.9 and scaled_confidence(math.log(0.1), 2) > 0.1
    assert scaled_confidence(math.log(0.9), 0.5) > 0.9
    assert scaled_confidence(math.log(0.5), 3) == pytest.approx(0.5)


def test_split_is_half_and_stable():
    share = sum(in_fit_split(f"p{i}") for i in range(2000)) / 2000
    assert 0.45 < share < 0.55
    assert [in_fit_split(f"p{i}") for i in range(20)] == [in_fit_split(f"p{i}") for i in range(20)]


def test_calibrated_records_give_t_near_1():
    rs = records(4000, logit_draw(1.0), seed=0)
    m = temperature_scaling(rs)
    assert abs(1 / m["calibration/temperature"] - 1) < tolerance(rs, 1.0)
    assert m["calibration/ece_test"] < 0.05  # calibrated up to sampling noise


def test_over_confident_records_are_softened():
    # log-odds twice the truth: T = 2
    rs = records(4000, logit_draw(0.5), seed=1)
    m = temperature_scaling(rs)
    T = m["calibration/temperature"]
    assert T > 1 and abs(1 / T - 0.5) < tolerance(rs, 0.5)
    assert m["calibration/ece_scaled"] < m["calibration/ece_test"] / 2
    sure = [r["logprob"] for r in rs if r["logprob"] > math.log(0.9)]
    assert all(scaled_confidence(lp, T) < math.exp(lp) for lp in sure)  # moved down, to accuracy


def test_power_law_over_confidence_is_partly_corrected():
    # right with probability p^2 for confidences p in [1/2, 1) (where tuned models put them): not
    # a logit scaling, so no T fits it exactly, but softening still helps
    rs = records(4000, lambda rng: (lambda p: (math.log(p), p * p))(rng.uniform(0.5, 1)), seed=2)
    m = temperature_scaling(rs)
    assert m["calibration/temperature"] > 1
    assert m["calibration/ece_scaled"] < m["calibration/ece_test"]


def test_needs_both_outcomes_in_the_fit_half_and_reaches_summarize():
    rs = records(40, lambda rng: (math.log(0.9), 1.0), seed=0)  # every answer right
    assert temperature_scaling(rs) == {}
    m = summarize(records(200, logit_draw(1.0), seed=3))
    assert {"calibration/temperature", "calibration/ece_test", "calibration/ece_scaled"} <= set(m)
    no_ids = [
        {k: v for k, v in r.items() if k != "prompt_id"} for r in records(200, logit_draw(1), 4)
    ]
    assert "calibration/temperature" in temperature_scaling(no_ids)  # split by position instead
