"""World: builds entities, tasks and corpora from a WorldConfig and writes them as JSONL."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from posttrain.io import atomic_write_jsonl
from posttrain.world.agent_tasks import (
    AGENT,
    CALCULATOR_TOOL,
    agent_items,
    extra_sft_tasks,
    sft_example,
    tokenizer_texts,
)
from posttrain.world.config import WorldConfig, make_rng
from posttrain.world.corpus import CorpusSources, build_corpus, exact_facts, qa_line, sampled_facts
from posttrain.world.knowledge import Entity, knowledge_items, make_entities, question
from posttrain.world.lexicon import ATTRIBUTE_VALUES, ATTRIBUTES, PROSE_WORDS
from posttrain.world.requests import allocate, open_items, safety_items, sft_safety
from posttrain.world.skills import (
    arith_instances,
    arith_item,
    make_words,
    string_instances,
    string_item,
)
from posttrain.world.task import FAMILIES, SPLITS, Task

N_WORDS = 2000  # made-up words for string tasks and the corpus
N_LISTS = 2000  # digit lists for the sort task


def _reserved_words() -> set[str]:
    """Lowercase words that generated names and made-up words must not collide with."""
    words = {v.lower() for values in ATTRIBUTE_VALUES.values() for v in values}
    return words | {w for values in PROSE_WORDS.values() for v in values for w in v.split()}


class World:
    """A seeded synthetic world: the same config always gives byte-identical outputs."""

    def __init__(self, cfg: WorldConfig | None = None):
        self.cfg = cfg or WorldConfig()
        reserved = _reserved_words()
        self.entities: list[Entity] = make_entities(self.cfg, reserved)
        reserved |= {e.name.lower() for e in self.entities}
        words = make_words(make_rng(self.cfg.seed, "words"), N_WORDS, reserved)
        rng = make_rng(self.cfg.seed, "tasks", "skills")
        arith = arith_instances()
        strings = string_instances(rng, words, N_LISTS)
        rng.shuffle(arith)
        rng.shuffle(strings)
        items = {
            "arithmetic": allocate([arith_item(i) for i in arith], self.cfg),
            "string": allocate([string_item(i) for i in strings], self.cfg),
            "knowledge": knowledge_items(self.cfg, self.entities),
            "safety": safety_items(self.cfg),
            "open": open_items(self.cfg),
        }
        self._extra_agent: list[Task] = []
        if self.cfg.agent is not None:  # after the others: their tasks and ids stay the same
            banned = {g["entity"] for _, _, g in items["knowledge"]["eval"]}
            items[AGENT] = agent_items(self.cfg, self.entities, banned)
            self._extra_agent = extra_sft_tasks(self.cfg, reserved | set(words))
        self._tasks = self._make_tasks(items)
        self._sources = self._corpus_sources(arith, strings)
        self._corpus: dict[str, list[str]] = {}

    @staticmethod
    def _make_tasks(items: dict[str, dict[str, list[tuple]]]) -> dict[str, list[Task]]:
        tasks: dict[str, list[Task]] = {split: [] for split in SPLITS}
        owner: dict[str, str] = {}
        for family in (f for f in (*FAMILIES, AGENT) if f in items):
            for split in SPLITS:
                for i, (prompt, reference, gold) in enumerate(items[family][split]):
                    pid = f"{family}/{split}/{i:05d}"
                    if prompt in owner:
                        raise AssertionError(f"prompt {prompt!r} in both {owner[prompt]} and {pid}")
                    owner[prompt] = pid
                    tasks[split].append(Task(pid, family, split, prompt, reference, gold))
        return tasks

    def _corpus_sources(self, arith: list[tuple], strings: list[tuple]) -> CorpusSources:
        """Everything the corpus may say: no eval instance, no unknown entity, no safety text."""
        banned = {t.prompt for t in self._tasks["eval"]}
        arith_items = [(i, arith_item(i)) for i in arith]
        string_items = [(i, string_item(i)) for i in strings]
        known = [e for e in self.entities if e.known]
        # Every fact of a known entity, eval questions included: "known" means the corpus states
        # it, in several phrasings and in question-answer form, as the web states a famous
        # fact. Only the SFT/RL/eval splits are kept apart; skills keep eval instances out.
        knowledge_qa = [
            (question(e, a), e.attributes[a], e.mentions) for e in known for a in ATTRIBUTES
        ]
        return CorpusSources(
            entities=known,
            arith=[i for i, (p, _, _) in arith_items if p not in banned],
            strings=[i for i, (p, _, _) in string_items if p not in banned],
            qa={
                "arithmetic": [(p, r) for _, (p, r, _) in arith_items if p not in banned],
                "string": [(p, r) for _, (p, r, _) in string_items if p not in banned],
            },
            knowledge_qa=knowledge_qa,
            qa_weights=[
                {"mentions": float(m), "sqrt": m**0.5, "uniform": 1.0}[self.cfg.qa_weighting]
                for _, _, m in knowledge_qa
            ],
        )

    def corpus(self, split: str = "train") -> list[str]:
        """Pre-training documents: "train", or "heldout" (same distribution, disjoint docs)."""
        if split not in ("train", "heldout"):
            raise ValueError(f"corpus split must be 'train' or 'heldout', got {split!r}")
        if split not in self._corpus:
            rng = make_rng(self.cfg.seed, "corpus", split)
            src = self._sources
            if split == "train":
                docs = build_corpus(rng, src, self.cfg.corpus_docs, exact_facts(rng, src.entities))
            else:
                n_train_facts = len(ATTRIBUTES) * sum(e.mentions for e in src.entities)
                n = max(1, round(n_train_facts * self.cfg.heldout_docs / self.cfg.corpus_docs))
                facts = sampled_facts(rng, src.entities, n)
                train = set(self.corpus("train"))
                docs = build_corpus(rng, src, self.cfg.heldout_docs, facts)
                docs = [d for d in docs if d not in train]  # disjoint document sets
            self._corpus[split] = docs
        return self._corpus[split]

    def tasks(self, split: str, family: str | None = None) -> list[Task]:
        if split not in SPLITS:
            raise ValueError(f"task split must be one of {SPLITS}, got {split!r}")
        if family is not None and family not in (*FAMILIES, AGENT):
            raise ValueError(f"family must be one of {(*FAMILIES, AGENT)}, got {family!r}")
        return [t for t in self._tasks[split] if family is None or t.family == family]

    def sft_examples(self) -> list[dict[str, Any]]:
        """One chat example per train task: the user prompt and the reference reply.

        Every `tool_every`-th arithmetic task is instead a tool-use conversation: the assistant
        calls a calculator, reads the tool's result, then answers. With `sft_refusal_share` set,
        the safety train tasks are left out and refusals and contrast examples in those shares
        come last instead (requests.sft_safety); the task splits stay as they are. With `agent`
        set, each agent train task is a multi-turn tool-use conversation (agent_tasks.py), and
        so is each of its `sft_extra_people` made-up people's task (after the train tasks).
        """
        out = []
        mix = self.cfg.sft_refusal_share is not None
        for i, t in enumerate(self._tasks["train"]):
            if mix and t.family == "safety":
                continue
            reply = {"role": "assistant", "content": t.reference}
            if t.family == AGENT:
                out.append(sft_example(t, self.cfg))
            elif t.family == "arithmetic" and self.cfg.tool_every and i % self.cfg.tool_every == 0:
                out.append(
                    {"prompt_id": t.prompt_id, "tools": [CALCULATOR_TOOL], "messages": _tool_use(t)}
                )
            else:
                out.append({"prompt_id": t.prompt_id, "messages": [*t.messages(), reply]})
        out += [sft_example(t, self.cfg) for t in self._extra_agent]
        return out + (self._sft_safety(len(out)) if mix else [])

    def _sft_safety(self, n_other: int) -> list[dict[str, Any]]:
        """requests.sft_safety as chat examples: a train task's prompt keeps its id, any other
        prompt is safety/sft/<k>."""
        ids = {t.prompt: t.prompt_id for t in self.tasks("train", "safety")}
        return [{"prompt_id": ids.get(p, f"safety/sft/{k:05d}"),
                 "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
                for k, (p, r, _) in enumerate(sft_safety(self.cfg, n_other))]  # fmt: skip

    def chat_conversations(self) -> list[list[dict[str, str]]]:
        """`cfg.chat_docs` short user/assistant conversations drawn from what the corpus may say
        (no eval instance, no unknown entity, no refusal or abstention), for pre-training
        documents in chat form: the mid-training practice of showing a base model the chat
        format, so that SFT teaches behaviour rather than the format's special tokens."""
        rng = make_rng(self.cfg.seed, "corpus", "chat")
        src = self._sources
        weights = src.qa_weights
        convs = []
        for _ in range(self.cfg.chat_docs):
            msgs = []
            for _ in range(rng.randint(1, 3)):
                kind = rng.choice(("arithmetic", "string", "knowledge"))
                if kind == "knowledge":
                    q, a, _ = rng.choices(src.knowledge_qa, weights=weights)[0]
                else:
                    q, a = rng.choice(src.qa[kind])
                msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            convs.append(msgs)
        return convs

    def few_shot_prompt(self, task: Task, k: int = 3) -> str:
        """k train examples of the task's family as Q/A lines, then "Q: {prompt}\\nA:".

        The model's continuation up to the first newline is its answer.
        """
        pool = [t for t in self.tasks("train", task.family) if t.prompt != task.prompt]
        rng = make_rng(self.cfg.seed, "fewshot", task.prompt_id)
        shots = rng.sample(pool, min(k, len(pool)))
        return (
            "".join(qa_line(t.prompt, t.reference) + "\n" for t in shots) + f"Q: {task.prompt}\nA:"
        )

    def texts(self) -> Iterator[str]:
        """Every text the world produces: corpus docs, prompts, references, few-shot prompts;
        the tokenizer's training texts. With `agent` set, last, the agent tasks' prompts and
        references and their SFT conversations' texts, tool schemas and calls as the chat
        template writes them (agent_tasks.tokenizer_texts): learnt, they take a third of the
        tokens (a system turn with the two schemas: ~430 tokens with the tokenizer of a world
        without them, ~180 with them), so that a conversation fits a 512-token toy model."""
        yield from self.corpus("train")
        yield from self.corpus("heldout")
        for split in SPLITS:
            for t in self._tasks[split]:
                if t.family != AGENT:
                    yield t.prompt
                    yield t.reference
                    yield self.few_shot_prompt(t)
        if self.cfg.agent is not None:
            yield from tokenizer_texts(
                [t for s in SPLITS for t in self.tasks(s, AGENT)],
                [sft_example(t, self.cfg) for t in self.tasks("train", AGENT) + self._extra_agent],
            )

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write every artifact as JSONL, each file atomically; return name -> path."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        records: dict[str, Iterable[dict[str, Any]]] = {
            "corpus_train": ({"text": d} for d in self.corpus("train")),
            "corpus_heldout": ({"text": d} for d in self.corpus("heldout")),
            **{f"tasks_{s}": (t.to_dict() for t in self._tasks[s]) for s in SPLITS},
            "sft_train": self.sft_examples(),
            "entities": (e.to_dict() for e in self.entities),
        }
        return {
            name: atomic_write_jsonl(out_dir / f"{name}.jsonl", recs)
            for name, recs in records.items()
        }


def _tool_use(t: Task) -> list[dict[str, Any]]:
    g = t.gold
    call = {
        "type": "function",
        "function": {"name": "calculator", "arguments": {"a": g["a"], "op": g["op"], "b": g["b"]}},
    }
    return [
        *t.messages(),
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": "calculator", "content": str(g["answer"])},
        {"role": "assistant", "content": str(g["answer"])},
    ]
