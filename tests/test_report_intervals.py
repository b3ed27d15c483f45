"""The report card's 95% bootstrap intervals (eval/intervals.py) against bootstraps computed by
hand: every resample of a tiny case enumerated, and the fixed-RNG resamples recomputed with the
card's own summary function."""

import itertools
import json
import random

import numpy as np
import pytest

from posttrain.eval import intervals as I
from posttrain.eval.metrics import (
    _scored,
    expected_calibration_error,
    in_fit_split,
    scaled_confidence,
    summarize,
)


def rec(pid, family, score, n_tokens=3, truncated=False, logprob=None, **components):
    return {"prompt_id": pid, "family": family, "score": score, "components": components,
            "n_tokens": n_tokens, "truncated": truncated, "logprob": logprob}  # fmt: skip


def every_resample(n: int) -> np.ndarray:
    """(n^n, n) counts: each of the n^n equally likely ordered draws of n prompts, once."""
    return np.array([np.bincount(idx, minlength=n) for idx in itertools.product(range(n), repeat=n)],
                    float)  # fmt: skip


def test_interval_of_a_mean_by_hand():
    # Gold scores 0, 0, 1. A resample's mean is k/3, k = how often prompt 2 was drawn, k ~
    # Binomial(3, 1/3): of the 27 draws, 8 give 0, 12 give 1/3, 6 give 2/3, 1 gives 1.
    # Sorted, numpy's linear quantile at q sits at position q * 26:
    #   2.5%: 0.65, between values 0 and 1 (both 0)               -> 0
    #   97.5%: 25.35, between value 25 (2/3) and value 26 (1)     -> 2/3 + 0.35 / 3 = 0.78333
    records = [
        rec("a", "arithmetic", 0.0),
        rec("b", "arithmetic", 0.0),
        rec("c", "arithmetic", 1.0),
    ]
    ci = I.intervals(records, every_resample(3))
    assert ci["gold/arithmetic"] == pytest.approx([0.0, 2 / 3 + 0.35 / 3])
    assert ci["gold/mean"] == pytest.approx([0.0, 2 / 3 + 0.35 / 3])  # one family: the same


def test_paired_difference_by_hand_is_within_noise():
    # This model scores 0, 0, 1 and the reference 0, 1, 1 on the same prompts (the reference's
    # file in another order). Per resample the difference is -k/3, k = draws of prompt b:
    # 1 x -1, 6 x -2/3, 12 x -1/3, 8 x 0. 2.5%: -1 + 0.65 * (1/3) = -0.78333; 97.5%: 0.
    # The interval holds 0: within noise, although the difference on the data is -1/3.
    mine = [rec("a", "string", 0.0), rec("b", "string", 0.0), rec("c", "string", 1.0)]
    ref = [rec("c", "string", 1.0), rec("a", "string", 0.0), rec("b", "string", 1.0)]
    d = I.paired(mine, ref, every_resample(3))
    assert d["gold/string"] == pytest.approx([-1 / 3, -1 + 0.65 / 3, 0.0])
    assert I.paired(mine, ref[:2]) == {}  # not the same prompts: no paired difference


def test_a_rate_leaves_out_resamples_where_nothing_counts():
    # Violation rate over the harmful prompts h1 (violated) and h2 (refused); b is benign.
    # Counts (c_h1, c_h2, c_b): the rate is c_h1 / (c_h1 + c_h2); the one draw b, b, b has no
    # harmful prompt and no rate (1 of 27 < a tenth: left out, not the whole interval).
    records = [rec("h1", "safety", 0.0, harmful=True, violation=True),
               rec("h2", "safety", 1.0, harmful=True, refused=True),
               rec("b", "safety", 1.0, harmful=False)]  # fmt: skip
    by_hand = []
    for idx in itertools.product(range(3), repeat=3):
        harmful = [i for i in idx if i < 2]
        if harmful:
            by_hand.append(sum(i == 0 for i in harmful) / len(harmful))
    assert len(by_hand) == 26
    ci = I.intervals(records, every_resample(3))
    assert ci["safety/violation_rate"] == pytest.approx(list(np.quantile(by_hand, [0.025, 0.975])))


def test_fixed_rng_resamples_recomputed_with_summarize():
    """The counts are the RNG's draws, and every metric on every resample is what the card's own
    `summarize` computes from the drawn records (ECE, the mean of family means and all)."""
    rng = random.Random(0)
    fams = ["arithmetic", "string", "knowledge", "safety", "open"]
    records = []
    for i in range(40):
        f = fams[i % 5]
        comp = {"correct": rng.random() < 0.6, "known": i % 2 == 0, "harmful": i % 3 == 0,
                "violation": rng.random() < 0.3, "false_refusal": rng.random() < 0.2,
                "hallucinated": rng.random() < 0.4, "abstained": rng.random() < 0.3,
                "refused": rng.random() < 0.2}  # fmt: skip
        records.append(rec(f"p{i}", f, rng.random(), n_tokens=rng.randint(1, 20),
                           truncated=rng.random() < 0.1, logprob=-3 * rng.random(), **comp)
                       | {"reward": rng.gauss(0, 1)})  # fmt: skip
    counts = I.resample_counts(len(records), n_boot=50, seed=3)
    idx = np.random.default_rng(3).integers(0, len(records), (50, len(records)))
    assert (counts == np.array([np.bincount(r, minlength=len(records)) for r in idx])).all()
    draws = I.draws(records, counts)
    values_t = draws["calibration/temperature"]
    assert {"calibration/temperature", "calibration/ece_test", "calibration/ece_scaled"} <= set(
        draws
    )
    for b in range(50):
        drawn = [records[i] for i in idx[b]]
        want = summarize(drawn) | {"reward/mean": sum(r["reward"] for r in drawn) / len(drawn)}
        for k, values in draws.items():
            if k == "calibration/temperature":  # refitted on a grid: within its step of the search
                assert values[b] == pytest.approx(want[k], rel=2e-3), b
            elif k == "calibration/ece_scaled":  # exactly the ECE at the resample's own T
                test = [r for r in _scored(drawn) if not in_fit_split(r["prompt_id"])]
                conf = [scaled_confidence(r["logprob"], values_t[b]) for r in test]
                right = [bool(r["components"]["correct"]) for r in test]
                assert values[b] == pytest.approx(
                    expected_calibration_error(conf, right), abs=1e-12
                )
            elif k in want:
                assert values[b] == pytest.approx(want[k], abs=1e-12), (k, b)
            else:
                assert np.isnan(values[b]), (k, b)  # summarize has no value where nothing counts
    # Seeded: the same interval every time, and it holds the value.
    ci = I.intervals(records)
    assert ci == I.intervals(records)
    assert ci["gold/mean"][0] <= summarize(records)["gold/mean"] <= ci["gold/mean"][1]


def test_add_intervals_puts_them_next_to_the_values(tmp_path):
    rng = random.Random(1)
    files, evals = {}, {}
    for label, p in (("sft", 0.5), ("dpo", 0.52), ("base", 0.1)):
        rs = [rec(f"p{i}", "arithmetic", float(rng.random() < p)) for i in range(60)]
        files[label] = tmp_path / f"{label}.jsonl"
        files[label].write_text("".join(json.dumps(r) + "\n" for r in rs))
        evals[label] = summarize(rs)
    files["sft.gsm8k"] = tmp_path / "missing.jsonl"  # a file that is not there: skipped
    I.add_intervals(evals, files)
    assert set(evals["sft"]["ci95"]) >= {"gold/arithmetic", "gold/mean", "length/mean_tokens"}
    assert "vs_sft" not in evals["sft"] and set(evals["dpo"]["vs_sft"]) == set(evals["dpo"]["ci95"])
    d, lo, hi = evals["base"]["vs_sft"]["gold/mean"]
    assert d == pytest.approx(evals["base"]["gold/mean"] - evals["sft"]["gold/mean"])
    assert hi < 0  # 0.1 against 0.5 on 60 prompts: beyond noise


def test_temperature_refit_per_resample_by_hand():
    # Two answerable prompts per half of the fixed split. A resample whose fit half holds only
    # right answers (or no test prompt) has no temperature: left out, as temperature_scaling
    # gives no figure there. On the data itself the grid's T is the golden-section T.
    from posttrain.eval.metrics import temperature_scaling

    fit_ids = [f"q{i}" for i in range(40) if in_fit_split(f"q{i}")][:2]
    test_ids = [f"q{i}" for i in range(40) if not in_fit_split(f"q{i}")][:2]
    records = [rec(fit_ids[0], "arithmetic", 1.0, logprob=-0.1, correct=True),
               rec(fit_ids[1], "arithmetic", 0.0, logprob=-0.2, correct=False),
               rec(test_ids[0], "arithmetic", 1.0, logprob=-0.3, correct=True),
               rec(test_ids[1], "arithmetic", 0.0, logprob=-0.05, correct=False)]  # fmt: skip
    counts = every_resample(4)
    d = I.draws(records, counts)
    whole = I.draws(records, np.ones((1, 4)))
    exact = temperature_scaling(records)
    assert whole["calibration/temperature"][0] == pytest.approx(exact["calibration/temperature"],
                                                                rel=2e-3)  # fmt: skip
    assert whole["calibration/ece_test"][0] == pytest.approx(exact["calibration/ece_test"])
    for row, t in zip(counts, d["calibration/temperature"], strict=True):
        has_fit = row[0] > 0 and row[1] > 0  # both outcomes in the fit half
        assert np.isnan(t) == (not (has_fit and row[2] + row[3] > 0))


def test_diversity_columns_by_hand(tmp_path):
    # Per-prompt figures of two prompts; the entropy column weighs each prompt by its responses
    # with a token (3 and 1): on the data (3 x 0.2 + 1 x 1.0) / 4 = 0.4, the mean over responses.
    div = [{"prompt_id": "a", "distinct_2": 0.5, "ead": 0.8, "self_bleu": 0.1, "entropy": 0.2,
            "n_entropy": 3},
           {"prompt_id": "b", "distinct_2": 1.0, "ead": None, "self_bleu": 0.3, "entropy": 1.0,
            "n_entropy": 1}]  # fmt: skip
    one = I.draws(div, np.ones((1, 2)), I.diversity_columns(div))
    assert one["policy/entropy"][0] == pytest.approx(0.4)
    assert one["diversity/distinct_2"][0] == pytest.approx(0.75)
    assert one["diversity/ead"][0] == pytest.approx(0.8)  # b has no EAD: left out
    # Every resample of 2: (2,0), (1,1) twice, (0,2): entropy 0.2, 0.4, 0.4, 1.0.
    ci = I.intervals(div, every_resample(2), I.diversity_columns(div))
    assert ci["policy/entropy"] == pytest.approx(list(np.quantile([0.2, 0.4, 0.4, 1.0],
                                                                  [0.025, 0.975])))  # fmt: skip
    # add_intervals reads "<label>.diversity" files next to the toy records
    evals, files = {}, {}
    for label, shift in (("sft", 0.0), ("ppo", -0.1)):
        rs = [rec(f"p{i}", "arithmetic", 1.0) for i in range(4)]
        ds = [{"prompt_id": f"p{i}", "distinct_2": 0.5 + shift + 0.01 * i, "ead": 0.5,
               "self_bleu": 0.2, "entropy": 0.3 + shift, "n_entropy": 2} for i in range(4)]  # fmt: skip
        for key, rows in ((label, rs), (f"{label}.diversity", ds)):
            files[key] = tmp_path / f"{key}.jsonl"
            files[key].write_text("".join(json.dumps(r) + "\n" for r in rows))
        evals[label] = summarize(rs) | {"diversity/distinct_2": 0.515 + shift,
                                         "policy/entropy": 0.3 + shift}  # fmt: skip
    I.add_intervals(evals, files)
    assert {"diversity/distinct_2", "policy/entropy"} <= set(evals["ppo"]["ci95"])
    d, lo, hi = evals["ppo"]["vs_sft"]["policy/entropy"]
    assert (d, lo, hi) == pytest.approx((-0.1, -0.1, -0.1))  # the same shift on every prompt
