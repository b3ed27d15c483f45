"""`posttrain lab diagnose`: its figures against values derived by hand, and the command on a
tiny run (every family reported, the JSON written, bad input named)."""

import json

import numpy as np
import pytest

from posttrain.lab import diagnose as dg


def test_pass_at_k_is_the_mean_of_each_prompts_best_sample():
    s = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert dg.pass_at_k(s) == pytest.approx(2 / 3)


def test_pair_agreement_counts_only_gold_gaps():
    # gold (1, 0, 0, 1): gold-gap pairs (0,1) (0,2) (1,3) (2,3); rewards (3, 1, 3, 0):
    # (0,1) right, (0,2) tie 0.5, (1,3) wrong, (2,3) wrong -> 1.5 of 4
    assert dg.pair_agreement([1, 0, 0, 1], [3, 1, 3, 0]) == (1.5, 4)
    assert dg.pair_agreement([1, 1], [0, 5]) == (0.0, 0)


def test_auroc_by_hand():
    # positives (0.9, 0.4), negatives (0.4, 0.1): pairs 1, 1, tie 0.5, 1 -> 3.5 / 4
    assert dg.auroc([0.9, 0.4, 0.4, 0.1], [True, True, False, False]) == pytest.approx(0.875)
    assert np.isnan(dg.auroc([0.1, 0.2], [True, True]))


def test_modal_share_ignores_abstentions_and_case():
    texts = ["Red", "red ", "blue", "I don't know."]
    assert dg.modal_share(texts, [False, False, False, True]) == 0.5
    assert dg.modal_share(texts[3:], [True]) == 0.0


def test_subfamily():
    assert dg.subfamily({"family": "knowledge", "gold": {"known": False}}) == "knowledge/unknown"
    assert dg.subfamily({"family": "safety", "gold": {"harmful": True}}) == "safety/harmful"
    assert dg.subfamily({"family": "string", "gold": {}}) == "string"


def test_diagnose_command_on_a_tiny_run(run_tiny, tmp_path, capsys):
    from posttrain.cli import main

    _, run = run_tiny(["world", "pretrain", "sft", "sample", "rank", "reward"])
    out = tmp_path / "diag.json"
    assert (
        main(["lab", "diagnose", str(run), "--k", "3", "--per-family", "2", "--json", str(out)])
        == 0
    )
    result = json.loads(out.read_text())
    fams = set(result["families"])
    assert {"arithmetic", "string", "open"} <= fams and any(f.startswith("safety/") for f in fams)
    for r in result["families"].values():
        assert 0 <= r["greedy"] <= 1 and r["sample_mean"] <= r["pass_at_k"] + 1e-12
        assert "rm_pairs" in r
    assert "| family | greedy |" in capsys.readouterr().out
    assert main(["lab", "diagnose", str(tmp_path / "nope")]) == 2
    assert "no world/tasks_eval.jsonl" in capsys.readouterr().err
    assert main(["lab", "diagnose", str(run), "--reward", "dpo"]) == 2
    assert "--reward none" in capsys.readouterr().err
