"""The world's agent family (world/agent_tasks.py): every existing world unchanged while it is
off, what it adds when on, held-out people, gold by hand, the SFT conversations' structure (as
agent/env.py writes and parses them) and their loss mask: assistant turns only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from posttrain.config import build_pipeline
from posttrain.settings import ConfigError
from posttrain.world import AGENT_TOOLS, SPLITS, Task, World, WorldConfig, check
from posttrain.world.agent_tasks import LOOKUP_TOOL, TOOL_ERROR, check_with_tools, conversation

SMALL = {"corpus_docs": 60, "heldout_docs": 20, "n_train": 12, "n_rl": 8, "n_eval": 6,
         "chat_docs": 10, "mention_min": 2}  # fmt: skip


@pytest.fixture(scope="module")
def on() -> World:
    return World(WorldConfig(**SMALL, n_entities=200, agent={"sft_error_share": 0.5}))


def _agent(world: World, split: str) -> list[Task]:
    return world.tasks(split, "agent")


# ---- off: nothing changes -----------------------------------------------------------------


def test_off_by_default_and_left_out_of_the_resolved_config():
    assert "agent" not in WorldConfig().model_dump()
    assert "agent" not in WorldConfig(**SMALL, agent=None).model_dump(mode="json")
    pipe = build_pipeline({"stages": ["world"], "world": dict(SMALL)}, "p.yaml")
    assert "agent" not in pipe.resolved()["world"]
    assert "agent" not in pipe.world_config().model_dump(mode="json")
    # set, it is part of the world's fingerprint, defaults spelled out
    on = build_pipeline({"stages": ["world"], "world": SMALL | {"agent": {}}}, "p.yaml")
    assert on.resolved()["world"]["agent"] == {"multi_step_share": 0.5, "unknown_share": 0.5,
                                               "sft_error_share": 0.15, "sft_retry_share": 0.5}  # fmt: skip


def test_off_writes_the_same_files_and_texts_as_absent(tmp_path: Path):
    absent, off = World(WorldConfig(**SMALL)), World(WorldConfig(**SMALL, agent=None))
    a, b = absent.write(tmp_path / "absent"), off.write(tmp_path / "off")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    assert list(absent.texts()) == list(off.texts())  # the tokenizer's texts


def test_on_only_appends(tmp_path: Path, on: World):
    off = World(WorldConfig(**SMALL, n_entities=200))
    a, b = off.write(tmp_path / "off"), on.write(tmp_path / "on")
    for name in ("corpus_train", "corpus_heldout", "entities"):
        assert a[name].read_bytes() == b[name].read_bytes(), name
    for name in ("tasks_train", "tasks_rl", "tasks_eval", "sft_train"):
        before, after = a[name].read_bytes(), b[name].read_bytes()
        assert after.startswith(before) and len(after) > len(before), name  # appended
    texts_off, texts_on = list(off.texts()), list(on.texts())
    assert texts_on[: len(texts_off)] == texts_off and len(texts_on) > len(texts_off)
    assert not any(t.family == "agent" for t in off.tasks("eval"))


def test_bad_settings_are_errors_naming_the_key():
    with pytest.raises(ConfigError, match=r"world\.agent\.sft_retry_share.*world\.agent\."
                       r"sft_error_share"):  # fmt: skip
        build_pipeline({"stages": ["world"], "world": {"agent": {"sft_error_share": 0,
                                                                 "sft_retry_share": 0.9}}}, "p")  # fmt: skip
    with pytest.raises(ValueError, match="multi_step_shar"):
        WorldConfig(agent={"multi_step_shar": 0.5})
    with pytest.raises(ValueError, match="unknown_share"):
        WorldConfig(agent={"unknown_share": 1.0})


# ---- tasks --------------------------------------------------------------------------------


def test_counts_kinds_and_held_out_people(on: World):
    people = {s: {t.gold["entity"] for t in _agent(on, s)} for s in SPLITS}
    for split, n in (("train", 12), ("rl", 8), ("eval", 6)):
        ts = _agent(on, split)
        assert len(ts) == n, split
        # unknown_share 0.5, multi_step_share 0.5: half unknown people, half multi-step
        assert sum(not t.gold["known"] for t in ts) == n // 2
        assert sum(t.gold["kind"] != "lookup" for t in ts) == n // 2
        assert all(check(t, t.reference).score == 1.0 for t in ts), split
        assert ts[0].prompt_id == f"agent/{split}/00000"
    assert people["eval"].isdisjoint(people["train"] | people["rl"])
    # train and rl tool results never state a fact of a knowledge eval question's person
    knowledge_eval = {t.gold["entity"] for t in on.tasks("eval", "knowledge")}
    assert knowledge_eval.isdisjoint(people["train"] | people["rl"])
    # a prompt is never also a knowledge question (one prompt, one gold)
    questions = {t.prompt for s in SPLITS for t in on.tasks(s, "knowledge")}
    assert not questions & {t.prompt for s in SPLITS for t in _agent(on, s)}


# ---- gold by hand -------------------------------------------------------------------------

TOWN = {"kind": "lookup", "entity": "Jorpim", "attributes": ["town"], "values": ["Ashmere"],
        "answer": "Ashmere", "known": False}  # fmt: skip


def _task(gold: dict, family: str = "agent") -> Task:
    return Task("x/eval/00000", family, "eval", "Find out where Jorpim lives.", "", gold)


@pytest.mark.parametrize(
    ("gold", "response", "score", "flags"),
    [
        (TOWN, "Ashmere", 1.0, {}),
        (TOWN, "Jorpim lives in Ashmere.", 1.0, {}),
        # an unknown person, but the tool could find it: abstaining is wrong, not a hallucination
        (TOWN, "I don't know.", 0.0, {"abstained": True, "hallucinated": False}),
        (
            TOWN,
            "I don't know: the lookup failed, so I could not find out.",
            0.0,
            {"abstained": True},
        ),
        (TOWN, "Brinlow", 0.0, {"hallucinated": True}),
        (TOWN, "Ashmere or Brinlow", 0.0, {"hedged": True, "hallucinated": True}),
        (TOWN, "", 0.0, {"hallucinated": False}),  # no answer (an episode that never ended)
        (
            TOWN | {"kind": "first_letter", "answer": "a"},
            "The first letter of Ashmere is a.",
            1.0,
            {},
        ),
        (
            TOWN | {"kind": "first_letter", "answer": "a"},
            "The first letter of Ashmere is b.",
            0.0,
            {},
        ),
        (TOWN | {"kind": "n_letters", "answer": 7}, "a s h m e r e, so it has 7 letters.", 1.0, {}),
        (TOWN | {"kind": "n_letters", "answer": 7}, "It has 8 letters.", 0.0, {}),
        (
            TOWN
            | {
                "kind": "sum_letters",
                "answer": 15,
                "attributes": ["town", "pet"],
                "values": ["Ashmere", "tortoise"],
            },
            "Together they have 15 letters.",
            1.0,
            {},
        ),  # fmt: skip
    ],
)
def test_agent_gold_by_hand(gold, response, score, flags):
    c = check(_task(gold), response)
    assert c.score == score
    for k, v in flags.items():
        assert c.components[k] == v, k


def test_a_knowledge_question_with_a_lookup_tool_must_be_answered():
    g = {"entity": "Jorpim", "attribute": "town", "answer": "Ashmere", "known": False}
    t = _task(g, "knowledge")
    # without a lookup tool: the knowledge family's own rule (abstain on an unknown person)
    for tools in ([], ["calculator"]):
        assert check_with_tools(t, "I don't know.", tools).score == 1.0
        assert check_with_tools(t, "Ashmere", tools).score == 0.0
    # with one (lookup or flaky_lookup): the fact is findable, so only the fact is right
    for tools in (["lookup"], ["flaky_lookup", "calculator"]):
        assert check_with_tools(t, "I don't know.", tools).score == 0.0
        assert check_with_tools(t, "Ashmere", tools).score == 1.0
        assert check_with_tools(t.to_dict(), "Ashmere", tools).score == 1.0  # a record too


# ---- SFT conversations ----------------------------------------------------------------------


def test_schemas_and_error_are_the_agent_tools_own(on: World):
    from posttrain.agent.tools import calculator_tool, call, flaky_lookup_tool, lookup_tool

    assert lookup_tool(on).schema() == LOOKUP_TOOL
    assert AGENT_TOOLS == [LOOKUP_TOOL, calculator_tool().schema()]
    failing = flaky_lookup_tool(on, fail_share=1.0)
    assert call(failing, {"person": "X", "attribute": "town"}).content == TOOL_ERROR


def _roles(msgs: list[dict]) -> str:
    return " ".join(m["role"][0] + ("*" if m.get("tool_calls") else "") for m in msgs)


def test_conversations_by_kind(on: World):
    cfg = on.cfg.model_copy(update={"agent": on.cfg.agent.model_copy(
        update={"sft_error_share": 0.0})})  # fmt: skip
    seen = set()
    for t in _agent(on, "train") + _agent(on, "rl") + _agent(on, "eval"):
        kind, person, values = t.gold["kind"], t.gold["entity"], t.gold["values"]
        msgs = conversation(t, cfg)
        assert msgs[-1] == {"role": "assistant", "content": t.reference}
        first = msgs[1]
        calls = [c["function"] for c in first["tool_calls"]]
        assert calls == [{"name": "lookup", "arguments": {"person": person, "attribute": a}}
                         for a in t.gold["attributes"]]  # fmt: skip
        assert [m["content"] for m in msgs if m.get("name") == "lookup"] == values
        if kind == "lookup":
            assert _roles(msgs) == "u a* t a" and first["content"] == ""
        elif kind == "sum_letters":
            assert _roles(msgs) == "u a* t t a* t a"
            assert (
                first["content"].startswith("Plan:\n1. look up ")
                and "\n4. add " in first["content"]
            )
            a, b = (len(v) for v in values)
            assert msgs[4]["tool_calls"][0]["function"]["arguments"] == {
                "a": a,
                "op": "plus",
                "b": b,
            }
            assert msgs[5] == {"role": "tool", "name": "calculator", "content": str(a + b)}
        else:
            assert _roles(msgs) == "u a* t a" and first["content"].startswith("Plan:\n1. look up")
        seen.add(kind)
    assert seen == {"lookup", "first_letter", "n_letters", "sum_letters"}


def test_failed_lookups_are_retried_or_answered_with_could_not_find_out(on: World):
    examples = [e for e in on.sft_examples() if e["prompt_id"].startswith("agent/")]
    assert len(examples) == 12 and all(e["tools"] == AGENT_TOOLS for e in examples)
    outcomes = set()
    train = {t.prompt_id: t for t in on.tasks("train", "agent")}
    for e in examples:
        msgs, t = e["messages"], train[e["prompt_id"]]
        k = len(msgs[1]["tool_calls"])  # lookups of the first turn; their results follow
        if msgs[2]["content"] != TOOL_ERROR:
            assert TOOL_ERROR not in [m["content"] for m in msgs]
            continue
        retry, again = msgs[2 + k], msgs[3 + k]
        assert retry["role"] == "assistant" and retry["content"].endswith("Trying again.")
        assert retry["tool_calls"] == msgs[1]["tool_calls"][:1]  # the failed call, again
        if again["content"] == TOOL_ERROR:  # failed twice: it says it could not find out
            assert msgs[-1]["content"].startswith("I don't know: the lookup failed")
            assert check(t, msgs[-1]["content"]).components["abstained"]
            outcomes.add("gave up")
        else:
            assert again["content"] == t.gold["values"][0] and msgs[-1]["content"] == t.reference
            outcomes.add("recovered")
    assert outcomes == {"gave up", "recovered"}  # sft_error_share 0.5 of 12: both happen


def test_turns_render_and_parse_back_as_the_agent_writes_them(on: World, small_tokenizer):
    """Each assistant turn, rendered by the toy template and parsed by agent.parse_turn, gives
    back its content and calls: the SFT data is in the format the episodes produce."""
    from posttrain.agent import parse_turn, toy_tools

    tools = toy_tools(on, ["lookup", "calculator"])
    head = "<|im_start|>assistant\n"
    for e in on.sft_examples():
        if not e["prompt_id"].startswith("agent/"):
            continue
        for m in (m for m in e["messages"] if m["role"] == "assistant"):
            text = small_tokenizer.apply_chat_template([m], tokenize=False)
            turn = text[len(head) : text.index("<|im_end|>")]
            parsed = parse_turn(turn, tools)
            assert parsed.content == m["content"]
            assert [c.message() for c in parsed.tool_calls] == m.get("tool_calls", [])
            assert all(c.valid for c in parsed.tool_calls)


def test_loss_mask_covers_exactly_the_assistant_turns(on: World, small_tokenizer):
    from posttrain.data.chat import tokenize_chat

    t = next(t for t in _agent(on, "train") if t.gold["kind"] == "sum_letters")
    (a, b), (x, y) = t.gold["attributes"], t.gold["values"]
    msgs = conversation(t, on.cfg.model_copy(update={"agent": on.cfg.agent.model_copy(
        update={"sft_error_share": 0.0})}))  # fmt: skip
    p = t.gold["entity"]
    ex = tokenize_chat(small_tokenizer, {"messages": msgs, "tools": AGENT_TOOLS})
    runs, cur = [], []
    for i, m in zip(ex.input_ids, ex.loss_mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs, cur = [*runs, small_tokenizer.decode(cur)], []
    runs += [small_tokenizer.decode(cur)] if cur else []

    def call(name, args):
        return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'

    # by hand: the plan, then the two lookups; the counts, then the calculator; the answer;
    # each with its <|im_end|> and nothing else (no header, no tool result, no tools' schemas)
    assert runs == [
        msgs[1]["content"] + "\n"
        + call("lookup", f'{{"person": "{p}", "attribute": "{a}"}}') + "\n"
        + call("lookup", f'{{"person": "{p}", "attribute": "{b}"}}') + "<|im_end|>",
        msgs[4]["content"] + "\n"
        + call("calculator", f'{{"a": {len(x)}, "op": "plus", "b": {len(y)}}}') + "<|im_end|>",
        f"Together they have {len(x) + len(y)} letters.<|im_end|>",
    ]  # fmt: skip
    assert msgs[1]["content"].startswith("Plan:\n1. look up")
    # the tool results are in the input, untrained
    text = small_tokenizer.decode(ex.input_ids)
    assert f"<|im_start|>tool\n{x}<|im_end|>" in text and "You can call these tools" in text


def test_extra_people_add_only_sft_conversations_about_names_found_nowhere_else(on: World):
    from posttrain.world.lexicon import QUESTION_TEMPLATES

    cfg = WorldConfig(**SMALL, n_entities=200, agent={"sft_error_share": 0.5,
                                                      "sft_extra_people": 60})  # fmt: skip
    extra = World(cfg)
    assert "sft_extra_people" not in WorldConfig(agent={}).model_dump(mode="json")["agent"]
    for split in SPLITS:  # the task splits and the corpus are those of the world without them
        assert [t.to_dict() for t in extra.tasks(split)] == [t.to_dict() for t in on.tasks(split)]
    assert extra.corpus("train") == on.corpus("train")
    base, more = on.sft_examples(), extra.sft_examples()
    assert more[: len(base)] == base and len(more) == len(base) + 60
    added = more[len(base) :]
    assert [e["prompt_id"] for e in added] == [f"agent/sft/{k:05d}" for k in range(60)]
    names = [e["messages"][1]["tool_calls"][0]["function"]["arguments"]["person"] for e in added]
    assert len(set(names)) == 60  # one conversation per person
    others = {e.name for e in extra.entities}
    assert not set(names) & others
    corpus = set(re.findall(r"\w+", " ".join(extra.corpus("train") + extra.corpus("heldout"))))
    assert not set(names) & corpus
    for e, name in zip(added, names, strict=True):  # each question names its person
        assert name in e["messages"][0]["content"]
    knowledge = {q.format(n=n) for n in names for q in QUESTION_TEMPLATES.values()}
    asked = [e["messages"][0]["content"] in knowledge for e in added]
    assert 0 < sum(asked) < 60  # some single lookups are phrased as knowledge questions
    texts = set(extra.texts())  # the tokenizer learns their texts too
    assert all(e["messages"][0]["content"] in texts for e in added)
