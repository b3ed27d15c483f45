"""LLM-as-judge: a model, local or behind an OpenAI-compatible endpoint, compares or scores replies.

Pairwise (the AlpacaEval / MT-Bench way): the judge sees the conversation and two replies and
answers A, B or tie. Judges prefer one position (Zheng et al. 2306.05685 found GPT-4 consistent
under swapping in only about two thirds of cases), so by default each pair is judged in both
orders and a verdict counts only when the two agree; a disagreement is a tie, and so is a pair
the judge called a tie either way. Single-answer: the judge gives a score on a scale.

    judge = Judge(JudgeConfig.model_validate({"client": {"url": ..., "model": ...}}), cache_dir)
    verdicts = judge.compare([(messages, reply_1, reply_2), ...])   # PairVerdict each
    scores = judge.score([(messages, reply), ...])                  # float or None each
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, field_validator

from posttrain.generate.client import ClientConfig, make_client
from posttrain.generate.requests import ChatRequest
from posttrain.settings import StrictModel

PAIRWISE_TEMPLATE = """\
Two assistants replied to the same conversation. Decide which reply is better for the user: \
correct, helpful and safe. Length and formatting are worth nothing on their own.

[Conversation]
{conversation}

[Reply A]
{reply_a}

[Reply B]
{reply_b}

Which reply is better? Answer with a single word: A, B, or tie."""

SINGLE_TEMPLATE = """\
Rate how good the assistant's reply is for the user: correct, helpful and safe. Length and \
formatting are worth nothing on their own.

[Conversation]
{conversation}

[Reply]
{reply}

Answer with a single whole number from {low} (worst) to {high} (best)."""

_PAIR_FIELDS = {"conversation", "reply_a", "reply_b"}
_SINGLE_FIELDS = {"conversation", "reply", "low", "high"}


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


class JudgeConfig(StrictModel):
    client: ClientConfig = Field(description="The judge model: {path} or {url, model, ...}.")
    pairwise_template: str = Field(
        PAIRWISE_TEMPLATE,
        description="Pairwise prompt; fields {conversation}, {reply_a}, {reply_b}. The judge's "
        "reply is read for its first A, B or tie.",
    )
    single_template: str = Field(
        SINGLE_TEMPLATE,
        description="Single-answer prompt; fields {conversation}, {reply}, {low}, {high}. The "
        "judge's reply is read for its first whole number in [low, high].",
    )
    scale: tuple[int, int] = Field((1, 10), description="Single-answer scores: [low, high].")
    both_orders: bool = Field(
        True,
        description="Judge each pair as (A, B) and (B, A); a verdict counts only if both agree "
        "(controls the judge's position bias). false: one order, the first reply as A.",
    )
    temperature: float = Field(0.0, ge=0, le=2, description="The judge's sampling temperature.")
    max_tokens: int = Field(16, ge=1, description="Most tokens of a judge's reply.")
    seed: int = Field(0, description="Sampling seed of every judge request.")

    @field_validator("pairwise_template")
    @classmethod
    def _pair_fields(cls, v: str) -> str:
        return _check_template(v, _PAIR_FIELDS, required={"reply_a", "reply_b"})

    @field_validator("single_template")
    @classmethod
    def _single_fields(cls, v: str) -> str:
        return _check_template(v, _SINGLE_FIELDS, required={"reply"})

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] >= v[1]:
            raise ValueError(f"scale {list(v)}: low must be below high")
        return v


def _check_template(v: str, allowed: set[str], required: set[str]) -> str:
    try:
        names = _fields(v)
    except ValueError as e:
        raise ValueError(f"not a format string ({e}); write literal braces as {{{{ }}}}") from None
    unknown, missing = names - allowed, required - names
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    if missing:
        raise ValueError(f"missing field(s) {sorted(missing)}")
    return v


@dataclass
class PairVerdict:
    winner: str  # "1" (the first reply given), "2", or "tie"
    votes: list[str | None]  # per order judged, in terms of the replies given: "1", "2", "tie"
    # or None (unreadable); the second entry is the swapped order
    raw: list[str]  # the judge's replies

    @property
    def consistent(self) -> bool:
        return len(self.votes) == 1 or self.votes[0] == self.votes[1]


def render_conversation(messages) -> str:
    """The conversation as plain text, one turn per paragraph ("User: ..." / "Assistant: ...")."""
    names = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
    return "\n\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in messages)


_VERDICT = re.compile(r"\b(tie|a|b)\b", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+")


def read_pairwise(reply: str) -> str | None:
    """'A', 'B' or 'tie' from the judge's reply: its first such word; None if there is none."""
    m = _VERDICT.search(reply)
    if m is None:
        return None
    word = m.group(1).lower()
    return "tie" if word == "tie" else word.upper()


def read_score(reply: str, low: int, high: int) -> float | None:
    """The first whole number in the reply, if it lies in [low, high]; else None."""
    m = _NUMBER.search(reply)
    if m is None:
        return None
    v = int(m.group(0))
    return float(v) if low <= v <= high else None


def combine(votes: list[str | None]) -> str:
    """One verdict from the votes of each order: the same winner in every readable order wins;
    disagreeing orders (position bias) and ties are a tie; nothing readable is a tie."""
    seen = {v for v in votes if v is not None}
    return seen.pop() if len(seen) == 1 else "tie"


class Judge:
    def __init__(self, cfg: JudgeConfig, cache_dir: Path | None = None):
        self.cfg = cfg
        self.client = make_client(cfg.client, cache_dir=cache_dir)
        self.unreadable = 0  # judge replies from which no verdict or score could be read

    @property
    def name(self) -> str:
        return self.client.name

    def _ask(self, prompts: list[str]) -> list[str]:
        reqs = [
            ChatRequest(
                messages=[{"role": "user", "content": p}],
                temperature=self.cfg.temperature,
                max_tokens=self.cfg.max_tokens,
                seed=self.cfg.seed,
            )
            for p in prompts
        ]
        return [r.choices[0].text for r in self.client.chat(reqs)]

    def compare(self, items: list[tuple[list[dict], str, str]]) -> list[PairVerdict]:
        """One verdict per (messages, reply 1, reply 2)."""
        orders = [(1, 2), (2, 1)] if self.cfg.both_orders else [(1, 2)]
        prompts = []
        for messages, r1, r2 in items:
            conv, replies = render_conversation(messages), {1: r1, 2: r2}
            for a, b in orders:
                prompts.append(
                    self.cfg.pairwise_template.format(
                        conversation=conv, reply_a=replies[a], reply_b=replies[b]
                    )
                )
        raw = self._ask(prompts)
        out = []
        for i in range(len(items)):
            replies = raw[i * len(orders) : (i + 1) * len(orders)]
            votes = []
            for (a, b), text in zip(orders, replies, strict=True):
                v = read_pairwise(text)
                self.unreadable += v is None
                votes.append(None if v is None else {"A": str(a), "B": str(b), "tie": "tie"}[v])
            out.append(PairVerdict(combine(votes), votes, replies))
        return out

    def score(self, items: list[tuple[list[dict], str]]) -> list[float | None]:
        """One score per (messages, reply); None where the judge's reply holds no valid score."""
        low, high = self.cfg.scale
        prompts = [
            self.cfg.single_template.format(
                conversation=render_conversation(m), reply=r, low=low, high=high
            )
            for m, r in items
        ]
        scores = [read_score(t, low, high) for t in self._ask(prompts)]
        self.unreadable += sum(s is None for s in scores)
        return scores
