"""midtraining: its figures against hand-derived values, the stages it derives, and the
experiment's machinery at --quick sizes (every figure and criterion produced; not that the
verdicts pass)."""

import json

import numpy as np
import pytest

from posttrain.lab import midtraining as mt


def test_stages_share_budget_schedule_and_sft_and_differ_only_in_the_mix():
    from posttrain.lab.base import Lab

    raw = Lab(out=None, seeds=[7]).config("midtraining")
    names = mt.stages(raw, 7)
    assert names[0] == "mt_world" and names[-1] == "mt_eval"
    assert raw["mt_world"]["chat_docs"] == 0 and raw["mt_world"]["seed"] == 7
    pres = [raw[f"mt_pre_{a}"] for a in mt.ARMS]
    for p in pres:
        assert p["train"]["schedule"] == "wsd" and p["train"]["decay_fraction"] == 0.2
        assert p["train"]["steps"] == pres[0]["train"]["steps"]  # the same token budget
    # decay: 0.25 of the windows over the last 20% of the steps; spread: 0.05 over all of them.
    # The same number of conversation windows: 0.25 x 0.2 = 0.05 x 1.
    assert raw["mt_pre_decay"]["midtrain"] == {"from_world": True, "start": 0.8, "fraction": 0.25}
    assert raw["mt_pre_spread"]["midtrain"] == {"from_world": True, "start": 0.0, "fraction": 0.05}
    assert "midtrain" not in raw["mt_pre_none"]
    sfts = [{k: v for k, v in raw[f"mt_sft_{a}"].items() if k != "model"} for a in mt.ARMS]
    assert sfts[0] == sfts[1] == sfts[2]


def _eval(scores_by_family: dict, events: dict | None = None) -> dict:
    """A load_eval-shaped dict: scores (P, L) per family; RATES all empty unless given."""
    fam, score = [], []
    for f, rows in scores_by_family.items():
        fam += [f] * len(rows)
        score += rows
    P, L = len(fam), len(score[0])
    out = {"score": np.array(score, float), "family": np.array(fam)}
    for name in mt.RATES:
        out[f"{name}/in"] = np.zeros(P, bool)
        out[f"{name}/event"] = np.zeros((P, L))
    for name, (inside, ev) in (events or {}).items():
        out[f"{name}/in"], out[f"{name}/event"] = np.array(inside), np.array(ev, float)
    return out


LABELS = ["base_decay", "base_spread", "base_none", "decay", "spread", "none"]


def test_gold_mean_is_the_mean_of_family_means():
    # family a: scores 1, 0 -> 0.5; family b: 1 -> 1.0; mean over families 0.75 (not 2/3).
    score = np.array([[1.0], [0.0], [1.0]])
    assert mt.gold_mean(score, np.array(["a", "a", "b"])).tolist() == [0.75]


def test_summarise_by_hand():
    # Two families of two prompts; SFT arms: decay 1,1 | 1,1 = 1.0; spread 1,0 | 1,1 = 0.75;
    # none 0,0 | 1,0 = 0.25. Differences: decay-none 0.75, spread-none 0.5, decay-spread 0.25.
    base = [0, 0, 0]
    ev = _eval({"arithmetic": [base + [1, 1, 0], base + [1, 0, 0]],
                "string": [base + [1, 1, 1], base + [1, 1, 0]]},
               {"violation": ([0, 0, 1, 1], [[0] * 6, [0] * 6, [1, 1, 1, 0, 1, 1],
                                              [1, 1, 1, 0, 0, 1]])})  # fmt: skip
    fig = mt.summarise({0: ev}, LABELS)
    d = fig["differences"]
    assert d["decay-none"].value == pytest.approx(0.75)
    assert d["spread-none"].value == pytest.approx(0.5)
    assert d["decay-spread"].value == pytest.approx(0.25)
    assert d["best_of_decay_spread-none"].value == pytest.approx(0.75)
    # violation rate over the two harmful prompts: decay 0/2, spread 1/2, none 2/2.
    rates = [fig["per_label"][lb]["violation"].value for lb in ("decay", "spread", "none")]
    assert rates == pytest.approx([0.0, 0.5, 1.0])
    crit, sentence = mt.verdict(fig, 0.0)
    assert [c.name for c in crit] == [
        "pretraining_instructions_help",
        "decay_not_worse_than_spread",
    ]
    assert sentence.startswith("Best after SFT: **decay** (gold/mean 1.000), ahead of spread "
                               "(0.750) by +0.250")  # fmt: skip


def test_midtraining_quick(quick_lab):
    from posttrain.cli import main

    assert main(["lab", "run", "midtraining", "--quick", "--seeds", "3", "--out",
                 str(quick_lab)]) == 0  # fmt: skip
    folder = quick_lab / "midtraining"
    result = json.loads((folder / "result.json").read_text())
    assert result["seeds"] == [3] and result["quick"] is True
    assert [c["name"] for c in result["criteria"]] == ["pretraining_instructions_help",
                                                       "decay_not_worse_than_spread"]  # fmt: skip
    assert set(result["figures"]["per_label"]) == set(LABELS)
    assert "Best after SFT" in (folder / "report.md").read_text()
    assert (folder / "plots" / "arms.png").is_file()
