"""WorldConfig: every knob of the toy world, validated; plus the seeded RNG helper."""

from __future__ import annotations

import hashlib
import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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

    @model_validator(mode="after")
    def _mentions_ordered(self) -> WorldConfig:
        if self.mention_min > self.mention_max:
            raise ValueError(
                f"mention_min ({self.mention_min}) must be <= mention_max ({self.mention_max})"
            )
        return self


def make_rng(seed: int, *parts: str) -> random.Random:
    """An independent, reproducible stream for one purpose, e.g. make_rng(0, "corpus", "train").

    Uses sha256 rather than hash(), which is salted per process for str.
    """
    key = "/".join([str(seed), *parts]).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
