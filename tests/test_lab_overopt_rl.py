"""overopt_rl: its figures against hand-derived curves, and the experiment's machinery at
--quick sizes (every figure and criterion produced, computed from the cached evaluations; not
that the verdicts pass: at toy sizes they mean nothing)."""

import json
import math

import numpy as np
import pytest

from posttrain.lab import overopt_rl as ov

STEPS = [0, 50, 100, 150, 200, 250, 300]
D_LOW = np.array([0, 0.3, 0.6, 0.9, 1.2, 1.5, 1.8])
D_HIGH = np.array([0, 0.3, 0.3, 0.6, 0.6, 0.9, 0.9])  # half as far, at points of D_LOW


def _run(d, alpha, beta, P, sign, offset=0.0):
    """(P, J, 3): log-ratio d^2 for every prompt (so d is exact), gold 0.5 + d(alpha - beta log d)
    + offset, +-0.02 by prompt (half each way: the mean is exact, resamples move it), proxy d."""
    safe = np.where(d > 0, d, 1.0)
    gold = 0.5 + offset + np.where(d > 0, d * (alpha - beta * np.log(safe)), 0.0)
    noise = sign * np.where(np.arange(P) % 2, 0.02, -0.02)[:, None]
    return np.stack([np.broadcast_to(d**2, (P, len(d))), gold[None, :] + noise,
                     np.broadcast_to(d, (P, len(d)))], -1)  # fmt: skip


def _synthetic(offset_high=0.0, seeds=(0, 1), P=40):
    """Two runs on one curve alpha 0.2, beta 0.25: kl_low to d 1.8, kl_high to d 0.9 (at d of
    kl_low's points, where the interpolation of kl_low's curve is exact)."""
    return {s: np.stack([_run(D_LOW, 0.2, 0.25, P, 1),
                         _run(D_HIGH, 0.2, 0.25, P, -1, offset_high)], 1)
            for s in seeds}  # fmt: skip


def test_gold_gap_interpolates_the_other_curve_by_d():
    # other: (d, gold) = (0, 0.5), (1, 0.7), (2, 0.6); curve points after step 0 at d 0.5, 1.5, 3:
    # at d 0.5 the other is 0.6 (gap 0.7 - 0.6 = 0.1), at 1.5 it is 0.65 (gap 0.65 - 0.65 = 0);
    # d 3 is beyond the other's reach and left out: mean gap 0.05
    other = np.array([[0, 0.5, 0], [1, 0.7, 0], [4, 0.6, 0]])  # columns: KL (= d^2), gold, proxy
    curve = np.array([[0, 0.5, 0], [0.25, 0.7, 0], [2.25, 0.65, 0], [9, 0.9, 0]])
    assert ov.gold_gap(curve, other) == pytest.approx(0.05)
    assert math.isnan(ov.gold_gap(np.array([[0, 0.5, 0], [9, 0.9, 0]]), other))


def test_measure_averages_each_prompts_samples():
    def ev(vals):  # one model: per prompt, samples of (log-ratio, gold, proxy)
        return {"sampled": [{"samples": [{"logratio": a, "gold": b, "proxy": c} for a, b, c in p]}
                            for p in vals]}  # fmt: skip

    sft = ev([[(0, 1, 0.1), (0, 0, 0.3)], [(0, 1, 0.0), (0, 1, 0.2)]])
    evals = {"low": [(0, sft), (5, ev([[(1, 0, 1), (3, 0, 2)], [(2, 1, 0), (2, 1, 1)]]))],
             "high": [(0, sft), (5, ev([[(0.5, 1, 0), (0.5, 1, 0)], [(1, 0, 0), (0, 0, 1)]]))]}  # fmt: skip
    arr, steps = ov.measure(evals)
    assert steps == [0, 5] and arr.shape == (2, 2, 2, 3)  # (P, L, J, 3)
    # prompt 0, run low, step 5: log-ratios 1 and 3 -> 2; gold 0; proxy 1 and 2 -> 1.5
    assert arr[0, 0, 1].tolist() == [2.0, 0.0, 1.5]
    assert arr[1, 1, 1].tolist() == [0.5, 0.0, 0.5]
    assert arr[0, 1, 0].tolist() == pytest.approx([0.0, 0.5, 0.2])
    with pytest.raises(ValueError, match="different steps"):
        ov.measure({"low": evals["low"], "high": evals["high"][:1]})


def test_summary_and_criteria_on_known_curves():
    labels = ["kl_low", "kl_high"]
    fig = ov.summarise(_synthetic(), labels, STEPS)
    P = fig["pooled"]
    low = fig["runs"]["kl_low"]
    # exact curve: alpha 0.2, beta 0.25, R^2 1, peak at d* = e^(0.2 / 0.25 - 1) = e^-0.2 = 0.819
    assert (low["fit"]["alpha"], low["fit"]["beta"], low["fit"]["r2"]) == pytest.approx(
        (0.2, 0.25, 1)
    )
    assert low["fit"]["d_star"] == pytest.approx(math.exp(-0.2))
    assert [e.value for e in low["d"]] == pytest.approx(D_LOW)
    # gains d(0.2 - 0.25 ln d) at d = 0.3 ... 1.8: .150 .197 .204 .185 .148 .096: peak at d 0.9
    # (index 3), gold there 0.7037, at the end 0.5955: drop 1 - 0.5955 / 0.7037 = 0.154
    assert P["peak_index[kl_low]"].value == 3
    assert P["drop_from_peak[kl_low]"].value == pytest.approx(0.1538, abs=1e-3)
    assert P["peak_gain[kl_low]"].value == pytest.approx(0.2037, abs=1e-3)
    # the proxy (= d) from the peak at d 0.9 to the end at 1.8 rises 0.9
    assert P["proxy_rise_after_peak[kl_low]"].value == pytest.approx(0.9)
    # kl_high: half the d after as many steps, on the same curve (gap 0)
    assert P["d_ratio_last[kl_high vs kl_low]"] == pytest.approx((0.5, 0.5, 0.5))
    gap = P["gold_gap_same_d[kl_high vs kl_low]"]
    assert gap.value == pytest.approx(0.0, abs=1e-9) and gap.lo < 0 < gap.hi
    # per seed: each seed is that same curve
    assert set(fig["per_seed"]) == {0, 1}
    assert fig["per_seed"][1]["stats"]["r2[kl_high]"].value == pytest.approx(1.0)
    assert fig["per_seed"][0]["curves"]["kl_high"]["d"] == pytest.approx(D_HIGH)
    verdicts = {c.name: c.passed for c in ov._criteria(fig, labels)}
    assert verdicts == {
        "gold_peaks_inside[kl_low]": True, "gold_falls[kl_low]": True,
        "proxy_keeps_rising[kl_low]": True, "fit_r2[kl_low]": True, "fit_beta[kl_low]": True,
        "fit_r2[kl_high]": True, "fit_beta[kl_high]": True,
        "kl_is_later[kl_high vs kl_low]": True, "same_curve[kl_high vs kl_low]": True,
    }  # fmt: skip
    peak = next(c for c in ov._criteria(fig, labels) if c.name == "gold_peaks_inside[kl_low]")
    assert peak.estimate.value == 150  # the step of index 3


def test_a_better_curve_at_the_same_d_is_not_the_same_curve():
    # kl_high 0.1 above the curve at every point after step 0 (step 0 is the shared SFT model,
    # so its offset is removed there): the gap at equal d is 0.1 > 0.05
    data = _synthetic(offset_high=0.1)
    for arr in data.values():
        arr[:, 1, 0, 1] -= 0.1
    fig = ov.summarise(data, ["kl_low", "kl_high"], STEPS)
    assert fig["pooled"]["gold_gap_same_d[kl_high vs kl_low]"].value == pytest.approx(0.1)
    verdicts = {c.name: c.passed for c in ov._criteria(fig, ["kl_low", "kl_high"])}
    assert not verdicts["same_curve[kl_high vs kl_low]"]


def _pooled_from_cache(seed_dir, label, step, key):
    name = "sft" if step == 0 else label
    ev = json.loads((seed_dir / "lab_ppo_eval" / name / f"step_{step:07d}.json").read_text())
    return float(np.mean([np.mean([s[key] for s in r["samples"]]) for r in ev["sampled"]]))


def test_overopt_rl_quick(quick_lab, capsys):
    from test_lab import _check_written

    from posttrain.cli import main

    out = quick_lab
    assert main(["lab", "run", "overopt_rl", "--quick", "--seeds", "3", "--out", str(out)]) == 0
    result = _check_written(out / "overopt_rl", [3])
    fig = result["figures"]
    assert fig["steps"] == [0, 2, 4] and fig["kl_coefs"] == {"kl_low": 0.05, "kl_high": 0.2}
    seed_dir = out / "seeds-quick" / "3"
    listing = [json.loads(x) for x in (seed_dir / "lab_ppo_kl_low/snapshots.jsonl").read_text().splitlines()]  # fmt: skip
    assert [r["step"] for r in listing] == [2, 4]
    for label in ("kl_low", "kl_high"):
        run = fig["runs"][label]
        assert all(len(run[k]) == 3 for k in ("kl", "gold", "proxy", "d"))
        assert set(run["fit"]) == {"alpha", "beta", "r2", "d_star"}
        for j, step in enumerate(fig["steps"]):
            # one seed: pooled = that seed's mean over prompts of the mean over their samples
            for key, name in (("logratio", "kl"), ("gold", "gold"), ("proxy", "proxy")):
                expect = _pooled_from_cache(seed_dir, label, step, key)
                assert run[name][j]["value"] == pytest.approx(expect, abs=1e-9)
            assert run["d"][j]["value"] == pytest.approx(math.sqrt(max(run["kl"][j]["value"], 0)))
        assert fig["per_seed"]["3"]["curves"][label]["gold"] == pytest.approx(
            [e["value"] for e in run["gold"]])  # fmt: skip
    # step 0 is the SFT model, with itself as reference: a log-ratio of exactly 0
    assert fig["runs"]["kl_low"]["kl"][0]["value"] == 0.0
    names = {c["name"] for c in result["criteria"]}
    assert names == {"gold_peaks_inside[kl_low]", "gold_falls[kl_low]",
                     "proxy_keeps_rising[kl_low]", "fit_r2[kl_low]", "fit_beta[kl_low]",
                     "fit_r2[kl_high]", "fit_beta[kl_high]", "kl_is_later[kl_high vs kl_low]",
                     "same_curve[kl_high vs kl_low]"}  # fmt: skip
    assert set(fig["pooled"]) == set(fig["per_seed"]["3"]["stats"])
    assert (out / "overopt_rl/plots/gold_proxy_vs_d.png").is_file()
    # a second run evaluates nothing again: the snapshots' evaluations are cached
    capsys.readouterr()
    assert main(["lab", "run", "overopt_rl", "--quick", "--seeds", "3", "--out", str(out)]) == 0
    assert "evaluating" not in capsys.readouterr().err
