"""What the reward and DPO stages share: where their pairs come from and how they are split."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import Field

from posttrain.settings import StrictModel
from posttrain.stages.base import StageContext, resolve_input
from posttrain.train.loop import TrainSettings


class PairData(StrictModel):
    path: str | None = Field(
        None, description="Preference pairs file (default: the rank stage's pairs.jsonl)."
    )
    format: Literal["auto", "pairs", "hh", "oasst", "alpaca_eval"] = Field(
        "auto", description="Reader: our pair records, Anthropic HH, OASST trees, AlpacaEval."
    )
    rank_stage: str = Field("rank", description="Stage whose pairs.jsonl is the default input.")
    sample_stage: str = Field(
        "sample", description="Stage whose candidates (with gold) give toy-world diagnostics."
    )
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of prompts held out for evaluation (split by prompt)."
    )
    max_length: int = Field(256, ge=8, description="Max tokens per prompt + response.")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate",
        description="Over-long pairs: cut the prompt's start and the replies' ends (as TRL), "
        "or drop the pair.",
    )


class PairTraining(StrictModel):
    """Settings the reward and DPO stages share (each overrides model, batch_size and train)."""

    model: str = Field("sft", description="Stage or HF dir to start from.")
    data: PairData = Field(default_factory=PairData, description="Preference data.")
    batch_size: int = Field(8, ge=1, description="Pairs per micro-batch.")
    packing: bool = Field(False, description="Pack the sequences into rows instead of padding.")
    epochs: float | None = Field(1.0, gt=0, description="Passes over the pairs (overrides steps).")
    train: TrainSettings = Field(default_factory=TrainSettings, description="Optimiser settings.")


def log_fit(ctx: StageContext, stats, cfg: PairData, what: str = "pairs") -> None:
    """Say on the console what max_length did to the data: kept, truncated and dropped (with the
    reason) out of how many, the numbers result.json has (`PairStats.metrics`). `what` names the
    items; unless it says "held-out", they are the training side."""
    if not what.startswith("held-out"):
        what = f"train {what}"
    ctx.logger.info(f"{ctx.name}: {stats.describe(cfg.max_length, cfg.overlong, what)}")


def pairs_path(cfg: PairData, ctx: StageContext) -> Path:
    return resolve_input(cfg.path, ctx, cfg.rank_stage, "pairs.jsonl")


def held_out(prompt_id: str, fraction: float, seed: int) -> bool:
    """Whether a prompt is held out: a hash of (seed, prompt id), so all pairs of one prompt
    land on the same side and no prompt leaks from training into evaluation."""
    h = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def split_pairs(pairs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    if fraction <= 0:
        return pairs, []
    train = [p for p in pairs if not held_out(p["prompt_id"], fraction, seed)]
    val = [p for p in pairs if held_out(p["prompt_id"], fraction, seed)]
    if not train:
        raise ValueError(f"val_fraction {fraction} leaves no training pairs")
    return train, val


def load_split_pairs(cfg: PairData, ctx: StageContext) -> tuple[list[dict], list[dict], dict]:
    """(train, held-out, counts): the pairs of the data file split by prompt, and one console
    line with what was read and how it was split. counts: the reader's stats as read/* (read/kept:
    the pairs read), data/train_pairs and data/val_pairs (the split, before max_length; what
    max_length keeps of each side is `log_fit`'s line and data/kept, data/val_kept, ...)."""
    from posttrain.data.preferences import load_pairs

    path = pairs_path(cfg, ctx)
    pairs, stats = load_pairs(path, cfg.format)
    if not pairs:
        raise ValueError(f"{path}: no preference pairs")
    # The pipeline's seed, not the stage's: every stage (reward, dpo, ...) holds out the same
    # prompts, so one stage's held-out figures are never measured on another's training prompts.
    train, val = split_pairs(pairs, cfg.val_fraction, ctx.pipeline.config.seed)
    read = {f"read/{k}": v for k, v in stats.items() if isinstance(v, int)}
    skipped = ", ".join(f"{v:,} {k.removeprefix('skipped_').replace('_', ' ')}"
                        for k, v in stats.items() if k.startswith("skipped_") and v)  # fmt: skip
    ctx.logger.info(
        f"{ctx.name}: {len(pairs):,} pairs read from {path} ({stats['records']:,} records"
        + (f"; skipped: {skipped}" if skipped else "")
        + f"); split by prompt (val_fraction {cfg.val_fraction}): {len(train):,} train, "
        f"{len(val):,} held out"
    )
    return train, val, read | {"data/train_pairs": len(train), "data/val_pairs": len(val)}


def candidate_gold(ctx: StageContext, sample_stage: str) -> dict[str, dict]:
    """prompt_id -> candidates record (with gold per response) when the sample stage ran."""
    from posttrain.io import read_jsonl

    f = ctx.stage_path(sample_stage, "candidates.jsonl")
    if not f.is_file():
        return {}
    recs = read_jsonl(f)
    if not all("gold" in r for rec in recs for r in rec["responses"]):
        return {}
    return {rec["prompt_id"]: rec for rec in recs}
