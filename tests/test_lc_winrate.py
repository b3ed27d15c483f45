"""The length-controlled win rate (eval/lc_winrate.py) against hand-derived values, its
identities (no length signal: LC = raw; a win that is all length: LC = 1/2), the AlpacaEval
reader, and the command on the real AlpacaEval annotations."""

import json
import math

import numpy as np
import pytest

from posttrain.cli import main
from posttrain.data.schema import DataError
from posttrain.eval import lc_winrate as lc


def logit(p):
    return math.log(p / (1 - p))


def test_l1_shrinks_an_intercept_by_one_over_C_n():
    # One column of ones, n = 100 rows of soft label 0.75. The objective |b| + C n [log(1 + e^b)
    # - 0.75 b] is smallest where C n (sigmoid(b) - 0.75) + sign(b) = 0: sigmoid(b) = 0.75 -
    # 1 / (C n) = 0.65 at C = 0.1. At C = 0.03, C n |0.5 - 0.75| = 0.75 < 1: b = 0 exactly.
    X, y = np.ones((100, 1)), np.full(100, 0.75)
    assert lc.sigmoid(lc.fit_l1_logistic(X, y, 0.1)[0]) == pytest.approx(0.65, abs=1e-9)
    assert lc.fit_l1_logistic(X, y, 0.03)[0] == 0.0
    # a weight w per row is C * w: weight 2 at C = 0.05 is the C = 0.1 case
    assert lc.sigmoid(lc.fit_l1_logistic(X, y, 0.05, np.full(100, 2.0))[0]) == pytest.approx(0.65)


def test_l1_optimum_satisfies_its_optimality_conditions():
    # At the optimum g = C X'(p - y) equals -sign(b_j) where b_j != 0 and |g_j| <= 1 where
    # b_j = 0; a column of zeros keeps b_j = 0. Random design with near-collinear columns.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 5))
    X[:, 3] = X[:, 0] + 1e-3 * rng.normal(size=300)
    X[:, 4] = 0.0
    y = lc.sigmoid(X[:, :3] @ np.array([1.0, -2.0, 0.1]) + rng.normal(size=300))
    for C in (0.01, 0.1, 1.0, 100.0, 1e4):
        b = lc.fit_l1_logistic(X, y, C)
        g = C * X.T @ (lc.sigmoid(X @ b) - y)
        assert lc.kkt_residual(g, b) < 1e-6 * max(1.0, C)
        assert b[4] == 0.0
    assert np.all(lc.fit_l1_logistic(X, y, 1e-4) == 0)  # C tiny: everything shrunk to 0


def test_l1_quadratic_by_hand():
    # min 1/2 v'Hv + c'v + |v|_1, H = diag(2, 1), c = (-3, 0.5): per coordinate, v1 = (3 - 1)
    # / 2 = 1 and |c2| < 1 gives v2 = 0.
    v = lc.l1_quadratic(np.diag([2.0, 1.0]), np.array([-3.0, 0.5]), np.zeros(2))
    assert v == pytest.approx([1.0, 0.0])


def test_std_tanh_is_zero_without_spread():
    assert np.all(lc.std_tanh(np.array([3.0, 3.0, 3.0])) == 0)
    d = np.array([-1.0, 1.0])  # std (ddof 1) = sqrt(2): tanh(+-1/sqrt(2))
    assert lc.std_tanh(d) == pytest.approx(np.tanh(d / math.sqrt(2)))


def _judgements(delta, pref, model="m", instr=None):
    instr = list(range(len(delta))) if instr is None else instr
    return lc.Judgements(instr, [model] * len(delta), pref, delta)


def test_a_glm_that_fits_exactly_is_recovered_and_lc_is_its_value_at_equal_length():
    # 200 judgements: delta +-1 alternating (std 1.0025 with ddof 1), difficulty gamma 0 or 1
    # every second pair; soft labels exactly sigmoid(0.5 + 1.0 tanh(delta / std) - 1.0 gamma).
    # The model is right, so at C = 1e6 the fit returns (0.5, 1, -1) to within ~1e-5, and LC
    # = mean sigmoid(0.5 - gamma) = (sigmoid(0.5) + sigmoid(-0.5)) / 2 = 1/2 exactly.
    n = 200
    delta = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    gamma = np.where((np.arange(n) // 2) % 2 == 0, 0.0, 1.0)
    t = np.tanh(delta / np.std(delta, ddof=1))
    pref = lc.sigmoid(0.5 + 1.0 * t - 1.0 * gamma)
    fit = lc.fit_glm(_judgements(delta, pref), dict(enumerate(gamma)), C=1e6)
    assert (fit.theta, fit.phi, fit.psi) == pytest.approx((0.5, 1.0, -1.0), abs=1e-4)
    assert fit.lc == pytest.approx(0.5, abs=1e-5)
    assert fit.raw == pytest.approx(pref.mean())


def test_no_length_signal_lc_equals_raw():
    # preference 0.7 whatever the length difference: phi = 0 and theta = logit(0.7), so LC =
    # raw = 0.7 (up to the L1 shrinkage at the C chosen by cross-validation, < 1e-3 here)
    delta = np.linspace(-50, 80, 120)
    fit = lc.fit_glm(_judgements(delta, np.full(120, 0.7)))
    assert fit.raw == pytest.approx(0.7)
    assert fit.lc == pytest.approx(0.7, abs=1e-3)
    assert abs(fit.phi) < 1e-3


def test_a_win_that_is_all_length_has_lc_one_half():
    # 80 of 100 judgements with the model longer (delta +1), 20 shorter (-1): mean 0.6, std
    # (ddof 1) sqrt(64 / 99) = 0.804, tanh(1 / 0.804) = 0.8464. The judge prefers the longer
    # reply with probability sigmoid(2 * 0.8464) = 0.8446: raw = 0.8 * 0.8446 + 0.2 * 0.1554
    # = 0.7068, all of it from length; at equal length it is a coin toss: LC = 1/2.
    delta = np.array([1.0] * 80 + [-1.0] * 20)
    pref = lc.sigmoid(2 * np.tanh(delta / math.sqrt(64 / 99)))
    fit = lc.fit_glm(_judgements(delta, pref))
    assert fit.raw == pytest.approx(0.8 * 0.8446 + 0.2 * 0.1554, abs=1e-4)
    assert fit.lc == pytest.approx(0.5, abs=0.01)


def test_gamed_baselines_pin_phi_where_the_model_alone_cannot():
    # The model is always 10 words longer give or take 1: tanh(delta / std) is 1 for every
    # judgement, as is the theta column, so its own data cannot tell theta from phi, and L1
    # puts everything on theta (LC = raw = 0.73). The gamed baseline (no theta term) shows
    # that +10 words alone wins sigmoid(1) = 0.73 and -10 words loses as much: with it, phi
    # explains the win and LC is back near 1/2.
    rng = np.random.default_rng(0)
    delta = 10 + rng.uniform(-1, 1, 100)
    pref = np.full(100, lc.sigmoid(1.0))
    j = _judgements(delta, pref)
    alone = lc.fit_glm(j, C=1e4)
    assert alone.lc == pytest.approx(alone.raw, abs=0.02)
    gd = np.concatenate([delta, -delta])
    gamed = lc.Judgements(list(range(100)) * 2, ["verbose"] * 100 + ["concise"] * 100,
                          lc.sigmoid(np.sign(gd)), gd)  # fmt: skip
    fit = lc.fit_glm(j, gamed=gamed, C=1e4)
    assert fit.lc == pytest.approx(0.5, abs=0.03) and fit.phi > 0.9


def test_instruction_difficulty_of_a_joint_fit_that_is_exact():
    # Two models on 30 instructions, every length equal (the length terms are 0), soft labels
    # sigmoid(theta_m + gamma_i) with gamma_0 = 0 (the reference level): at C = 1e6 the joint
    # fit returns every gamma_i; at the C cross-validation picks (167) each is shrunk by L1,
    # by about 1 / (C * 2 rows * p(1 - p)) ~ 0.03.
    rng = np.random.default_rng(1)
    gamma = np.concatenate([[0.0], rng.normal(0, 1, 29)])
    rows = [(i, m, lc.sigmoid(th + gamma[i])) for m, th in (("a", 0.4), ("b", -0.8))
            for i in range(30)]  # fmt: skip
    j = lc.Judgements([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                      np.zeros(60))  # fmt: skip
    got = lc.instruction_difficulty(j, Cs=[1e6])
    assert [got[i] for i in range(30)] == pytest.approx(list(gamma), abs=1e-4)
    got = lc.instruction_difficulty(j)
    assert [got[i] for i in range(30)] == pytest.approx(list(gamma), abs=0.05)
    with pytest.raises(ValueError, match="two or more models"):
        lc.instruction_difficulty(j.take(j.model == "a"))


def test_length_controlled_per_model_with_intervals():
    rng = np.random.default_rng(2)
    rows = []
    for i in range(40):
        for m, bias in (("short", -20.0), ("long", 30.0)):
            d = bias + rng.normal(0, 10)
            rows.append((i, m, float(rng.random() < lc.sigmoid(0.05 * d)), d))
    j = lc.Judgements(*map(list, zip(*rows, strict=True)))
    out = lc.length_controlled(j, n_boot=50)
    for m in ("short", "long"):
        r = out[m]
        assert r["raw"][0] == pytest.approx(j.preference[j.model == m].mean())
        assert r["raw"][1] <= r["raw"][0] <= r["raw"][2]
        assert r["lc"][1] <= r["lc"][2] and r["n"] == 40
    none = lc.length_controlled(j, difficulty=None, n_boot=0)
    assert math.isnan(none["long"]["lc"][1]) and none["long"]["psi"] == 0.0


def _annotation(pref, g1="base", g2="m", o1="aaaa", o2="bb", instr="x"):
    return {"instruction": instr, "output_1": o1, "generator_1": g1, "output_2": o2,
            "generator_2": g2, "preference": pref, "annotator": "judge"}  # fmt: skip


def test_read_alpaca_eval_by_hand(tmp_path):
    # preference 2: output_2 (the model) wins; 1: the baseline; 0 and 1.5: a tie; 1.25: a
    # weighted annotator's 0.25; null: no judgement. The model as output_1 is flipped.
    recs = [_annotation(2, instr="a"), _annotation(1, instr="b"), _annotation(0, instr="c"),
            _annotation(1.5, instr="d"), _annotation(1.25, instr="e"),
            _annotation(None, instr="f"), _annotation(2, "m", "base", "ccc", "d", "g")]  # fmt: skip
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(recs))
    j, info = lc.read_alpaca_eval(path)
    assert info == {"baseline": "base", "annotators": {"judge": 7}, "records": 7}
    assert list(j.preference[:5]) == [1.0, 0.0, 0.5, 0.5, 0.25]
    assert math.isnan(j.preference[5]) and j.preference[6] == 0.0  # baseline (output_2) won
    assert list(j.delta_len) == [-2] * 6 + [2]  # characters: model minus baseline
    assert set(j.model) == {"m"}
    path.write_text(json.dumps([_annotation(3)]))
    with pytest.raises(DataError, match=r"annotations.json:record 0: preference 3 outside"):
        lc.read_alpaca_eval(path)
    path.write_text(json.dumps([_annotation(1, g1="x", g2="y")]))
    with pytest.raises(DataError, match="neither generator is the baseline 'base'"):
        lc.read_alpaca_eval(path, "base")


def test_command_on_the_real_alpaca_eval_annotations(shared_data, tmp_path, capsys):
    # AlpacaEval 1 (annotator alpaca_eval_gpt4, baseline text_davinci_003): 205 wins, 584
    # losses, 16 ties of alpaca-7b: raw = (205 + 16 / 2) / 805 = 26.4596%, the leaderboard's
    # win_rate (tatsu-lab/alpaca_eval@cd543a1 src/alpaca_eval/leaderboards/data_AlpacaEval/
    # alpaca_eval_gpt4_leaderboard.csv, row alpaca-7b: 26.459627329192543). Its LC there is
    # 26.29, with AlpacaEval's instruction difficulty and gamed baselines that are not here:
    # ours, without them, lies within a point of it.
    path = shared_data / "alpaca_eval/results/alpaca-7b/alpaca_eval_gpt4/annotations.json"
    out = tmp_path / "lc.json"
    argv = ["data", "lc-winrate", "--annotations", str(path), "--n-boot", "30", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "baseline: text_davinci_003" in printed and "| alpaca-7b | 805 | 26.46 [" in printed
    r = json.loads(out.read_text())["results"]["alpaca-7b"]
    assert r["raw"][0] == pytest.approx(213 / 805)
    assert r["lc"][0] == pytest.approx(0.2629, abs=0.01)
    assert r["phi"] > 0  # longer wins (AlpacaEval's sign is the opposite: baseline - model)
    # two models against the same baseline: the instruction difficulty is fit jointly
    two = tmp_path / "two.json"
    recs = json.loads(path.read_text())[:60]
    two.write_text(json.dumps(recs + [r | {"generator_2": "copy"} for r in recs]))
    assert main(["data", "lc-winrate", "--annotations", str(two), "--n-boot", "0"]) == 0
    assert "difficulty: joint fit on every model" in capsys.readouterr().out
    assert main([*argv[:4], "--lambda", "0.5"]) == 2
    assert "--lambda weighs the --gamed judgements" in capsys.readouterr().err
