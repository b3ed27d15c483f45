"""Self-instruct, answer generation and the LLM judge against a real `posttrain serve` process on
the loopback (no mock): a tiny model trained in a few seconds to reply "A" to anything, so the
judge's verdicts are known in advance."""

import json

import pytest
import torch
from helpers import one_torch_thread

from posttrain.eval.judge import Judge, JudgeConfig
from posttrain.io import read_jsonl

SEEDS = ["What is 12 plus 11?", "What is 30 plus 23?", "The cat sat on mat number 5.",
         "What is 41 plus 11?", "What is 55 plus 23?", "The cat sat on mat number 9."]  # fmt: skip
SHORT_PAIR = "{conversation}\n1: {reply_a}\n2: {reply_b}\nbetter?"


def _train_constant(tok, reply: str, steps: int = 30):
    """toy-xs trained to answer `reply` (then end its turn) whatever the user says."""
    from posttrain.models.presets import build_model

    torch.manual_seed(0)
    model = build_model("toy-xs", tok, max_position_embeddings=256, seed=0)
    target = tok(reply, add_special_tokens=False)["input_ids"] + [
        tok.convert_tokens_to_ids("<|im_end|>")
    ]
    words = "what is the cat sat on mat number plus 1 2 3 4 5 better reply".split()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = 0.0
        for _ in range(4):
            n = int(torch.randint(1, 30, (1,), generator=g))
            text = " ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=g))
            prompt = tok.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=True,
                                             return_dict=False)  # fmt: skip
            ids = torch.tensor([prompt + target])
            logits = model(ids).logits[0, len(prompt) - 1 : -1]
            loss = loss + torch.nn.functional.cross_entropy(logits, torch.tensor(target))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def server_a(small_tokenizer, tmp_path_factory):
    """A model that replies "A", behind `python -m posttrain serve` (its own process)."""
    from posttrain.models.load import save_model
    from posttrain.synth.serving import served

    folder = tmp_path_factory.mktemp("served")
    with one_torch_thread():
        save_model(_train_constant(small_tokenizer, "A"), small_tokenizer, folder / "judge_a")
        with served(folder / "judge_a", "judge-a", folder / "serve.log") as url:
            yield url


def _judge(url, cache=None, **kw):
    cfg = JudgeConfig.model_validate(
        {"client": {"url": url, "model": "judge-a"}, "pairwise_template": SHORT_PAIR} | kw
    )
    return Judge(cfg, cache)


def test_judge_position_bias_is_controlled(server_a, tmp_path):
    items = [([{"role": "user", "content": "What is 1 plus 2?"}], "3", "4"),
             ([{"role": "user", "content": "cat"}], "mat", "sat")]  # fmt: skip
    one_order = _judge(server_a, both_orders=False).compare(items)
    assert [v.winner for v in one_order] == ["1", "1"]  # it always says A: the first reply wins
    judge = _judge(server_a, tmp_path / "cache")
    both = judge.compare(items)
    # swapped, "A" is the other reply: the two orders disagree, so no verdict counts
    assert [v.winner for v in both] == ["tie", "tie"]
    assert [v.votes for v in both] == [["1", "2"], ["1", "2"]]
    assert not any(v.consistent for v in both)
    assert judge.client.stats["requests"] == 4 and judge.client.stats["cache_hits"] == 0
    again = _judge(server_a, tmp_path / "cache")
    assert [v.votes for v in again.compare(items)] == [["1", "2"], ["1", "2"]]
    assert again.client.stats["cache_hits"] == 4  # a rerun asks the server nothing
    scores = judge.score([(items[0][0], "3")])
    assert scores == [None] and judge.unreadable == 1  # "A" is no score on 1..10


def test_self_instruct_against_the_server(server_a, tmp_path):
    from posttrain.synth.self_instruct import SelfInstructConfig, generate, lineage_path

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": s}) + "\n" for s in SEEDS))
    cfg = SelfInstructConfig.model_validate({
        "teacher": {"url": server_a, "model": "judge-a"}, "seeds": str(seeds),
        "mode": "completion", "completion_header": "", "completion_item": "Q: {instruction}",
        "num_instructions": 50, "prompts_per_round": 3, "samples_per_prompt": 2,
        "max_rounds": 2, "temperature": 1.0, "top_p": 1.0, "max_tokens": 6, "min_words": 1,
        "blacklist": [], "answer_max_tokens": 4})  # fmt: skip
    out = tmp_path / "si.jsonl"
    counts = generate(cfg, out, tmp_path / "cache", log=lambda m: None)
    assert counts["rounds"] == 2 and counts["instructions_proposed"] == 12
    assert counts["instructions_kept"] + sum(counts["instructions_dropped"].values()) == 12
    records = list(read_jsonl(out))
    kept = counts["instructions_kept"] - sum(counts["answers_dropped"].values())
    assert len(records) == counts["examples_written"] == kept
    for r in records:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["messages"][1]["content"] == "A"  # the teacher's answer to anything
    lineage = json.loads(lineage_path(out).read_text())
    assert lineage["teacher"] == "judge-a" and lineage["counts"] == counts
    assert lineage["client"]["teacher"]["cache_hits"] == 0
    again = generate(cfg, tmp_path / "si2.jsonl", tmp_path / "cache", log=lambda m: None)
    lineage2 = json.loads(lineage_path(tmp_path / "si2.jsonl").read_text())["client"]["teacher"]
    assert lineage2["cache_hits"] == lineage2["requests"] > 0  # nothing asked twice
    assert list(read_jsonl(tmp_path / "si2.jsonl")) == records
    assert again["instructions_kept"] == counts["instructions_kept"]


def test_answers_against_the_server(server_a, tmp_path):
    from posttrain.synth.answers import AnswersConfig, generate_answers

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": s}) + "\n" for s in SEEDS[:3]))
    teacher = {"url": server_a, "model": "judge-a"}
    cfg = AnswersConfig.model_validate({"teacher": teacher, "prompts": str(prompts), "n": 2,
                                        "keep": "all", "max_tokens": 4})  # fmt: skip
    counts = generate_answers(cfg, tmp_path / "a.jsonl", tmp_path / "cache", log=lambda m: None)
    records = list(read_jsonl(tmp_path / "a.jsonl"))
    assert counts["answers_sampled"] == 6 and len(records) == 6 - sum(counts["dropped"].values())
    assert all(r["messages"][-1] == {"role": "assistant", "content": "A"} for r in records)
    # the judge's scores ("A") are unreadable: rejection sampling keeps nothing, and says why
    cfg = AnswersConfig.model_validate({"teacher": teacher, "prompts": str(prompts), "n": 2,
                                        "max_tokens": 4, "judge": {"client": teacher}})  # fmt: skip
    counts = generate_answers(cfg, tmp_path / "b.jsonl", tmp_path / "cache", log=lambda m: None)
    assert counts["dropped"].get("unscored") == len(records) and counts["examples_written"] == 0
    assert list(read_jsonl(tmp_path / "b.jsonl")) == []


def test_rank_with_the_judge(server_a, tmp_path):
    from types import SimpleNamespace

    from posttrain.stages.rank import build_pairs, judge_rankings

    cands = {"p1": {"messages": [{"role": "user", "content": "cat"}],
                    "responses": [{"text": "x"}, {"text": "y"}, {"text": "z"}]}}  # fmt: skip
    ctx = SimpleNamespace(stage_dir=tmp_path)
    one = JudgeConfig.model_validate({"client": {"url": server_a, "model": "judge-a"},
                                      "pairwise_template": SHORT_PAIR, "both_orders": False})  # fmt: skip
    rankings, metrics = judge_rankings(one, ctx, cands)
    # the first reply of every pair wins: candidate 0 beats 1 and 2, 1 beats 2
    assert rankings == [{"prompt_id": "p1", "annotator": "judge:judge-a", "group": "judge",
                         "order": [0, 1, 2]}]  # fmt: skip
    assert metrics["rank/judge/comparisons"] == 3 and metrics["rank/judge/ties"] == 0
    from posttrain.stages.rank import PairSettings

    assert len(build_pairs(cands, rankings, PairSettings())) == 3
    both = one.model_copy(update={"both_orders": True})
    rankings, metrics = judge_rankings(both, ctx, cands)
    assert rankings[0]["order"] == [[0, 1, 2]]  # all ties: position bias cancels out
    assert metrics["rank/judge/position_consistent"] == 0.0


def test_judge_reward_scales_scores(small_tokenizer, tmp_path):
    """JudgeReward through a local judge that always says 7: reward (7 - 1) / 9."""
    from posttrain.models.load import save_model
    from posttrain.rl.rewards import JudgeReward

    save_model(_train_constant(small_tokenizer, "7"), small_tokenizer, tmp_path / "j7")
    cfg = JudgeConfig.model_validate({"client": {"path": str(tmp_path / "j7")},
                                      "single_template": "{reply} score {low} to {high}?"})  # fmt: skip
    got = JudgeReward(cfg)([{"messages": [{"role": "user", "content": "cat"}]}] * 2, ["a", "b"])
    assert [g["reward"] for g in got] == [pytest.approx(6 / 9)] * 2
    assert [g["judge_unreadable"] for g in got] == [0.0, 0.0]


def test_win_rate_against_a_baseline(server_a, tmp_path):
    """evaluate.win_rate's judgements: a judge that always picks reply A gives the model (shown
    first) every win in one order, and only ties (win rate 0.5, LC 0.5) in both."""
    from types import SimpleNamespace

    from posttrain.stages.evaluate import WinRateSettings, judge_win_rates

    tasks = [SimpleNamespace(prompt_id=f"t{i}", messages=lambda i=i: [
        {"role": "user", "content": f"What is {i} plus 1?"}]) for i in range(6)]  # fmt: skip
    replies = {
        "base": [str(i) for i in range(6)],
        "m": [str(i + 1) * (1 + i % 3) for i in range(6)],
    }
    logger = SimpleNamespace(info=lambda m: None)
    ctx = SimpleNamespace(stage_dir=tmp_path, seed=0, logger=logger, name="evaluate")
    for both, want in ((False, 1.0), (True, 0.5)):
        settings = WinRateSettings.model_validate({"baseline": "base", "judge": {
            "client": {"url": server_a, "model": "judge-a"}, "pairwise_template": SHORT_PAIR,
            "both_orders": both}})  # fmt: skip
        got = judge_win_rates(settings, ctx, tasks, replies)
        assert set(got) == {"m"}
        assert got["m"]["judge/win_rate"][0] == pytest.approx(want)
        if both:
            assert got["m"]["judge/lc_win_rate"][0] == pytest.approx(0.5, abs=1e-6)
        rows = list(read_jsonl(tmp_path / "judge_m.jsonl"))
        assert [r["winner"] for r in rows] == (["tie"] * 6 if both else ["1"] * 6)


def test_data_generate_command(server_a, tmp_path, capsys):
    """`posttrain data generate answers` end to end against the server; a rerun asks nothing."""
    from posttrain.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 1 plus 2?"}) + "\n")
    argv = ["data", "generate", "answers", "--teacher", server_a, "--teacher-model", "judge-a",
            "--prompts", str(prompts), "--out", str(tmp_path / "out.jsonl"), "max_tokens=4",
            "temperature=0"]  # fmt: skip
    assert main(argv) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["examples_written"] == 1
    lineage = json.loads((tmp_path / "out.jsonl.lineage.json").read_text())
    assert lineage["config"]["max_tokens"] == 4 and lineage["client"]["cache_hits"] == 0
    assert main(argv) == 0
    lineage = json.loads((tmp_path / "out.jsonl.lineage.json").read_text())
    assert lineage["client"]["cache_hits"] == 1
