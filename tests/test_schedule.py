import math

import pytest

from posttrain.train.schedule import lr_multiplier


def m(step, total=100, **kw):
    args = dict(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1) | kw
    return lr_multiplier(step, total, **args)


def test_warmup_is_linear():
    # step 0 of a 10-step warmup runs at 1/10 of the peak, step 9 at the peak.
    assert m(0) == pytest.approx(0.1)
    assert m(4) == pytest.approx(0.5)
    assert m(9) == pytest.approx(1.0)


def test_cosine_endpoints_and_midpoint():
    # After warmup the cosine goes 1 -> min over steps 10..99 (span 89); midpoint halfway.
    assert m(10) == pytest.approx(1.0)
    assert m(99) == pytest.approx(0.1)
    mid = 10 + 89 / 2
    assert lr_multiplier(
        int(mid), 100, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1
    ) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))


def test_wsd_is_flat_then_linear_decay():
    # total 100, decay over the last 20 steps: flat until step 79, then down to min at step 99.
    kw = dict(schedule="wsd", decay_fraction=0.2)
    assert m(50, **kw) == 1.0
    assert m(79, **kw) == 1.0
    assert m(80, **kw) == pytest.approx(1 - 0.9 * 1 / 20)
    assert m(99, **kw) == pytest.approx(0.1)


def test_constant_and_unknown():
    assert m(50, schedule="constant") == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        m(50, schedule="exponential")


def test_linear_matches_hf_linear_decay_without_warmup():
    # lr_s = lr * (S - s) / S for S = 4 steps: 1, 3/4, 1/2, 1/4.
    got = [
        lr_multiplier(s, 4, schedule="linear", warmup_steps=0, min_lr_ratio=0.0) for s in range(4)
    ]
    assert got == [1.0, 0.75, 0.5, 0.25]
