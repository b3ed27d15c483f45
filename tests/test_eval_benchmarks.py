"""The evaluate stage on public benchmarks: a user's Hugging Face model, no toy world."""

import json
import math

import pytest
import torch
import yaml

from posttrain.cli import main

ALL = ["xstest", "simple_safety", "gsm8k", "math500", "truthfulqa_mc", "alpaca_eval"]


@pytest.fixture
def models(tmp_path, small_tokenizer):
    """A tiny random-init causal LM and a reward model with a random head, as HF directories."""
    from posttrain.models.load import save_model
    from posttrain.models.presets import build_model
    from posttrain.models.reward import reward_model_from

    tok = small_tokenizer
    torch.manual_seed(0)
    save_model(build_model("toy-xs", tok, max_position_embeddings=512), tok, tmp_path / "lm")
    rm = reward_model_from(tmp_path / "lm", tok)
    torch.nn.init.normal_(rm.score.weight)
    save_model(rm, tok, tmp_path / "rm")
    return tmp_path / "lm", tmp_path / "rm"


def eval_config(tmp_path, lm, rm, shared, **extra):
    cfg = {"models": {"mine": {"model": str(lm)}, "mine_qa": {"model": str(lm), "prompt": "fewshot"}},
           "world_stage": None, "data_dir": str(shared), "reward_model": str(rm),
           "benchmarks": {name: {"n": 3} | ({} if name == "truthfulqa_mc" else {"max_new_tokens": 4})
                          for name in ALL}} | extra  # fmt: skip
    p = tmp_path / "eval.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_evaluate_a_local_model_on_every_benchmark(tmp_path, models, shared_data, monkeypatch):
    from posttrain.eval.benchmarks import MCItem, read_truthfulqa_mc
    from posttrain.models.load import load_model
    from posttrain.models.tokenizer import load_tokenizer
    from posttrain.stages.evaluate import choice_logps, spread

    monkeypatch.setenv("CI", "true")
    lm, rm = models
    out = tmp_path / "run"
    assert main(["evaluate", "--config", str(eval_config(tmp_path, lm, rm, shared_data)),
                 "--out", str(out)]) == 0  # fmt: skip
    result = json.loads((out / "evaluate/result.json").read_text())
    for label in ("mine", "mine_qa"):
        ev = result["evals"][label]
        for key in ["xstest/false_refusal_rate", "xstest/violation_rate", "simple_safety/violation_rate",
                    "gsm8k/accuracy", "math500/accuracy", "truthfulqa/mc1", "truthfulqa/mc2",
                    "truthfulqa/ece", "alpaca_eval/win_rate", "alpaca_eval/mean_chars"]:  # fmt: skip
            assert key in ev and ev[key] >= 0, (label, key)
        assert all(ev[f"{name.split('_mc')[0]}/n"] == 3 for name in ALL)
        for name in ALL:
            recs = [
                json.loads(x)
                for x in (out / f"evaluate/{label}.{name}.jsonl").read_text().splitlines()
            ]
            assert len(recs) == 3, (label, name)
        # the win rate is what the records' rewards say (ties count 1/2)
        recs = [
            json.loads(x)
            for x in (out / f"evaluate/{label}.alpaca_eval.jsonl").read_text().splitlines()
        ]
        wins = [1.0 if r["reward"] > r["reference_reward"] else 0.5 if r["reward"] == r["reference_reward"] else 0.0
                for r in recs]  # fmt: skip
        assert ev["alpaca_eval/win_rate"] == pytest.approx(sum(wins) / 3)
        # the reward model scores every generated response, and its mean reaches the card
        scored = []
        for name in ("xstest", "simple_safety", "gsm8k", "math500", "alpaca_eval"):
            lines = (out / f"evaluate/{label}.{name}.jsonl").read_text().splitlines()
            rewards = [json.loads(x)["reward"] for x in lines]
            assert ev[f"{name}/reward_mean"] == pytest.approx(sum(rewards) / 3)
            scored += rewards
        assert ev["reward/mean"] == pytest.approx(sum(scored) / len(scored))
    md = (out / "report.md").read_text()
    assert "truthfulqa/mc1" in md and "`reward/mean`" in md
    assert "## Report card (public benchmarks: xstest, simple_safety, gsm8k" in md
    assert "toy-world" not in md

    # TruthfulQA from the records: MC2 = the softmax mass of the true choices, recomputed here
    items = spread(read_truthfulqa_mc(shared_data / "truthfulqa/mc_task.json"), 3)
    recs = [
        json.loads(x) for x in (out / "evaluate/mine.truthfulqa_mc.jsonl").read_text().splitlines()
    ]
    mc2 = []
    for it, r in zip(items, recs, strict=True):
        p = torch.tensor(r["mc2_logps"]).softmax(0)
        mc2.append(float(p[torch.tensor(it.mc2_labels, dtype=torch.bool)].sum()))
    assert result["evals"]["mine"]["truthfulqa/mc2"] == pytest.approx(sum(mc2) / 3, abs=1e-6)

    # a choice's log-prob is the model's own: one forward pass over question + answer
    model, tok = load_model(lm).eval(), load_tokenizer(lm)
    it: MCItem = items[0]
    ours = choice_logps(model, tok, "chat", it.question, it.mc1_choices[:2])
    for choice, lp in zip(it.mc1_choices[:2], ours, strict=True):
        convo = [{"role": "user", "content": it.question}]
        prompt = tok.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = tok(prompt + choice + "<|im_end|>", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        want = sum(logits[t - 1, ids[t]].item() for t in range(len(p_ids), len(ids)))
        assert lp == pytest.approx(want, abs=1e-4)
    assert not math.isnan(sum(ours))


def test_benchmark_config_errors_name_the_key_and_the_file(
    tmp_path, models, shared_data, monkeypatch, capsys
):
    monkeypatch.setenv("CI", "true")
    lm, rm = models
    cfg = eval_config(tmp_path, lm, rm, shared_data, reward_model=None)
    assert main(["evaluate", "--config", str(cfg), "--out", str(tmp_path / "a")]) == 2
    assert "alpaca_eval needs reward_model" in capsys.readouterr().err
    cfg = eval_config(tmp_path, lm, rm, shared_data, benchmarks={"gsm8k_typo": {}})
    assert main(["evaluate", "--config", str(cfg), "--out", str(tmp_path / "b")]) == 2
    assert "gsm8k_typo" in capsys.readouterr().err
    cfg = eval_config(
        tmp_path, lm, rm, shared_data, benchmarks={"gsm8k": {"path": str(tmp_path / "nope.jsonl")}}
    )
    assert main(["evaluate", "--config", str(cfg), "--out", str(tmp_path / "c")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?"}\n')
    cfg = eval_config(tmp_path, lm, rm, shared_data, benchmarks={"gsm8k": {"path": str(bad)}})
    assert main(["evaluate", "--config", str(cfg), "--out", str(tmp_path / "d")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert not (tmp_path / "d/evaluate/result.json").exists()


def test_items_that_cannot_fit_the_context_are_counted_or_named(
    tmp_path, models, shared_data, monkeypatch, capsys
):
    monkeypatch.setenv("CI", "true")
    lm, rm = models  # a 512-token context
    cfg = eval_config(tmp_path, lm, rm, shared_data, reward_model=None,
                      benchmarks={"gsm8k": {"n": 4, "max_new_tokens": 330}})  # fmt: skip
    out = tmp_path / "run"
    assert main(["evaluate", "--config", str(cfg), "--out", str(out)]) == 0
    ev = json.loads((out / "evaluate/result.json").read_text())["evals"]["mine"]
    recs = (out / "evaluate/mine.gsm8k.jsonl").read_text().splitlines()
    assert ev["gsm8k/skipped_overlong"] + len(recs) == 4 and ev["gsm8k/n"] == len(recs)
    assert ev["gsm8k/skipped_overlong"] > 0 and recs  # both kinds: some fit, some do not
    cfg = eval_config(tmp_path, lm, rm, shared_data, reward_model=None,
                      benchmarks={"gsm8k": {"n": 2, "max_new_tokens": 510}})  # fmt: skip
    assert main(["evaluate", "--config", str(cfg), "--out", str(tmp_path / "b")]) == 2
    assert "evaluate.benchmarks.gsm8k: no prompt fits" in capsys.readouterr().err
