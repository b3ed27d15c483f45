"""Knowledge probe: which facts of a QA data set does the base model already know? SliCK
(Gekhman et al. 2405.05904, "Does fine-tuning LLMs on new knowledge encourage hallucinations?").

Each example is a question (its first user turn) and an answer (the first assistant reply after
it with text). The base model answers the question few-shot, under `prompts` different prompts:
each holds `fewshot` other examples of the same file as "Q: ...\\nA: ..." lines (the toy world's
Q/A format, `world.corpus.qa_line`, which its corpus and `World.few_shot_prompt` use), drawn at
random but deterministically (by seed, example and prompt), then "Q: {question}\\nA:". The
answer is the continuation up to the first newline; under every prompt the model answers once
greedily and `k` times at `temperature`. An answer is right when, normalised (lower case, no
punctuation, no articles, single spaces, as SQuAD's exact match), it equals the example's
answer or holds it as a whole phrase. With P_greedy the share of prompts whose greedy answer is
right and P_sample the share of the samples that are (the paper's P_correct at T = 0 and T > 0):

- HighlyKnown: P_greedy = 1 (greedy right under every prompt);
- MaybeKnown: 0 < P_greedy < 1;
- WeaklyKnown: P_greedy = 0 and P_sample > 0;
- Unknown: P_greedy = 0 and P_sample = 0.

Gekhman et al. call the first three "Known". Fine-tuning on Unknown examples is slow to fit and,
once fitted, makes the model hallucinate more on what it knew; `action` filters them out or
relabels their answers as an abstention (`relabel_text`). An example that is not QA-shaped (no
user turn followed by an assistant reply with text) gets category null and is left as it is.

The paper's settings: 10 prompts of 4 exemplars, 16 samples at T = 0.5; here 4 x 4 and 8.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import Field, model_validator

from posttrain.settings import SettingError, StrictModel, is_set

CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
ABSTAIN = "I don't know."  # the toy world's abstention (world.knowledge.ABSTAIN_REFERENCE)


class ProbeSettings(StrictModel):
    """The `sft` stage's `data.probe` (and the options of `posttrain data probe`)."""

    model: str = Field(
        description="The base model that answers: a stage of this run (its model/) or a local "
        "HF directory."
    )
    k: int = Field(8, ge=0, description="Samples per prompt at `temperature` (paper: 16).")
    temperature: float = Field(0.5, gt=0, description="Temperature of the samples (paper: 0.5).")
    fewshot: int = Field(4, ge=0, description="Exemplars per prompt, other examples of the data.")
    prompts: int = Field(4, ge=1, description="Different few-shot prompts per example (paper: 10).")
    max_new_tokens: int = Field(24, ge=1, description="Longest answer generated (tokens).")
    batch_size: int = Field(64, ge=1, description="Prompts decoded together.")
    seed: int = Field(0, ge=0, description="Seeds the exemplars and the samples.")
    action: Literal["none", "filter", "relabel"] = Field(
        "none",
        description="What to do with Unknown examples: keep them, drop them, or replace their "
        "answer by `relabel_text`.",
    )
    relabel_text: str = Field(
        ABSTAIN, min_length=1, description="action relabel: the Unknown examples' new answer."
    )

    @model_validator(mode="after")
    def _no_silent_settings(self) -> ProbeSettings:
        if self.action != "relabel" and is_set(self, "relabel_text"):
            raise SettingError("relabel_text", f"has no effect: {{at}}action is {self.action}, "
                               "not relabel; set {at}action: relabel, or drop it")  # fmt: skip
        return self


# ---------------------------------------------------------------- pure parts


class QA(NamedTuple):
    """An example's question, its answer and the index of the answer's message."""

    question: str
    answer: str
    turn: int


def qa_of(example: dict) -> QA | None:
    """The first user turn and the first assistant reply with text after it (a tool call's
    empty turn is skipped: the reply after the tool's result answers); None if there is none."""
    msgs = example["messages"]
    user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
    if user is None:
        return None
    for i in range(user + 1, len(msgs)):
        m = msgs[i]
        if m["role"] == "assistant" and (m.get("content") or "").strip():
            return QA(msgs[user]["content"].strip(), m["content"].strip(), i)
    return None


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and articles removed, spaces collapsed."""
    text = _ARTICLES.sub(" ", text.lower().replace("\u2019", "'").translate(_PUNCT))
    return " ".join(text.split())


def answer_matches(prediction: str, answer: str) -> bool:
    """The normalised prediction equals the normalised answer or holds it as a whole phrase."""
    p, a = normalize_answer(prediction), normalize_answer(answer)
    return bool(a) and (p == a or f" {a} " in f" {p} ")


def categorize(p_greedy: float, p_sample: float) -> str:
    """SliCK's category from P_correct at T = 0 (greedy, over prompts) and at T > 0 (samples)."""
    if p_greedy >= 1:
        return "HighlyKnown"
    if p_greedy > 0:
        return "MaybeKnown"
    return "WeaklyKnown" if p_sample > 0 else "Unknown"


def one_line(text: str) -> str:
    return " ".join(text.split())


def fewshot_prompt(qas: Sequence[QA | None], i: int, j: int, fewshot: int, seed: int) -> str:
    """Prompt j of example i: `fewshot` other QA examples (seeded by seed, i, j; none with the
    same question) as Q/A lines, then "Q: {question}\\nA:"."""
    pool = [
        n for n, q in enumerate(qas) if q is not None and n != i and q.question != qas[i].question
    ]
    rng = random.Random(f"slick/{seed}/{i}/{j}")  # str seeds hash with sha512: stable
    shots = rng.sample(pool, min(fewshot, len(pool)))
    lines = [f"Q: {one_line(qas[n].question)}\nA: {one_line(qas[n].answer)}\n" for n in shots]
    return "".join(lines) + f"Q: {one_line(qas[i].question)}\nA:"


def probe_record(index: int, qa: QA | None, greedy: Sequence[str], samples: Sequence[str],
                 match: Callable[[str, str], bool] = answer_matches) -> dict:  # fmt: skip
    """{"index", "category", "p_greedy", "p_sample", "answer", "greedy"} of one example from
    its greedy answers (one per prompt) and its samples (all prompts')."""
    if qa is None:
        return {"index": index, "category": None, "p_greedy": None, "p_sample": None}
    g = [match(x, qa.answer) for x in greedy]
    s = [match(x, qa.answer) for x in samples]
    p_greedy = sum(g) / len(g)
    p_sample = sum(s) / len(s) if s else 0.0
    return {"index": index, "category": categorize(p_greedy, p_sample), "p_greedy": p_greedy,
            "p_sample": p_sample, "answer": qa.answer, "greedy": list(greedy)}  # fmt: skip


def counts(records: Sequence[dict]) -> dict[str, int]:
    """probe/<category> for each category, probe/not_qa, probe/examples."""
    out = {f"probe/{c}": sum(r["category"] == c for r in records) for c in CATEGORIES}
    out["probe/not_qa"] = sum(r["category"] is None for r in records)
    out["probe/examples"] = len(records)
    return out


def apply_action(examples: Sequence[dict], records: Sequence[dict], action: str,
                 text: str = ABSTAIN) -> list[dict]:  # fmt: skip
    """The examples with Unknown ones kept (none), dropped (filter) or with their answer turn's
    content replaced by `text` (relabel); the others untouched, order kept."""
    if action not in ("none", "filter", "relabel"):
        raise ValueError(f"probe action must be none, filter or relabel, got {action!r}")
    out = []
    for ex, rec in zip(examples, records, strict=True):
        if rec["category"] != "Unknown" or action == "none":
            out.append(ex)
        elif action == "relabel":
            turn = qa_of(ex).turn
            msgs = [dict(m) for m in ex["messages"]]
            msgs[turn]["content"] = text
            out.append(dict(ex) | {"messages": msgs})
    return out


# ---------------------------------------------------------------- the model's answers


def stop_ids(tok) -> list[int]:
    """The end-of-turn tokens and every token whose text starts with a newline: the answer ends
    at the first newline, so stopping there loses nothing of it."""
    from posttrain.models.tokenizer import end_of_turn_ids

    texts = tok.batch_decode([[i] for i in range(len(tok))])
    return list(dict.fromkeys(end_of_turn_ids(tok) + [i for i, t in enumerate(texts)
                                                      if t.startswith("\n")]))  # fmt: skip


def answers(model, tok, prompts: list[str], n: int, s: ProbeSettings, greedy: bool,
            stops: list[int]) -> list[list[str]]:  # fmt: skip
    """n answers per prompt (greedy: n = 1), each cut at its first newline."""
    from posttrain.generate import SamplingParams, generate, sample_n

    params = SamplingParams(max_new_tokens=s.max_new_tokens, greedy=greedy,
                            temperature=0.0 if greedy else s.temperature, seed=s.seed,
                            batch_size=s.batch_size, stop_token_ids=stops)  # fmt: skip
    if greedy:
        groups = [[g] for g in generate(model, tok, prompts, params)]
    else:
        groups = sample_n(model, tok, prompts, n, params)
    return [[g.text.split("\n", 1)[0].strip() for g in gs] for gs in groups]


def probe_examples(model, tok, examples: Sequence[dict], s: ProbeSettings,
                   match: Callable[[str, str], bool] = answer_matches) -> list[dict]:  # fmt: skip
    """One probe_record per example (in order), from the base model's few-shot answers."""
    qas = [qa_of(ex) for ex in examples]
    asked = [i for i, q in enumerate(qas) if q is not None]
    prompts = [
        fewshot_prompt(qas, i, j, s.fewshot, s.seed) for i in asked for j in range(s.prompts)
    ]
    stops = stop_ids(tok)
    greedy = [g[0] for g in answers(model, tok, prompts, 1, s, True, stops)] if prompts else []
    sampled = answers(model, tok, prompts, s.k, s, False, stops) if prompts and s.k else []
    P = s.prompts
    by_example = {i: (greedy[n * P : (n + 1) * P],
                      [a for g in sampled[n * P : (n + 1) * P] for a in g])
                  for n, i in enumerate(asked)}  # fmt: skip
    return [probe_record(i, q, *by_example.get(i, ([], [])), match=match)
            for i, q in enumerate(qas)]  # fmt: skip


def probe_with(model_dir: str | Path, examples: Sequence[dict], s: ProbeSettings, device="cpu",
               match: Callable[[str, str], bool] = answer_matches) -> list[dict]:  # fmt: skip
    """probe_examples with the model and tokenizer loaded from `model_dir`."""
    from posttrain.models.load import load_model
    from posttrain.models.tokenizer import load_tokenizer

    model = load_model(model_dir, device).eval()
    return probe_examples(model, load_tokenizer(model_dir), examples, s, match)


def probe_data(examples: list[dict], s: ProbeSettings, model_dir: str | Path, device,
               out_dir: Path | None = None, log=None) -> tuple[list[dict], dict]:  # fmt: skip
    """What the sft stage's `data.probe` does: probe, write the categories (out_dir/probe.jsonl),
    apply `action`; returns (the examples to train on, counts)."""
    from posttrain.io import atomic_write_jsonl

    records = probe_with(model_dir, examples, s, device)
    stats = counts(records)
    if out_dir is not None:
        atomic_write_jsonl(Path(out_dir) / "probe.jsonl", records)
    kept = apply_action(examples, records, s.action, s.relabel_text)
    if log is not None:
        cats = ", ".join(f"{stats[f'probe/{c}']} {c}" for c in CATEGORIES)
        log(f"probe: {cats} of {len(examples)} examples; action {s.action}")
    return kept, stats


# ---------------------------------------------------------------- `posttrain data probe`


def add_parser(data_sub) -> None:
    p = data_sub.add_parser(
        "probe",
        help="SliCK knowledge categories of QA examples under a base model (filter/relabel)",
    )
    d = ProbeSettings.model_fields
    p.add_argument("--model", required=True, help="base model directory")
    p.add_argument("--data", required=True, help="chat data file (QA-style examples)")
    p.add_argument("--format", default="auto")
    for name in ("k", "temperature", "fewshot", "prompts", "max_new_tokens", "batch_size", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=type(d[name].default),
                       default=d[name].default, help=d[name].description)  # fmt: skip
    p.add_argument("--device", default="auto")
    p.add_argument("--categories", default=None,
                   help="per-example categories JSONL (default: DATA with suffix .probe.jsonl)")  # fmt: skip
    p.add_argument("--out", default=None, help="the data written back (messages JSONL); with no "
                   "action each record gets a 'probe' field")  # fmt: skip
    act = p.add_mutually_exclusive_group()
    act.add_argument("--filter", choices=["unknown"], default=None, help="drop Unknown examples")
    act.add_argument("--relabel-unknown", default=None, metavar="TEXT",
                     help="replace Unknown examples' answers by TEXT")  # fmt: skip


def main(args) -> int:
    import json

    from posttrain.data.readers import load_chat_data
    from posttrain.io import atomic_write_jsonl
    from posttrain.models.load import resolve_device

    action = "filter" if args.filter else "relabel" if args.relabel_unknown is not None else "none"
    if action != "none" and args.out is None:
        raise ValueError(f"data probe: --{'filter' if args.filter else 'relabel-unknown'} writes "
                         "a cleaned file: give it with --out")  # fmt: skip
    extra = {"relabel_text": args.relabel_unknown} if action == "relabel" else {}
    s = ProbeSettings(model=args.model, k=args.k, temperature=args.temperature,
                      fewshot=args.fewshot, prompts=args.prompts,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      seed=args.seed, action=action, **extra)  # fmt: skip
    examples, _ = load_chat_data(args.data, args.format, "raise")
    records = probe_with(args.model, examples, s, resolve_device(args.device))
    cats = Path(args.categories or Path(args.data).with_suffix(".probe.jsonl"))
    atomic_write_jsonl(cats, records)
    out = counts(records) | {"categories": str(cats)}
    if args.out is not None:
        if action == "none":
            keep = ("category", "p_greedy", "p_sample")
            kept = [
                ex | {"probe": {k: r[k] for k in keep}}
                for ex, r in zip(examples, records, strict=True)
            ]
        else:
            kept = apply_action(examples, records, action, s.relabel_text)
        atomic_write_jsonl(args.out, kept)
        out |= {"out": str(args.out), "written": len(kept)}
    print(json.dumps(out))
    return 0
