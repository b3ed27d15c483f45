"""rlhf_gains: its paired gains, violation changes and agreement interval against values
derived by hand, and the experiment's machinery at --quick sizes (every figure and criterion
produced; at toy sizes the verdicts mean nothing)."""

import json

import numpy as np
import pytest
from helpers import check_lab_outputs as _check_written

from posttrain.lab import rlhf_gains as rg


def test_family_gain_weights_families_equally():
    # family 0: two prompts, gains +1 and 0 -> 0.5; family 1: one prompt, gain -1 -> -1.
    # Equal weight per family: (0.5 - 1) / 2 = -0.25 (a prompt-weighted mean would be 0.0)
    x = np.array([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    fam = np.array([0, 0, 1])
    assert rg.family_gain(x, fam, None) == pytest.approx(-0.25)
    assert rg.family_gain(x, fam, [0]) == pytest.approx(0.5)
    assert np.isnan(rg.family_gain(x, fam, [7]))


def test_rate_change_counts_only_masked_rows():
    v = np.array([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    assert rg.rate_change(v, np.array([True, True, False, False])) == pytest.approx(0.5)
    assert rg.rate_change(v, np.array([False, False, True, True])) == pytest.approx(-0.5)


def test_summarise_by_hand():
    # one seed, families a (trained) and b; the method gains +1 on both a prompts, loses 1 on b
    scores = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    viol = np.array([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    per_seed = {0: {"scores": scores, "viol": viol, "family": ["a", "a", "b"],
                    "harmful": [True, True, False]}}  # fmt: skip
    fig = rg.summarise(per_seed, ["grpo"], {"grpo": ["a"]})["methods"]["grpo"]
    assert fig["gain_mean"].value == pytest.approx(0.0)  # (1 + -1) / 2
    assert fig["gain_trained"] == (1.0, 1.0, 1.0)  # every resample of family a gains 1
    assert fig["violation_change"].value == pytest.approx(0.5)  # 1 of 2 harmful prompts
    # family b has one prompt of three: 30% of resamples lack it, so no interval is claimed
    assert fig["per_family"]["b"].value == -1.0 and np.isnan(fig["per_family"]["b"].lo)


def test_agreement_estimate_pools_seeds_equally():
    est = rg.agreement_estimate({0: (1.0, 10), 1: (0.5, 100)})
    assert est.value == pytest.approx(0.75)
    assert est.lo < 0.75 < est.hi and est.hi <= 1.0
    # a seed without gold-gap pairs adds nothing; none at all: no figure
    assert rg.agreement_estimate({0: (1.0, 10), 1: (float("nan"), 0)}) == (1.0, 1.0, 1.0)
    assert np.isnan(rg.agreement_estimate({0: (float("nan"), 0)}).value)


def test_rlhf_gains_quick(quick_lab):
    from posttrain.cli import main

    out = quick_lab
    assert main(["lab", "run", "rlhf_gains", "--quick", "--seeds", "3", "--out", str(out)]) == 0
    result = _check_written(out / "rlhf_gains", [3])
    names = {c["name"] for c in result["criteria"]}
    assert names == {"grpo_gain_trained", "grpo_violations", "rloo_gain_trained",
                     "rloo_violations", "ppo_gain_mean", "dpo_gain_mean", "dpo_violations",
                     "rm_gold_agreement"}  # fmt: skip
    fig = result["figures"]
    assert set(fig["methods"]) == {"dpo", "ppo", "grpo", "rloo"}
    from posttrain.lab.base import Lab

    raw = Lab(out, [3], quick=True).config("rlhf_gains")
    assert fig["methods"]["grpo"]["trained_families"] == raw["grpo"]["families"]
    assert fig["methods"]["dpo"]["trained_families"] == fig["families"]  # all of them
    # gold/mean gain = mean over families of per-family gains, recomputed from the eval files
    seed_dir = out / "seeds-quick" / "3" / "gains_eval"
    sft = [json.loads(x) for x in (seed_dir / "sft.jsonl").read_text().splitlines()]
    dpo = {
        r["prompt_id"]: r
        for r in map(json.loads, (seed_dir / "dpo.jsonl").read_text().splitlines())
    }
    fams = sorted({r["family"] for r in sft})
    by_hand = np.mean([np.mean([dpo[r["prompt_id"]]["score"] - r["score"] for r in sft
                                if r["family"] == f]) for f in fams])  # fmt: skip
    assert fig["methods"]["dpo"]["gain_mean"]["value"] == pytest.approx(by_hand)
    rm = fig["rm_agreement"]["value"]
    assert rm is None or 0.0 <= rm <= 1.0  # None: no gold-gap pair at quick sizes
