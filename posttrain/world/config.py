"""WorldConfig: every knob of the toy world, validated; plus the seeded RNG helper."""

from __future__ import annotations

import hashlib
import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from posttrain.settings import SettingError, is_set


class AgentSettings(BaseModel):
    """The agent family's settings (world/agent_tasks.py): tasks answered with tools, and the
    multi-turn tool-use SFT conversations that teach them."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    multi_step_share: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Share of agent tasks per split that are multi-step (a lookup, then an "
        "operation on the value: its first letter, its letter count, or two facts' letters "
        "added with the calculator); the rest are single lookups.",
    )
    unknown_share: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="Share of agent tasks per split about unknown people (never in the corpus: "
        "only the lookup tool can answer).",
    )
    sft_error_share: float = Field(
        0.15,
        ge=0.0,
        lt=1.0,
        description="Share of the agent SFT conversations in which the first lookup fails (the "
        "error flaky_lookup gives) and the assistant tries again.",
    )
    sft_retry_share: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Of those, the share whose retry succeeds; in the rest it fails too and the "
        "assistant answers that it could not find out.",
    )

    sft_extra_people: int = Field(
        0,
        ge=0,
        le=20_000,
        exclude_if=lambda v: v == 0,
        description="Made-up people who appear in one agent SFT conversation each and nowhere "
        "else (not in the corpus, any task split or the lookup tool's directory), so that the "
        "name to look up can only be copied from the question, never recalled: the train split "
        "has ~120 people, whose names a small model memorises and then writes into its calls "
        "for people it has never seen. A third of their single lookups are phrased as the "
        "knowledge family's questions. 0: none.",
    )

    @model_validator(mode="after")
    def _retry_needs_errors(self) -> AgentSettings:
        if self.sft_error_share == 0 and is_set(self, "sft_retry_share"):
            raise SettingError("sft_retry_share", "{at}sft_error_share is 0 (no lookup fails), "
                               "so it has no effect: drop it, or set {at}sft_error_share")  # fmt: skip
        return self


class WorldConfig(BaseModel):
    """The toy world's settings. The same config always gives byte-identical outputs."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    seed: int = Field(0, ge=0, description="Root seed; every random choice derives from it.")
    n_entities: int = Field(
        240, ge=200, le=2000, description="Fictional people in the knowledge family."
    )
    known_fraction: float = Field(
        0.5, gt=0.0, lt=1.0, description="Share of entities whose facts are in the corpus."
    )
    corpus_docs: int = Field(
        4000, ge=1, le=200_000, description="Documents in the pre-training corpus (~2 MB)."
    )
    heldout_docs: int = Field(
        300, ge=1, le=50_000, description="Documents in the held-out corpus (for perplexity)."
    )
    n_train: int = Field(400, ge=0, description="SFT tasks per family (capped by unique prompts).")
    n_rl: int = Field(200, ge=0, description="RL prompts per family (capped by unique prompts).")
    n_eval: int = Field(
        100, ge=2, description="Eval prompts per family (capped by unique prompts)."
    )
    mention_max: int = Field(
        200, ge=2, le=10_000, description="Times each fact of the most-mentioned entity is stated."
    )
    mention_min: int = Field(
        4,
        ge=2,
        le=10_000,
        description="Times each fact of a tail (least-mentioned) entity is stated.",
    )
    zipf_exponent: float = Field(
        1.0, gt=0.0, le=4.0, description="Zipf exponent s: mentions(rank r) ~ mention_max / r^s."
    )
    unknown_share: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="Share of knowledge tasks per split about unknown entities.",
    )
    chat_docs: int = Field(
        600,
        ge=0,
        le=200_000,
        description="Pre-training documents that are Q/A in chat form (mid-training).",
    )
    qa_weighting: Literal["mentions", "sqrt", "uniform"] = Field(
        "mentions",
        description="How often a known fact is drawn for Q/A and chat documents: in proportion "
        "to its entity's mentions (tail facts rare), their square root, or uniformly.",
    )
    tool_every: int = Field(
        10,
        ge=0,
        description="Every N-th arithmetic SFT example is a calculator tool call (0: none).",
    )
    rl_novel_share: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Share of the safety phrasings, harm targets and benign actions that RL "
        "prompts use but SFT data never does (0: RL prompts come from SFT's distribution).",
    )
    harmful_share: float = Field(
        0.5, gt=0.0, lt=1.0, description="Share of safety tasks per split that are harmful."
    )
    # The two below change the SFT conversations only (sft_train.jsonl), never a task split, the
    # corpus or the tokenizer's texts: the eval set stays byte for byte the same across a sweep
    # (Roettger et al. 2308.01263, XSTest; Bianchi et al. 2309.07875). Left out of the resolved
    # config while off, so that worlds and stages cached before they existed stay cached.
    sft_refusal_share: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        exclude_if=lambda v: v is None,
        description="Share of the SFT conversations that are harmful requests answered with a "
        "refusal; they replace the safety family's train tasks in SFT data (null: off, SFT "
        "holds the train tasks, harmful_share of them refused).",
    )
    sft_contrast_share: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        exclude_if=lambda v: v == 0,
        description="Share of the SFT conversations that are contrast examples: benign "
        "look-alikes ('kill a Python process') answered helpfully (0: none; needs "
        "sft_refusal_share).",
    )

    # Adds a family to the task splits (after the others: their tasks and ids do not move), its
    # SFT conversations, and their texts to the tokenizer's (World.texts); never changes the
    # corpus or another family's task. Left out of the resolved config while off.
    agent: AgentSettings | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="Agentic tasks (family 'agent': questions about people answered with the "
        "lookup tool, and multi-step requests with a plan) in every split, and multi-turn "
        "tool-use SFT conversations for its train tasks ({}: on with the defaults; null: off).",
    )

    @model_validator(mode="after")
    def _mentions_ordered(self) -> WorldConfig:
        if self.mention_min > self.mention_max:
            raise ValueError(
                f"mention_min ({self.mention_min}) must be <= mention_max ({self.mention_max})"
            )
        return self

    @model_validator(mode="after")
    def _sft_safety_mix(self) -> WorldConfig:
        if self.sft_refusal_share is None:
            if self.sft_contrast_share:
                raise SettingError("sft_contrast_share", "{at}sft_refusal_share is null (SFT "
                                   "holds the safety train tasks as they are), so it has no "
                                   "effect: set {at}sft_refusal_share (0 for none), or drop it")  # fmt: skip
        elif self.sft_refusal_share + self.sft_contrast_share >= 1:
            raise ValueError(f"sft_refusal_share + sft_contrast_share must be < 1 (the rest of "
                             f"SFT is the other families), got {self.sft_refusal_share} + "
                             f"{self.sft_contrast_share}")  # fmt: skip
        return self


def make_rng(seed: int, *parts: str) -> random.Random:
    """An independent, reproducible stream for one purpose, e.g. make_rng(0, "corpus", "train").

    Uses sha256 rather than hash(), which is salted per process for str.
    """
    key = "/".join([str(seed), *parts]).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
