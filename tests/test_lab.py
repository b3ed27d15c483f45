"""The lab: its statistics against hand-derived values, and every experiment's machinery at
--quick sizes (figures and verdicts produced; not that they pass: at toy sizes they mean
nothing)."""

import json
import math

import numpy as np
import pytest
from helpers import check_lab_outputs as _check_written

from posttrain.lab import stats
from posttrain.lab.base import Criterion, at_least, at_most, verdict_table
from posttrain.lab.stats import Estimate


def test_bootstrap_of_constant_data_is_a_point():
    est = stats.mean_estimate([[0.5, 0.5, 0.5], [0.5, 0.5]])
    assert est == Estimate(0.5, 0.5, 0.5)


def test_pooled_mean_weights_seeds_equally():
    # seed means 1.0 (two items) and 0.0 (four items): pooled 0.5, not 2/6
    est = stats.mean_estimate([[1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert est.value == pytest.approx(0.5)
    # every resample keeps each seed's items within that seed: all means stay 0.5
    assert (est.lo, est.hi) == pytest.approx((0.5, 0.5))


def test_bootstrap_interval_covers_the_mean_of_a_bernoulli_sample():
    # 200 draws with 100 ones: mean 0.5, standard error sqrt(0.25 / 200) = 0.0354, so the 95%
    # percentile interval is about 0.5 -+ 1.96 x 0.0354 = [0.431, 0.569]
    x = np.array([1.0, 0.0] * 100)
    est = stats.mean_estimate([x], seed=3)
    assert est.value == 0.5
    assert est.lo == pytest.approx(0.431, abs=0.02) and est.hi == pytest.approx(0.569, abs=0.02)


def test_bootstrap_gives_no_interval_when_the_statistic_mostly_does_not_exist():
    est = stats.bootstrap(lambda gs: float("nan"), [np.zeros(3)], n_boot=50)
    assert math.isnan(est.lo) and math.isnan(est.hi)


def test_fit_bon_recovers_an_exact_curve():
    # gain = d (2 - 0.5 d): alpha 2, beta 0.5, R^2 1, peak at d* = 2 / (2 x 0.5) = 2
    d = np.linspace(0, 3, 9)
    fit = stats.fit_bon(d, d * (2 - 0.5 * d))
    assert (fit.alpha, fit.beta, fit.r2) == pytest.approx((2, 0.5, 1))
    assert stats.bon_peak(fit) == pytest.approx(2)
    assert stats.bon_peak(stats.Fit(1.0, -0.1, 1.0)) == math.inf


def test_fit_rl_recovers_an_exact_curve():
    # gain = d (1 - 0.5 log d): peak where 1 - 0.5 (log d + 1) = 0, d* = e^(1/0.5 - 1) = e
    d = np.linspace(0.1, 5, 12)
    fit = stats.fit_rl(d, d * (1 - 0.5 * np.log(d)))
    assert (fit.alpha, fit.beta, fit.r2) == pytest.approx((1, 0.5, 1))
    assert stats.rl_peak(fit) == pytest.approx(math.e)


def test_fit_r2_of_noise_about_a_line_is_low():
    # a curve the form cannot follow (a step) fits worse than an exact one
    d = np.linspace(0, 3, 9)
    assert stats.fit_bon(d, (d > 1.5).astype(float)).r2 < 0.95


def test_best_of_k_curves_match_the_exact_estimator_with_ties():
    from posttrain.generate.best_of_n import best_of_k_expectation
    from posttrain.lab.overopt_bon import _curves

    rng = np.random.default_rng(0)
    rewards = rng.integers(0, 3, (5, 8)).astype(float)  # many ties
    golds = rng.random((5, 8))
    ks = [1, 2, 4, 8]
    g, r = _curves(rewards, golds, ks)
    for p in range(5):
        for j, k in enumerate(ks):
            assert g[p, j] == pytest.approx(
                best_of_k_expectation(list(rewards[p]), list(golds[p]), k)
            )
            assert r[p, j] == pytest.approx(
                best_of_k_expectation(list(rewards[p]), list(rewards[p]), k)
            )
    # k = 1 is the plain mean; k = n is the first highest-reward sample's gold
    assert g[:, 0] == pytest.approx(golds.mean(1))
    first_best = [golds[p, int(np.argmax(rewards[p]))] for p in range(5)]
    assert g[:, -1] == pytest.approx(first_best)


def test_criteria_rules_and_table():
    est = Estimate(0.12, 0.05, 0.20)
    assert at_least("a", "c", est, 0.1).passed
    assert not at_least("a", "c", est, 0.1, by="lo").passed
    assert at_most("b", "c", est, 0.25, by="hi").passed
    assert not at_most("b", "c", Estimate(math.nan, math.nan, math.nan), 1.0).passed
    table = verdict_table([at_least("a", "claim", est, 0.1), Criterion("b", "x", "r", None, False)])
    assert "| a | claim | value >= 0.1 | 0.12 [0.05, 0.2] | PASS |" in table
    assert "| b | x | r | - | FAIL |" in table


def test_seeds_are_parsed_strictly():
    from posttrain.lab.cli import parse_seeds

    assert parse_seeds("101,102, 103") == [101, 102, 103]
    for bad in ("", "1,x", "1,1", "-1"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def test_unknown_experiment_is_named():
    from posttrain.cli import main

    assert main(["lab", "run", "nope", "--quick"]) == 2


def test_lab_list(capsys):
    from posttrain.cli import main
    from posttrain.lab import EXPERIMENTS

    assert main(["lab", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in EXPERIMENTS)


def test_overopt_bon_quick(quick_lab, capsys):
    from posttrain.cli import main

    out = quick_lab
    assert main(["lab", "run", "overopt_bon", "--quick", "--seeds", "3,4", "--out", str(out)]) == 0
    result = _check_written(out / "overopt_bon", [3, 4])
    fig = result["figures"]
    assert fig["ks"] == [1, 2, 4, 8, 16]
    for label in ("small", "default", "large"):
        p = fig["proxies"][label]
        assert len(p["gold"]) == len(p["proxy"]) == 5 and set(p["per_seed"]) == {"3", "4"}
        # pooled = mean over seeds of each seed's curve
        pooled = np.mean([p["per_seed"][s]["gold"] for s in ("3", "4")], 0)
        assert [e["value"] for e in p["gold"]] == pytest.approx(pooled)
        # the proxy's best-of-k expectation cannot fall as k grows
        assert p["min_proxy_step"]["value"] >= -1e-9
        # each proxy's comparisons and gold agreement, read from its reward stage
        assert set(p["rm"]["per_seed"]) == {"3", "4"} and p["rm"]["train_pairs"] > 0
    pairs = [fig["proxies"][lb]["rm"]["train_pairs"] for lb in ("small", "default", "large")]
    assert pairs == sorted(pairs)  # more prompts ranked, more comparisons
    names = [c["name"] for c in result["criteria"]]
    assert "gold_peaks_inside[small]" in names and "peak_moves_right[large vs small]" in names
    # the seed stages are cached: a second run trains nothing again
    capsys.readouterr()
    assert main(["lab", "run", "overopt_bon", "--quick", "--seeds", "3", "--out", str(out)]) == 0
    assert "running" not in "".join(
        line for line in capsys.readouterr().err.splitlines() if "pretrain" in line or "sft" in line
    )


def test_report_links_the_lab_when_it_has_run(tmp_path):
    from posttrain.report import _lab_lines, lab_verdicts

    run_dir = tmp_path / "runs" / "toy"
    run_dir.mkdir(parents=True)
    assert lab_verdicts(run_dir) == {} and _lab_lines({"lab": {}}) == []
    folder = tmp_path / "runs" / "lab" / "overopt_bon"
    folder.mkdir(parents=True)
    crit = [{"passed": True}, {"passed": False}]
    (folder / "result.json").write_text(json.dumps({"experiment": "overopt_bon", "verdict": "FAIL",
                                                    "criteria": crit, "seeds": [0, 1], "quick": False}))  # fmt: skip
    (tmp_path / "runs" / "lab" / "broken").mkdir()
    (tmp_path / "runs" / "lab" / "broken" / "result.json").write_text("{")  # being written
    lab = lab_verdicts(run_dir)
    assert lab == {"overopt_bon": {"verdict": "FAIL", "passed": 1, "criteria": 2, "seeds": [0, 1],
                                   "quick": False, "report": "../lab/overopt_bon/report.md"}}  # fmt: skip
    lines = _lab_lines({"lab": lab})
    assert (
        "- [overopt_bon](../lab/overopt_bon/report.md): **FAIL**, 1 of 2 criteria, seeds [0, 1]"
        in lines
    )


def _synthetic_bon(alpha: float, beta: float, ks, seeds=(0, 1), P=40):
    """Per-prompt curves whose pooled gold gain is exactly d (alpha - beta d) (each prompt's
    alpha off by +-0.05, half each way, so resamples move the curve) and whose proxy rises."""
    d = np.sqrt([np.log(k) - (k - 1) / k for k in ks])
    gain = d * (alpha - beta * d)
    noise = np.where(np.arange(P) % 2, 0.05, -0.05)[:, None] * d[None, :]
    return {s: {"gold": 0.5 + gain[None, :] + noise, "proxy": d[None, :] + 0 * noise}
            for s in seeds}  # fmt: skip


def test_overopt_bon_summary_and_criteria_on_known_curves():
    from posttrain.lab.overopt_bon import _criteria, summarise

    ks = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    # small proxy: peak at d* = 0.3 / (2 x 0.25) = 0.6; large: d* = 0.3 / (2 x 0.1) = 1.5
    per_seed = {"small": _synthetic_bon(0.3, 0.25, ks), "large": _synthetic_bon(0.3, 0.1, ks)}
    fig = summarise(per_seed, ks)
    small, large = fig["proxies"]["small"], fig["proxies"]["large"]
    assert small["fit"]["alpha"] == pytest.approx(0.3) and small["fit"]["beta"] == pytest.approx(
        0.25
    )
    assert small["fit"]["d_star"] == pytest.approx(0.6) and large["fit"]["d_star"] == pytest.approx(
        1.5
    )
    assert small["r2"].value == pytest.approx(1.0)
    # the peak shift is 1.5 - 0.6 = 0.9; resamples change alpha, so the interval is around it
    assert fig["peak_shift"].value == pytest.approx(0.9)
    assert fig["peak_shift"].lo < 0.9 < fig["peak_shift"].hi
    # small: gold at d(256) = sqrt(log 256 - 255/256) = 2.149: 0.5 + 2.149 (0.3 - 0.25 x 2.149)
    # = 0.4098, peak 0.5 + 0.09 = 0.59 near d = 0.6: drop 1 - 0.4098 / peak >= 0.3
    assert small["drop_from_peak"].value > 0.25
    verdicts = {c.name: c.passed for c in _criteria(fig, ["small", "large"], ks)}
    assert verdicts == {
        "proxy_monotone[small]": True, "proxy_monotone[large]": True,
        "gold_peaks_inside[small]": True, "gold_falls[small]": True,
        "fit_r2[small]": True, "fit_beta[small]": True,
        "fit_r2[large]": True, "fit_beta[large]": True,
        "peak_moves_right[large vs small]": True,
    }  # fmt: skip
    # the same proxy twice: no shift, so that criterion fails
    same = summarise({"small": per_seed["small"], "large": per_seed["small"]}, ks)
    assert same["peak_shift"].value == pytest.approx(0.0)
    assert not {c.name: c.passed for c in _criteria(same, ["small", "large"], ks)}[
        "peak_moves_right[large vs small]"
    ]
