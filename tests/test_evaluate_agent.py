"""Evaluating agents: the agent/* metrics by hand from synthetic trajectories, their intervals,
the transcript in the report's samples, the evaluate setting (off: left out of the resolved
config), and the evaluate stage end to end on a tiny world with a tiny model."""

from __future__ import annotations

import json

import pytest

from posttrain.agent import Trajectory
from posttrain.eval.agent import (
    agent_intervals,
    agent_record,
    agent_samples,
    summarize_agent,
    transcript,
)
from posttrain.settings import ConfigError
from posttrain.stages.evaluate import Config
from posttrain.world import Task

TOOLS = ["lookup", "calculator"]


def _task(i: int, family: str, gold: dict) -> Task:
    return Task(f"{family}/eval/{i:05d}", family, "eval", f"question {i}", "", gold)


def _lookup(answer, known=False, kind="lookup", attribute="town") -> dict:
    return {"kind": kind, "entity": "Jorpim", "attributes": [attribute], "values": ["Ashmere"],
            "answer": answer, "known": known}  # fmt: skip


def _traj(answer: str, finished: bool, turns: int, calls: int, invalid: int = 0, errors: int = 0,
          n_tokens: int = 3) -> Trajectory:  # fmt: skip
    return Trajectory(
        messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}],
        final_answer=answer, finished=finished, truncated=not finished,
        stop_reason="answer" if finished else "max_turns", turns=turns, n_tool_calls=calls,
        n_invalid_calls=invalid, n_tool_errors=errors, render_mismatches=0, prompt_len=2,
        token_ids=[0] * (2 + n_tokens), action_mask=[0, 0] + [1] * n_tokens,
        logprobs=[0.0] * (2 + n_tokens),
    )  # fmt: skip


# five episodes: (task, trajectory); gold by hand on the right
EPISODES = [
    # an unknown person's town, looked up and answered: right
    (_task(0, "agent", _lookup("Ashmere")), _traj("Ashmere", True, 2, 1)),
    # two facts' letters: stopped at max_turns with calls pending (1 of its 3 calls invalid):
    # no answer, wrong even though its last text holds the number
    (_task(1, "agent", _lookup(15, kind="sum_letters")), _traj("15", False, 2, 3, invalid=1)),
    # a first letter, after a lookup that failed once: the wrong letter
    (_task(2, "agent", _lookup("a", kind="first_letter")), _traj("It is b.", True, 3, 2, errors=1)),
    # a knowledge question about an unknown person, with a lookup tool: abstaining is wrong
    (
        _task(
            3,
            "knowledge",
            {"entity": "Jorpim", "attribute": "colour", "answer": "teal", "known": False},
        ),
        _traj("I don't know.", True, 1, 0),
    ),  # fmt: skip
    # a known person's job, looked up: right
    (
        _task(
            4,
            "knowledge",
            {"entity": "Vekpli", "attribute": "occupation", "answer": "baker", "known": True},
        ),
        _traj("baker", True, 2, 1, n_tokens=8),
    ),  # fmt: skip
]


@pytest.fixture
def records() -> list[dict]:
    return [agent_record(t, tr, TOOLS) for t, tr in EPISODES]


def test_records_by_hand(records):
    assert [r["score"] for r in records] == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert records[1]["response"] == "" and records[1]["stop_reason"] == "max_turns"
    assert records[3]["components"]["abstained"] and not records[3]["components"]["hallucinated"]
    assert records[2]["components"]["hallucinated"]  # answered, wrong
    assert [r["kind"] for r in records] == ["lookup", "sum_letters", "first_letter", "knowledge",
                                            "knowledge"]  # fmt: skip
    assert records[4]["n_tokens"] == 8 and records[0]["tools"] == TOOLS
    json.dumps(records)  # a JSONL record


def test_metrics_by_hand(records):
    m = summarize_agent(records)
    assert m["agent/success_rate"] == pytest.approx(2 / 5)
    assert m["agent/tool_calls_per_task"] == pytest.approx((1 + 3 + 2 + 0 + 1) / 5)
    assert m["agent/tool_use_rate"] == pytest.approx(4 / 5)
    assert m["agent/turns_per_task"] == pytest.approx((2 + 2 + 3 + 1 + 2) / 5)
    assert m["agent/invalid_call_rate"] == pytest.approx(1 / 7)  # of 7 calls made
    assert m["agent/tool_error_rate"] == pytest.approx(1 / 6)  # of the 6 valid ones
    assert m["agent/no_answer_rate"] == pytest.approx(1 / 5)
    # per kind, over the agent family's tasks only
    assert (m["agent/success/lookup"], m["agent/success/sum_letters"],
            m["agent/success/first_letter"]) == (1.0, 0.0, 0.0)  # fmt: skip
    assert "agent/success/knowledge" not in m
    # the usual gold metrics, with the tools rule: 1 of 3 agent tasks, 1 of 2 knowledge ones
    assert m["agent/gold/agent"] == pytest.approx(1 / 3)
    assert m["agent/gold/knowledge"] == pytest.approx(1 / 2)
    assert m["agent/gold/mean"] == pytest.approx((1 / 3 + 1 / 2) / 2)  # mean of family means
    assert m["agent/knowledge/known_accuracy"] == 1.0
    assert m["agent/knowledge/unknown_abstain_rate"] == 1.0  # here a failure
    assert m["agent/length/mean_tokens"] == pytest.approx((3 * 4 + 8) / 5)
    assert m["agent/length/truncated_rate"] == 0.0  # no turn cut at max_new_tokens


def test_no_call_made_leaves_the_per_call_rates_out():
    t, tr = EPISODES[3]
    m = summarize_agent([agent_record(t, tr, TOOLS)])
    assert m["agent/tool_calls_per_task"] == 0.0
    assert "agent/invalid_call_rate" not in m and "agent/tool_error_rate" not in m


def test_intervals_hold_the_value_and_pair_over_the_same_tasks(records):
    m = summarize_agent(records)
    ci, diff = agent_intervals(records)
    assert diff == {}
    for key in ("agent/success_rate", "agent/tool_calls_per_task", "agent/invalid_call_rate",
                "agent/no_answer_rate", "agent/gold/agent", "agent/gold/mean"):  # fmt: skip
        lo, hi = ci[key]
        assert lo - 1e-9 <= m[key] <= hi + 1e-9, key
    assert ci["agent/success_rate"][0] < ci["agent/success_rate"][1]  # 2 of 5: not degenerate
    # against itself: a difference of exactly 0 on every resample
    _, same = agent_intervals(records, records)
    assert same["agent/success_rate"] == [0.0, 0.0, 0.0]
    # against a model right on every task: 0.4 - 1, paired, so the interval is tight around it
    right = [r | {"score": 1.0} for r in records]
    _, d = agent_intervals(records, right)
    assert d["agent/success_rate"][0] == pytest.approx(-0.6)
    assert d["agent/success_rate"][1] <= -0.6 <= d["agent/success_rate"][2]


def test_transcript_and_samples():
    msgs = [
        {"role": "user", "content": "How many letters are in the name of Jorpim's pet?"},
        {"role": "assistant", "content": "Plan:\n1. look up Jorpim's pet\n2. count its letters",
         "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": {
             "person": "Jorpim", "attribute": "pet"}}}]},
        {"role": "tool", "name": "lookup", "content": "cat"},
        {"role": "assistant", "content": "cat is spelled c a t, so it has 3 letters."},
    ]  # fmt: skip
    assert transcript(msgs) == (
        "Plan:\n1. look up Jorpim's pet\n2. count its letters\n"
        '-> lookup {"person": "Jorpim", "attribute": "pet"}\n'
        "<- lookup: cat\n"
        "cat is spelled c a t, so it has 3 letters."
    )
    recs = [agent_record(t, tr, TOOLS) for t, tr in EPISODES]
    rows = agent_samples(recs, 1)
    assert [r["family"] for r in rows] == ["agent (with tools)", "knowledge (with tools)"]
    assert rows[0]["messages"] == EPISODES[0][1].messages and rows[0]["response"] == "Ashmere"


# ---- the evaluate setting -------------------------------------------------------------------


def test_off_by_default_and_left_out_of_the_resolved_config():
    from posttrain.config import build_pipeline

    assert "agent" not in Config().model_dump(mode="json")
    pipe = build_pipeline({"stages": ["world", "evaluate"]}, "p.yaml")
    assert "agent" not in pipe.resolved()["evaluate"]
    on = Config(agent={}).model_dump(mode="json")["agent"]
    assert on == {"tools": ["lookup", "calculator"], "families": ["agent"], "max_turns": 4,
                  "max_new_tokens": 96, "time_limit_s": 5.0, "samples_per_family": 2}  # fmt: skip


def test_bad_agent_settings_are_errors_naming_the_key():
    from posttrain.config import build_pipeline

    def build(section: dict):
        return build_pipeline({"stages": ["world", "evaluate"], "evaluate": section}, "p.yaml")

    with pytest.raises(ConfigError, match=r"evaluate\.agent.*evaluate\.world_stage is null"):
        build({"world_stage": None, "benchmarks": {"gsm8k": {}}, "agent": {}})
    with pytest.raises(ConfigError, match=r"evaluate\.agent.*no"):
        build({"models": {"base": {"model": "pretrain", "prompt": "fewshot"}}, "agent": {}})
    with pytest.raises(ConfigError, match="families"):
        build({"agent": {"families": ["agents"]}})
    with pytest.raises(ConfigError, match="max_turns"):
        build({"agent": {"max_turns": 0}})


# ---- end to end -----------------------------------------------------------------------------

# vocab 1024 (not 400): the two tools' schemas take ~210 tokens of the 512-token context, not ~470
EVAL = """
world: {agent: {}, vocab_size: 1024}
evaluate:
  max_new_tokens: 4
  n_per_family: 4
  diversity: {n_prompts: 0}
  agent: {families: [agent, knowledge], max_turns: 2, max_new_tokens: 12, samples_per_family: 1}
"""


def _scripted_agent(run):
    """A stand-in for the decoder of agent/env.py: a right agent, from the task's gold. Turn 1
    calls lookup on the task's (first) fact; turn 2 answers. The tools really run."""
    from posttrain.generate.decode import Generation
    from posttrain.io import read_jsonl

    def generate(model, tok, prompts, params):
        tasks = {t["prompt"]: t for t in read_jsonl(run / "world/tasks_eval.jsonl")}
        out = []
        for ids in prompts:
            text = tok.decode(ids)
            task = tasks[text.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]]
            g = task["gold"]
            if "<|im_start|>tool" not in text:
                person, attribute = g["entity"], g.get("attribute") or g["attributes"][0]
                args = json.dumps({"person": person, "attribute": attribute})
                reply = f'<tool_call>\n{{"name": "lookup", "arguments": {args}}}\n</tool_call>'
            else:  # the agent family's reference, or a knowledge question's fact
                reply = task["reference"] if task["family"] == "agent" else g["answer"]
            ids_out = tok(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
            out.append(Generation(reply, ids_out, [-0.1] * len(ids_out), True, False, ids))
        return out

    return generate


def test_evaluate_runs_every_chat_model_with_tools(tmp_path, run_tiny, monkeypatch):
    import posttrain.agent.env as env

    monkeypatch.setattr(env, "generate", _scripted_agent(tmp_path / "run"))
    report, run = run_tiny(["world", "pretrain", "sft", "evaluate"], EVAL)
    base, sft = report["evals"]["base"], report["evals"]["sft"]
    assert not any(k.startswith("agent/") for k in base)  # few-shot: no chat, no tools
    assert "gold/agent" not in sft  # the plain evaluation leaves the agent family out
    records = [json.loads(x) for x in (run / "evaluate/sft.agent.jsonl").read_text().splitlines()]
    assert [r["family"] for r in records] == ["knowledge"] * 4 + ["agent"] * 4
    tasks = {t["prompt_id"]: t for t in map(json.loads, (run / "world/tasks_eval.jsonl")
                                            .read_text().splitlines())}  # fmt: skip
    for r in records:
        g = tasks[r["prompt_id"]]["gold"]
        value = g["values"][0] if "values" in g else g["answer"]
        # the world's lookup ran: its result is the fact, for known and unknown people
        assert r["messages"][2] == {"role": "tool", "name": "lookup", "content": value}
        assert (r["turns"], r["n_tool_calls"], r["stop_reason"]) == (2, 1, "answer")
    assert {tasks[r["prompt_id"]]["gold"]["known"] for r in records} == {True, False}
    # every answer right (an unknown person's fact included: tools were there), 1 call, 2 turns
    assert (sft["agent/success_rate"], sft["agent/tool_calls_per_task"],
            sft["agent/turns_per_task"]) == (1.0, 1.0, 2.0)  # fmt: skip
    assert (sft["agent/no_answer_rate"], sft["agent/invalid_call_rate"],
            sft["agent/tool_error_rate"]) == (0.0, 0.0, 0.0)  # fmt: skip
    # the stage's figures are the records' (and carry intervals)
    m = summarize_agent(records)
    for key in ("agent/success_rate", "agent/tool_calls_per_task", "agent/turns_per_task",
                "agent/no_answer_rate", "agent/gold/agent", "agent/gold/knowledge"):  # fmt: skip
        assert sft[key] == pytest.approx(m[key]), key
        lo, hi = sft["ci95"][key]
        assert lo - 1e-9 <= sft[key] <= hi + 1e-9, key
    rows = [r for r in report["samples"]["sft"] if r["family"].endswith("(with tools)")]
    assert len(rows) == 2 and all(r["messages"] for r in rows)
    assert "-> lookup" in rows[0]["response"] and "<- lookup" in rows[0]["response"]
    assert "### agent (with tools)" in (run / "report.md").read_text()
