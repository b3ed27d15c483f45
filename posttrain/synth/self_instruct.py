"""Self-Instruct (Wang et al. 2212.10560): a teacher model writes new instructions and answers.

From a pool of seed tasks, each round builds prompts from a few sampled instructions (by
default 6 seeds and 2 of the machine-written ones so far, as the paper does) and asks the
teacher for a new one, either

- `mode: completion` (the paper's way, with a base model): a numbered list the teacher
  continues ("Come up with a series of tasks:\\n1. ...\\n8. ...\\n9."), one line per sample; or
- `mode: chat` (an instruction-tuned teacher): one user message that shows the examples and
  asks for one new task.

New instructions are filtered, with a count per reason: empty, too few or too many words,
blacklisted words (the paper's: image, graph, file, map, draw, plot, video, audio, music,
flowchart, diagram...), starting with punctuation or a non-ASCII character, and near
duplicates: ROUGE-L >= 0.7 against any instruction already in the pool (seeds included). The
answerer (by default the teacher, as a chat model) then answers each kept instruction; empty
answers, answers cut by max_tokens and answers that repeat the instruction are dropped. The
output is a chat JSONL the `sft` stage reads, and `<out>.lineage.json` records the teacher,
the prompts, every filter's count and the resolved settings.

Every teacher call goes through the model client, whose cache makes an interrupted or repeated
run free: the same settings ask the same requests (seeds are derived from `seed` and the round).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from posttrain.eval.rouge import NearDuplicates, rouge_tokens
from posttrain.generate.client import ClientConfig, make_client
from posttrain.generate.requests import ChatRequest, CompletionRequest
from posttrain.settings import SettingError, StrictModel, is_set

BLACKLIST = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
             "map", "maps", "draw", "plot", "go to", "video", "audio", "music", "flowchart",
             "diagram"]  # fmt: skip

CHAT_PROMPT = """\
Here are some tasks a user might give an AI assistant:

{examples}

Write one new task of your own, different from all of these. Reply with the task only."""


class SelfInstructSettings(StrictModel):
    """How instructions are asked for and filtered (the models and seeds come from the caller:
    `SelfInstructConfig` on the command line, the `self_instruct` stage in a pipeline)."""

    num_instructions: int = Field(100, ge=1, description="New instructions to keep.")
    mode: Literal["completion", "chat"] = Field(
        "chat", description="How the teacher is asked: continue a numbered list, or a chat turn."
    )
    seed_examples: int = Field(6, ge=0, description="Seed instructions shown per prompt.")
    machine_examples: int = Field(
        2, ge=0, description="Machine-written instructions shown per prompt, once there are any."
    )
    prompts_per_round: int = Field(16, ge=1, description="Teacher prompts per round.")
    samples_per_prompt: int = Field(4, ge=1, description="Instructions sampled per prompt (n).")
    max_rounds: int = Field(
        50, ge=1, description="Stop after this many rounds even if too few were kept."
    )
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling of instructions.")
    top_p: float = Field(0.5, gt=0, le=1, description="Sampling of instructions (the paper's).")
    max_tokens: int = Field(64, ge=1, description="Most tokens of one new instruction.")
    completion_header: str = Field(
        "Come up with a series of tasks:\n", description="completion mode: the list's heading."
    )
    completion_item: str = Field(
        "{index}. {instruction}",
        description="completion mode: one line of the list; the prompt ends with the next "
        "line's text before {instruction}, and the teacher's line is read up to a newline.",
    )
    chat_prompt: str = Field(CHAT_PROMPT, description="chat mode: the request, with {examples}.")
    rouge_threshold: float = Field(
        0.7, gt=0, le=1, description="Drop an instruction with ROUGE-L >= this against the pool."
    )
    min_words: int = Field(3, ge=1, description="Drop instructions with fewer words.")
    max_words: int = Field(150, ge=1, description="Drop instructions with more words.")
    blacklist: list[str] = Field(
        default_factory=lambda: list(BLACKLIST),
        description="Drop instructions containing any of these words (whole words, any case).",
    )
    answer_temperature: float = Field(0.0, ge=0, le=2, description="Sampling of answers.")
    answer_max_tokens: int = Field(256, ge=1, description="Most tokens of an answer.")
    seed: int = Field(0, description="Seeds the example draws and every teacher request.")

    @model_validator(mode="after")
    def _mode_settings(self) -> SelfInstructSettings:
        unused = (
            ("chat_prompt",)
            if self.mode == "completion"
            else ("completion_header", "completion_item")
        )
        for key in unused:
            if is_set(self, key):
                raise SettingError(key, f"{{at}}is not used in mode {self.mode}: drop it")
        if self.mode == "completion" and "{instruction}" not in self.completion_item:
            raise SettingError("completion_item", "{at}must contain {instruction}")
        if self.mode == "chat" and "{examples}" not in self.chat_prompt:
            raise SettingError("chat_prompt", "{at}must contain {examples}")
        if self.seed_examples + self.machine_examples < 1:
            raise SettingError("seed_examples", "{at}and machine_examples: show at least one")
        return self


class SelfInstructConfig(SelfInstructSettings):
    teacher: ClientConfig = Field(description="The model that writes instructions.")
    answerer: ClientConfig | None = Field(
        None, description="The chat model that answers them (default: the teacher)."
    )
    seeds: str = Field(
        description="Seed tasks JSONL: {instruction, ...} records (Self-Instruct's "
        "seed_tasks.jsonl) or chat records (the first user turn is the instruction)."
    )


def read_seed_instructions(path: str | Path) -> list[str]:
    """Instructions from a seed file: {"instruction"} records, or the first user turn of chat
    records; an instance's non-empty input is appended on a new line (as the paper shows it)."""
    from posttrain.data.schema import DataError
    from posttrain.io import read_jsonl

    out = []
    for i, rec in enumerate(read_jsonl(path), 1):
        if "instruction" in rec:
            text = str(rec["instruction"]).strip()
        elif "messages" in rec:
            users = [m for m in rec["messages"] if m.get("role") == "user"]
            text = str(users[0].get("content", "")).strip() if users else ""
        else:
            raise DataError(f"{path}:{i}: a seed task needs 'instruction' or 'messages'")
        if not text:
            raise DataError(f"{path}:{i}: the seed task's instruction is empty")
        out.append(text)
    if not out:
        raise DataError(f"{path}: no seed tasks")
    return out


def instruction_problem(text: str, cfg: SelfInstructSettings) -> str | None:
    """Why a new instruction is dropped (a filter's name), or None if it passes the
    per-instruction filters (the near-duplicate filter needs the pool: see `generate`)."""
    words = text.split()
    if not words:
        return "empty"
    if len(words) < cfg.min_words:
        return "too_few_words"
    if len(words) > cfg.max_words:
        return "too_many_words"
    low = " " + " ".join(rouge_tokens(text)) + " "
    if any(f" {' '.join(rouge_tokens(w))} " in low for w in cfg.blacklist):
        return "blacklisted_word"
    if not text[0].isalnum():
        return "starts_with_punctuation"
    if not text[0].isascii():
        return "starts_non_ascii"
    return None


def answer_problem(instruction: str, choice) -> str | None:
    text = choice.text.strip()
    if not text:
        return "empty_answer"
    if choice.finish_reason == "length":
        return "answer_cut_at_max_tokens"
    if text == instruction.strip():
        return "answer_repeats_instruction"
    return None


def _prompt(cfg: SelfInstructSettings, examples: list[str]) -> str:
    if cfg.mode == "chat":
        listed = "\n".join(f"{i}. {e}" for i, e in enumerate(examples, 1))
        return cfg.chat_prompt.format(examples=listed)
    lines = [cfg.completion_item.format(index=i, instruction=e) for i, e in enumerate(examples, 1)]
    head = cfg.completion_item.split("{instruction}")[0].format(index=len(examples) + 1)
    return cfg.completion_header + "\n".join(lines) + "\n" + head.rstrip()


def _first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip()


def generate(cfg: SelfInstructConfig, out: str | Path, cache_dir: Path | None = None,
             log=print) -> dict:  # fmt: skip
    """Write `out` (chat JSONL) and `<out>.lineage.json`; return the counts."""
    from posttrain.io import atomic_write_json, atomic_write_jsonl

    t0 = time.perf_counter()
    out = Path(out)
    seeds = read_seed_instructions(cfg.seeds)
    teacher = make_client(cfg.teacher, cache_dir=cache_dir)
    answerer = teacher if cfg.answerer is None else make_client(cfg.answerer, cache_dir=cache_dir)
    rng = random.Random(cfg.seed)
    pool = NearDuplicates(cfg.rouge_threshold)
    for s in seeds:
        pool.add(s)
    kept: list[str] = []
    dropped: Counter = Counter()
    proposed = rounds = 0
    while len(kept) < cfg.num_instructions and rounds < cfg.max_rounds:
        rounds += 1
        prompts = []
        for _ in range(cfg.prompts_per_round):
            shown = rng.sample(seeds, min(cfg.seed_examples, len(seeds)))
            shown += rng.sample(kept, min(cfg.machine_examples, len(kept)))
            rng.shuffle(shown)
            prompts.append(_prompt(cfg, shown))
        common = dict(n=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p,
                      max_tokens=cfg.max_tokens)  # fmt: skip
        if cfg.mode == "chat":
            reqs = [ChatRequest(messages=[{"role": "user", "content": p}], **common,
                                seed=cfg.seed * 1_000_003 + rounds * 1_000 + i)
                    for i, p in enumerate(prompts)]  # fmt: skip
            replies = teacher.chat(reqs)
        else:
            reqs = [CompletionRequest(prompt=p, stop=["\n"], **common,
                                      seed=cfg.seed * 1_000_003 + rounds * 1_000 + i)
                    for i, p in enumerate(prompts)]  # fmt: skip
            replies = teacher.complete(reqs)
        for resp in replies:
            for choice in resp.choices:
                proposed += 1
                text = _first_line(choice.text)
                why = instruction_problem(text, cfg)
                if why is None:
                    if pool.is_near_duplicate(text):
                        why = "near_duplicate"
                    else:
                        kept.append(text)
                        pool.add(text)
                if why is not None:
                    dropped[why] += 1
                if len(kept) >= cfg.num_instructions:
                    break
            if len(kept) >= cfg.num_instructions:
                break
        log(f"self-instruct round {rounds}: {len(kept)}/{cfg.num_instructions} kept, "
            f"{proposed} proposed, dropped {dict(dropped)}")  # fmt: skip
    answers = answerer.chat(
        [
            ChatRequest(
                messages=[{"role": "user", "content": ins}],
                temperature=cfg.answer_temperature,
                max_tokens=cfg.answer_max_tokens,
                seed=cfg.seed * 1_000_003 + i,
            )
            for i, ins in enumerate(kept)
        ]  # fmt: skip
    )
    records, answer_dropped = [], Counter()
    for ins, resp in zip(kept, answers, strict=True):
        why = answer_problem(ins, resp.choices[0])
        if why is not None:
            answer_dropped[why] += 1
            continue
        pid = f"self-instruct/{len(records):05d}"
        records.append({"prompt_id": pid, "messages": [
            {"role": "user", "content": ins},
            {"role": "assistant", "content": resp.choices[0].text.strip()}]})  # fmt: skip
    counts = {
        "rounds": rounds,
        "instructions_proposed": proposed,
        "instructions_kept": len(kept),
        "instructions_dropped": dict(dropped),
        "answers_dropped": dict(answer_dropped),
        "examples_written": len(records),
        "reached_target": len(kept) >= cfg.num_instructions,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    lineage = {
        "method": "self-instruct (Wang et al. 2212.10560)",
        "teacher": teacher.name,
        "answerer": answerer.name,
        "seeds": {"path": str(cfg.seeds), "count": len(seeds),
                  "sha256": hashlib.sha256(Path(cfg.seeds).read_bytes()).hexdigest()},
        "counts": counts,
        "client": {"teacher": teacher.stats, "answerer": answerer.stats},
        "config": cfg.model_dump(mode="json"),
    }  # fmt: skip
    atomic_write_jsonl(out, records)
    atomic_write_json(lineage_path(out), lineage)
    if not counts["reached_target"]:
        log(f"WARNING: self-instruct kept {len(kept)} of {cfg.num_instructions} instructions in "
            f"{cfg.max_rounds} rounds (max_rounds); see the dropped counts")  # fmt: skip
    return counts


def lineage_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".lineage.json")
