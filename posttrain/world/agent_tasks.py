"""Agentic tasks: requests a tool-using assistant answers by calling `lookup` (and `calculator`),
and the multi-turn SFT conversations that show it how. On with WorldConfig.agent (AgentSettings).

Kinds (gold["kind"]); every person may be known (in the corpus) or unknown (never there):
- lookup:       "Find out where Jorpim lives."  -> lookup(Jorpim, town) -> "Ashmere" -> "Ashmere"
- first_letter: "What is the first letter of the town where Jorpim lives?"
                -> "Plan:\\n1. look up Jorpim's town\\n2. take its first letter" + lookup
                -> "The first letter of Ashmere is a."
- n_letters:    "How many letters are in the name of Jorpim's pet?"
                -> plan + lookup -> "tortoise is spelled t o r t o i s e, so it has 8 letters."
- sum_letters:  "How many letters are in the names of the town where Jorpim lives and Jorpim's
                pet together?" -> plan + two lookups in one turn -> the counts and
                calculator(7, plus, 8) -> "Together they have 15 letters."

Gold (checkers.check_agent): the final value, whether the person is known or not: with a
`lookup` tool every fact can be found, so "I don't know" is wrong here (unlike the knowledge
family, asked without tools). `check_with_tools` applies the same rule to a knowledge task
asked with a lookup tool available.

Splits: people, not facts, are held out: a split's tasks are about its own people (known and
unknown apart), and an eval person is never in a train or rl task. The train and rl people are
also never people of the knowledge family's eval tasks: a tool result in SFT data states the
fact, which would otherwise teach the answer to a held-out knowledge question (an unknown
person's above all). The phrasings differ from the knowledge family's questions (a prompt has
one gold), and are shared by the splits.

SFT conversations (`conversation`) are in the chat format the toy template renders: assistant
`tool_calls` of {"type": "function", "function": {"name", "arguments"}}, then one
{"role": "tool", "name", "content"} message per call, as agent/env.py writes them. In a share
(sft_error_share) of them the first lookup fails with flaky_lookup's error; the assistant tries
again, and the retry succeeds (sft_retry_share of those) or fails too and it answers that it
could not find out ("I don't know: ...", an abstention).

The corpus never holds these tasks; the tokenizer learns their texts (`tokenizer_texts`), so
that the tool schemas in the system turn do not fill a small model's context.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import combinations
from typing import Any

from posttrain.world.checkers import check, check_agent
from posttrain.world.config import WorldConfig, make_rng
from posttrain.world.knowledge import Entity, make_names
from posttrain.world.lexicon import ATTRIBUTE_VALUES, ATTRIBUTES, QUESTION_TEMPLATES
from posttrain.world.task import Check, Task

AGENT = "agent"  # the family
KINDS = ("lookup", "first_letter", "n_letters", "sum_letters")  # gold["kind"]

CALCULATOR_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Add or subtract two whole numbers.",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer"},
                "op": {"type": "string"},
                "b": {"type": "integer"},
            },
            "required": ["a", "op", "b"],
        },
    },
}
# The schema of agent.tools.lookup_tool (tests/test_world_agent.py checks they are the same).
LOOKUP_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": f"Look up a person's {', '.join(ATTRIBUTES[:-1])} or {ATTRIBUTES[-1]}.",
        "parameters": {
            "type": "object",
            "properties": {"person": {"type": "string"}, "attribute": {"type": "string"}},
            "required": ["person", "attribute"],
        },
    },
}
AGENT_TOOLS = [LOOKUP_TOOL, CALCULATOR_TOOL]  # the tools of every agent SFT conversation
LOOKUP_NAMES = ("lookup", "flaky_lookup")  # tools that can find any person's facts
# What agent/env.py's tool message says when flaky_lookup fails (agent.tools.FLAKY_ERROR).
TOOL_ERROR = "error: the directory service is unavailable for this request"

LOOKUP_PROMPTS = {  # none is a knowledge question (lexicon.QUESTION_TEMPLATES)
    "town": ("Find out where {n} lives.", "Which town does {n} live in?"),
    "occupation": ("Find out what {n} does for a living.", "What is the job of {n}?"),
    "colour": ("Find out the favourite colour of {n}.", "Which colour does {n} like best?"),
    "pet": ("Find out what pet {n} has.", "What kind of pet does {n} keep?"),
}
NOUNS = {"town": "the town where {n} lives", "occupation": "{n}'s job",
         "colour": "{n}'s favourite colour", "pet": "{n}'s pet"}  # fmt: skip
FACT_WORDS = {"town": "town", "occupation": "job", "colour": "favourite colour", "pet": "pet"}
OP_PROMPTS = {
    "first_letter": "What is the first letter of {x}?",
    "n_letters": "How many letters are in the name of {x}?",
    "sum_letters": "How many letters are in the names of {x} and {y} together?",
}
OP_STEPS = {
    "first_letter": ["take its first letter"],
    "n_letters": ["count its letters"],
    "sum_letters": ["count the letters of each", "add the two counts with the calculator"],
}


def _spelled(value: str) -> str:
    return " ".join(value.lower())


def answer(kind: str, values: list[str]) -> str | int:
    if kind == "lookup":
        return values[0]
    if kind == "first_letter":
        return values[0][0].lower()
    return sum(len(v) for v in values)  # n_letters (one value), sum_letters (two)


def final_reply(kind: str, values: list[str]) -> str:
    """The assistant's last message once it has the values (the task's reference)."""
    v = values[0]
    if kind == "lookup":
        return v
    if kind == "first_letter":
        return f"The first letter of {v} is {v[0].lower()}."
    if kind == "n_letters":
        return f"{v} is spelled {_spelled(v)}, so it has {len(v)} letters."
    return f"Together they have {answer(kind, values)} letters."


def agent_item(entity: Entity, kind: str, attrs: tuple[str, ...],
               phrasing: int) -> tuple[str, str, dict[str, Any]]:  # fmt: skip
    """(prompt, reference, gold) of one agent task about `entity`."""
    n = entity.name
    if kind == "lookup":
        prompt = LOOKUP_PROMPTS[attrs[0]][phrasing].format(n=n)
    else:
        xs = [NOUNS[a].format(n=n) for a in attrs]
        prompt = OP_PROMPTS[kind].format(x=xs[0], y=xs[-1])
    values = [entity.attributes[a] for a in attrs]
    gold = {"kind": kind, "entity": n, "attributes": list(attrs), "values": values,
            "answer": answer(kind, values), "known": entity.known, "mentions": entity.mentions,
            "tools": ["lookup", "calculator"] if kind == "sum_letters" else ["lookup"]}  # fmt: skip
    return prompt, final_reply(kind, values), gold


def _instances(people: list[Entity]) -> tuple[list[tuple], list[tuple]]:
    """(single lookups, multi-step requests) about these people: (entity, kind, attributes)."""
    lookups = [(e, "lookup", (a,)) for e in people for a in ATTRIBUTES]
    multi = [
        (e, k, (a,)) for e in people for k in ("first_letter", "n_letters") for a in ATTRIBUTES
    ]
    multi += [(e, "sum_letters", pair) for e in people for pair in combinations(ATTRIBUTES, 2)]
    return lookups, multi


def _allot(people: list[Entity], banned: set[str], counts: dict[str, int]) -> dict[str, list]:
    """People per split in proportion to its tasks; those of `banned` (the knowledge family's
    eval people) go to eval first and never to train or rl."""
    total = sum(counts.values()) or 1
    n_eval = max(1, round(len(people) * counts["eval"] / total)) if counts["eval"] else 0
    ordered = [e for e in people if e.name in banned] + [e for e in people if e.name not in banned]
    out = {"eval": ordered[:n_eval]}
    rest = [e for e in ordered[n_eval:] if e.name not in banned]
    n_rl = round(len(rest) * counts["rl"] / max(1, counts["rl"] + counts["train"]))
    out["rl"], out["train"] = rest[:n_rl], rest[n_rl:]
    return out


def agent_items(cfg: WorldConfig, entities: list[Entity], banned: set[str]) -> dict[str, list]:
    """(prompt, reference, gold) per split, capped by the instances its people allow.

    banned: names of the people the knowledge family's eval tasks ask about."""
    settings = cfg.agent
    rng = make_rng(cfg.seed, "tasks", AGENT)
    counts = {"eval": cfg.n_eval, "rl": cfg.n_rl, "train": cfg.n_train}
    n_unknown = {s: round(n * settings.unknown_share) for s, n in counts.items()}
    if counts["eval"] >= 2:  # eval holds both kinds of people
        n_unknown["eval"] = min(max(n_unknown["eval"], 1), counts["eval"] - 1)
    n_multi = {s: round(n * settings.multi_step_share) for s, n in counts.items()}
    n_known_multi = dict.fromkeys(counts, 0)
    out: dict[str, list] = {s: [] for s in counts}
    for known in (True, False):
        people = [e for e in entities if e.known == known]
        rng.shuffle(people)
        group = {s: n - n_unknown[s] if known else n_unknown[s] for s, n in counts.items()}
        for split, chosen in _allot(people, banned, group).items():
            lookups, multi = _instances(chosen)
            rng.shuffle(lookups)
            rng.shuffle(multi)
            if known:  # multi-step tasks: round(share x group) about known people ...
                m = n_known_multi[split] = round(group[split] * settings.multi_step_share)
            else:  # ... the rest of the split's round(share x n) about unknown ones
                m = min(group[split], max(0, n_multi[split] - n_known_multi[split]))
            picked = lookups[: group[split] - m] + multi[:m]
            out[split] += [agent_item(e, k, a, rng.randrange(2)) for e, k, a in picked]
    for items in out.values():
        rng.shuffle(items)
    return out


def extra_sft_tasks(cfg: WorldConfig, reserved: set[str]) -> list[Task]:
    """AgentSettings.sft_extra_people made-up people (names not in `reserved`, lowercase), one
    train-split task each, only for SFT conversations (prompt ids agent/sft/<k>): a single
    lookup (phrased as a lookup request or, a third of them, as the knowledge family's
    question) or, a multi_step_share of them, a multi-step request."""
    settings = cfg.agent
    rng = make_rng(cfg.seed, "agent", "extra_people")
    out = []
    for k, name in enumerate(make_names(rng, settings.sft_extra_people, reserved)):
        person = Entity(name, {a: rng.choice(v) for a, v in ATTRIBUTE_VALUES.items()}, False, 0)
        if rng.random() < settings.multi_step_share:
            kind = rng.choice(KINDS[1:])
            attrs = tuple(rng.sample(ATTRIBUTES, 2 if kind == "sum_letters" else 1))
            prompt, reference, gold = agent_item(person, kind, attrs, 0)
        else:
            attr = rng.choice(ATTRIBUTES)
            phrasing = rng.randrange(3)
            prompt, reference, gold = agent_item(person, "lookup", (attr,), phrasing % 2)
            if phrasing == 2:
                prompt = QUESTION_TEMPLATES[attr].format(n=name)
        out.append(Task(f"{AGENT}/sft/{k:05d}", AGENT, "train", prompt, reference, gold))
    return out


# ---- SFT conversations --------------------------------------------------------------------


def _call(name: str, arguments: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _lookup(person: str, attribute: str) -> dict:
    return _call("lookup", {"person": person, "attribute": attribute})


def plan(kind: str, person: str, attrs: list[str]) -> str:
    """A multi-step request's to-do list, the assistant's content before its first call."""
    steps = [f"look up {person}'s {FACT_WORDS[a]}" for a in attrs] + OP_STEPS[kind]
    return "Plan:\n" + "\n".join(f"{i}. {s}" for i, s in enumerate(steps, 1))


def gave_up(person: str, attribute: str) -> str:
    """What the assistant answers when the lookup failed twice: an abstention."""
    return f"I don't know: the lookup failed, so I could not find out {person}'s " \
           f"{FACT_WORDS[attribute]}."  # fmt: skip


def conversation(task: Task, cfg: WorldConfig) -> list[dict[str, Any]]:
    """The messages of one agent SFT conversation (user, then assistant and tool turns)."""
    g, settings = task.gold, cfg.agent
    person, attrs, values = g["entity"], g["attributes"], g["values"]
    rng = make_rng(cfg.seed, "agent", "sft", task.prompt_id)
    fails = rng.random() < settings.sft_error_share
    recovers = rng.random() < settings.sft_retry_share
    msgs: list[dict[str, Any]] = [*task.messages()]
    first = "" if g["kind"] == "lookup" else plan(g["kind"], person, attrs)
    msgs.append({"role": "assistant", "content": first,
                 "tool_calls": [_lookup(person, a) for a in attrs]})  # fmt: skip
    results = [TOOL_ERROR if fails and i == 0 else v for i, v in enumerate(values)]
    msgs += [{"role": "tool", "name": "lookup", "content": r} for r in results]
    if fails:
        retry = f"The lookup of {person}'s {FACT_WORDS[attrs[0]]} failed. Trying again."
        msgs += [{"role": "assistant", "content": retry, "tool_calls": [_lookup(person, attrs[0])]},
                 {"role": "tool", "name": "lookup",
                  "content": values[0] if recovers else TOOL_ERROR}]  # fmt: skip
        if not recovers:
            return [*msgs, {"role": "assistant", "content": gave_up(person, attrs[0])}]
    if g["kind"] == "sum_letters":
        counts = " and ".join(f"{v} has {len(v)} letters ({_spelled(v)})" for v in values)
        a, b = (len(v) for v in values)
        msgs += [{"role": "assistant", "content": counts + ".",
                  "tool_calls": [_call("calculator", {"a": a, "op": "plus", "b": b})]},
                 {"role": "tool", "name": "calculator", "content": str(a + b)}]  # fmt: skip
    return [*msgs, {"role": "assistant", "content": task.reference}]


def sft_example(task: Task, cfg: WorldConfig) -> dict[str, Any]:
    return {"prompt_id": task.prompt_id, "tools": AGENT_TOOLS,
            "messages": conversation(task, cfg)}  # fmt: skip


def tokenizer_texts(tasks: list[Task], examples: list[dict[str, Any]]) -> Iterator[str]:
    """The agent tasks' prompts and references, and each SFT example's tool schemas, message
    texts and tool calls written as the toy chat template writes them (`tool | tojson`, and
    '{"name": ..., "arguments": ...}' in a <tool_call> block)."""
    for t in tasks:
        yield t.prompt
        yield t.reference
    for ex in examples:
        yield from (json.dumps(tool, ensure_ascii=False) for tool in ex["tools"])
        for m in ex["messages"]:
            yield m["content"]
            for c in m.get("tool_calls", []):
                f = c["function"]
                yield f'{{"name": {json.dumps(f["name"])}, "arguments": {json.dumps(f["arguments"])}}}'


def as_lookup(task: Task | dict[str, Any]) -> dict[str, Any]:
    """A knowledge task's gold as an agent lookup's: the fact, whether the person is known or
    not (what the right answer is once a lookup tool can find it)."""
    g = task.gold if isinstance(task, Task) else task["gold"]
    return {"kind": "lookup", "entity": g["entity"], "attributes": [g["attribute"]],
            "values": [g["answer"]], "answer": g["answer"], "known": g["known"]}  # fmt: skip


def check_with_tools(task: Task | dict[str, Any], response: str, tools: list[str]) -> Check:
    """Gold of a response given with these tools available: a knowledge question is an agent
    lookup when a lookup tool (LOOKUP_NAMES) is among them (abstaining is then wrong);
    anything else is scored by `check` as usual."""
    family = task.family if isinstance(task, Task) else task["family"]
    if family == "knowledge" and set(LOOKUP_NAMES) & set(tools):
        return check_agent(as_lookup(task), response)
    return check(task, response)
