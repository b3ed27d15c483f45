"""calibration_diversity: its figures against hand-derived values, and the experiment's
machinery at --quick sizes (every figure and criterion produced, and equal to what the evaluate
stage's own metrics give on the same responses; not that the verdicts pass)."""

import json
import math

import numpy as np
import pytest

from posttrain.eval.metrics import in_fit_split
from posttrain.lab import calibration_diversity as cd


def _halves(n: int) -> tuple[list[str], list[str]]:
    """n prompt ids that fall in the temperature fit half, and n in the held-out half."""
    fit, test, i = [], [], 0
    while len(fit) < n or len(test) < n:
        pid = f"arithmetic/eval/{i:05d}"
        (fit if in_fit_split(pid) else test).append(pid)
        i += 1
    return fit[:n], test[:n]


def _records(conf: float, right_per_10: int) -> list[dict]:
    """20 answerable greedy records (10 per half), each with confidence `conf`, right_per_10 of
    each half right; and one safety record (not answerable: left out)."""
    fit, test = _halves(10)
    out = [{"prompt_id": pid, "family": "arithmetic", "logprob": math.log(conf),
            "components": {"correct": i < right_per_10}}
           for half in (fit, test) for i, pid in enumerate(half)]  # fmt: skip
    return out + [{"prompt_id": "safety/eval/0", "family": "safety", "logprob": -0.1,
                   "components": {"refused": True}}]  # fmt: skip


def test_calibration_statistics_by_hand():
    # SFT: confidence 0.9, accuracy 0.8: ECE |0.8 - 0.9| = 0.1 (on either half too).
    # RL (the last snapshot): confidence 0.99, accuracy 0.7: ECE 0.29, 2.9x SFT's; 10 points
    # less accurate. Temperature scaling fit on RL's fit half: sigmoid(logit(0.99) / T) = 0.7,
    # T = 4.595 / 0.847 = 5.42; on the held-out half (also 70% right) the scaled confidence is
    # 0.7 for every answer: ECE 0, 0x SFT's held-out ECE.
    grid = [[{"greedy": _records(0.9, 8)}, {"greedy": _records(0.95, 9)},
             {"greedy": _records(0.99, 7)}]]  # fmt: skip
    table = cd.greedy_table(grid)
    assert table.shape == (20, 1, 3)  # the safety prompt left out
    stats = cd.calibration_stats(["main"], 3)
    groups = [table, table]  # two identical seeds pool to the same values
    got = {k: f(groups) for k, f in stats.items()}
    assert got["accuracy_sft"] == pytest.approx(0.8) and got["accuracy_rl"] == pytest.approx(0.7)
    assert got["accuracy_gap"] == pytest.approx(-0.1)
    assert got["ece_sft"] == pytest.approx(0.1) and got["ece_rl"] == pytest.approx(0.29)
    assert got["ece_ratio"] == pytest.approx(2.9)
    assert got["temperature_rl"] == pytest.approx(math.log(99) / math.log(7 / 3), rel=1e-4)
    assert got["ece_test_sft"] == pytest.approx(0.1)
    assert got["ece_scaled_rl"] == pytest.approx(0.0, abs=1e-5)
    assert got["ece_scaled_ratio"] == pytest.approx(0.0, abs=1e-4)


def test_per_input_diversity_by_hand():
    # two identical samples of 3 tokens, V = 10. EAD: n = 1: 3 distinct of 6 draws, expected
    # 10 (1 - 0.9^6) = 4.6856 -> 0.6403; n = 2: 2 of 4, 10 (1 - 0.9^4) = 3.439 -> 0.5816;
    # n = 3: 1 of 2, 1.9 -> 0.5263; n = 4, 5: none. Mean 0.5827. Self-BLEU 1 (identical), so
    # 1 - self-BLEU = 0; distinct-2 of "a b c" twice: 2 of 4 bigrams = 0.5; entropy (0.2+0.4)/2
    same = [{"ids": [1, 2, 3], "text": "a b c", "entropy": e} for e in (0.2, 0.4)]
    ead, div_bleu, d2, ent = cd.per_input(same, 10)
    assert ead == pytest.approx((0.64026 + 0.58157 + 0.52632) / 3, abs=1e-4)
    assert (div_bleu, d2, ent) == pytest.approx((0.0, 0.5, 0.3))
    # across inputs: the first samples of two prompts that share no token: self-BLEU 0 -> 1
    ev = {"vocab_size": 10, "sampled": [{"samples": same},
                                        {"samples": [{"ids": [4, 5], "text": "d e"}] * 2}]}  # fmt: skip
    across = cd.across_diversity(ev)
    assert across["self_bleu"] == 1.0
    assert across["distinct_2"] == pytest.approx(1.0)  # bigrams (a b), (b c), (d e): all distinct


def _div_table(curves: dict[str, list[float]], P: int = 6) -> np.ndarray:
    """(P, 1, J, 4): every prompt at the given curve (DIVERSITY order), +-0.01 by prompt."""
    arr = np.array([curves[m] for m in cd.DIVERSITY]).T  # (J, 4)
    noise = np.where(np.arange(P) % 2, 0.01, -0.01)[:, None, None]
    return (arr[None] + noise)[:, None]


def test_diversity_falls_and_monotone_criteria():
    # ead 1 -> 0.8 (a 20% fall, step by step); 1 - self-BLEU 1 -> 0.9, then up to 0.95 (a rise
    # of 0.05, ten times the prompts' spread: its interval lies above 0); entropy falls 10%
    curves = {"ead": [1.0, 0.9, 0.8], "self_bleu": [1.0, 0.9, 0.95], "distinct_2": [1, 1, 1],
              "entropy": [1.0, 0.95, 0.9]}  # fmt: skip
    sg = [_div_table(curves), _div_table(curves)]
    stats = {k: f(sg) for k, f in cd.diversity_stats(3).items()}
    assert stats["fall[ead]"] == pytest.approx(0.2)
    assert stats["fall[self_bleu]"] == pytest.approx(0.05)
    assert stats["rise[self_bleu][1]"] == pytest.approx(0.05)
    from posttrain.lab.stats import bootstrap

    pooled = {k: bootstrap(f, sg) for k, f in cd.diversity_stats(3).items()}
    fig = {"pooled": pooled, "steps": [0, 10, 20]}
    for k in ("accuracy_gap", "ece_ratio", "ece_scaled_ratio"):
        fig["pooled"][k] = bootstrap(lambda gs: 0.0, sg)
    verdicts = {c.name: c.passed for c in cd._criteria(fig, ["main"])}
    assert verdicts["diversity_falls[ead]"] and verdicts["diversity_monotone[ead]"]
    assert not verdicts["diversity_falls[self_bleu]"]
    assert not verdicts["diversity_monotone[self_bleu]"]
    assert not verdicts["diversity_falls[entropy]"] and verdicts["diversity_monotone[entropy]"]
    notes = {c.name: c.note for c in cd._criteria(fig, ["main"])}
    assert notes["diversity_monotone[self_bleu]"] == "steps 10 -> 20"


def test_calibration_diversity_quick(quick_lab):
    from test_lab import _check_written

    from posttrain.cli import main
    from posttrain.eval.diversity import diversity_metrics
    from posttrain.eval.metrics import calibration

    out = quick_lab
    argv = ["lab", "run", "calibration_diversity", "--quick", "--seeds", "3", "--out", str(out)]
    assert main(argv) == 0
    result = _check_written(out / "calibration_diversity", [3])
    fig = result["figures"]
    assert fig["steps"] == [0, 2, 4]
    names = {c["name"] for c in result["criteria"]}
    assert names == {"accuracy_within_5[kl_low vs sft]", "ece_rises[kl_low vs sft]",
                     "scaling_restores[kl_low vs sft]"} | {
        f"diversity_{what}[{m}]" for what in ("falls", "monotone") for m in cd.JUDGED}  # fmt: skip
    assert set(fig["pooled"]) == set(fig["per_seed"]["3"]["stats"])
    for f in ("calibration.png", "diversity.png"):
        assert (out / "calibration_diversity/plots" / f).is_file()
    # each figure is what the evaluate stage's own metrics give on the cached responses
    cache = out / "seeds-quick/3/lab_ppo_eval"
    for label in ("kl_low", "kl_high"):
        run = fig["runs"][label]
        for j, step in enumerate(fig["steps"]):
            name = "sft" if step == 0 else label
            ev = json.loads((cache / name / f"step_{step:07d}.json").read_text())
            cal = calibration(ev["greedy"])
            assert run["ece"][j]["value"] == pytest.approx(cal["calibration/ece"])
            assert run["accuracy"][j]["value"] == pytest.approx(cal["calibration/accuracy"])
            groups = [[s["ids"] for s in r["samples"]] for r in ev["sampled"]]
            div = diversity_metrics(groups, ev["vocab_size"])
            assert run["ead"][j]["value"] == pytest.approx(div["diversity/ead"])
            assert run["self_bleu"][j]["value"] == pytest.approx(1 - div["diversity/self_bleu"])
            assert run["across"]["ead"][j] == pytest.approx(div["diversity/across_ead"])
            assert run["across"]["self_bleu"][j] == pytest.approx(
                1 - div["diversity/across_self_bleu"])  # fmt: skip
            if step == fig["steps"][-1] and label == "kl_low":
                rl_cal = cal
            if step == 0:
                sft_cal = cal
    P = fig["pooled"]
    assert P["ece_ratio"]["value"] == pytest.approx(
        rl_cal["calibration/ece"] / sft_cal["calibration/ece"])  # fmt: skip
    if "calibration/ece_scaled" in rl_cal and "calibration/ece_test" in sft_cal:
        assert P["ece_scaled_ratio"]["value"] == pytest.approx(
            rl_cal["calibration/ece_scaled"] / sft_cal["calibration/ece_test"])  # fmt: skip
