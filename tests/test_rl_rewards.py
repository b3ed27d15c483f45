"""Rewards for online RL: the GSM8K verifier on the real references, the toy-world verifier."""

import pytest

from posttrain.data.schema import DataError
from posttrain.rl.rewards import (
    GSM8KVerifier,
    WorldVerifier,
    gold_scores,
    gsm8k_reference,
    last_number,
    load_gsm8k_prompts,
)


def test_gsm8k_reference_and_last_number_by_hand():
    assert gsm8k_reference("so 9 * 2 = $<<9*2=18>>18 every day.\n#### 18") == "18"
    assert gsm8k_reference("#### 1,234") == "1234"
    assert gsm8k_reference("#### -5") == "-5"
    assert gsm8k_reference("#### 2.50") == "2.5"
    assert gsm8k_reference("no marker 12") is None
    assert last_number("She makes 9 * 2 = 18 dollars, or $18.00.") == "18"
    assert last_number("The answer is 1,000.") == "1000"
    assert last_number("none") is None


def test_gsm8k_verifier_on_the_real_references(shared_data):
    prompts = load_gsm8k_prompts(shared_data / "gsm8k/test.jsonl")
    assert len(prompts) == 1319
    assert prompts[0]["reference"] == "18"  # Janet's ducks: 16 - 3 - 4 = 9 eggs, 9 * 2 = $18
    # Every reference is a plain number, and the reference text itself verifies as correct.
    import json

    raw = [json.loads(x) for x in (shared_data / "gsm8k/test.jsonl").read_text().splitlines()]
    got = GSM8KVerifier()(prompts, [r["answer"] for r in raw])
    assert all(g["reward"] == 1.0 for g in got)
    wrong = GSM8KVerifier()(prompts[:2], ["I think 17", "no idea"])
    assert [g["reward"] for g in wrong] == [0.0, 0.0]


def test_gsm8k_loader_errors_name_the_line(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text('{"question": "q", "answer": "#### 3"}\n{"question": "q", "answer": "none"}\n')
    with pytest.raises(DataError, match=r"g\.jsonl:2: 'answer' has no final number"):
        load_gsm8k_prompts(f)


def test_world_verifier_and_gold():
    p = {"prompt_id": "arithmetic/rl/0", "family": "arithmetic",
         "gold": {"op": "plus", "a": 2, "b": 3, "answer": 5}}  # fmt: skip
    assert [r["reward"] for r in WorldVerifier()([p, p], ["so 5", "so 6"])] == [1.0, 0.0]
    assert gold_scores([p], ["5"]) == [1.0]
    assert gold_scores([{"prompt_id": "x"}], ["5"]) is None
    with pytest.raises(ValueError, match="not a toy-world task"):
        WorldVerifier()([{"prompt_id": "x"}], ["5"])
