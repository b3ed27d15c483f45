"""The SFT stage: supervised fine-tuning on chat data, full or LoRA, on the shared loop.

The loss is the summed next-token cross-entropy over assistant tokens only (the loss mask comes
from the chat template, see data/chat.py), divided by the number of trained tokens in the whole
optimiser step (so packing and gradient accumulation change nothing). With `distill.teacher`
(knowledge distillation, as OpenRLHF's KD and TRL's GKD do off-policy), the loss on the same
tokens is (1 - alpha) x cross-entropy + alpha x T^2 x KL(teacher || student) at temperature T.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from posttrain.data.curate import CurateSettings
from posttrain.data.probe import ProbeSettings
from posttrain.models.lora import LoraSettings
from posttrain.settings import SettingError, StrictModel, is_set
from posttrain.stages.base import (
    StageContext,
    StageResult,
    resolve_input,
    resolve_model,
    train_with_progress,
)
from posttrain.train import dist
from posttrain.train.loop import (
    MicroBatchObjective,
    TrainSettings,
    check_epochs,
    check_heldout,
    evaluate_objective,
    micro_per_step,
)


class DataSettings(StrictModel):
    path: str | None = Field(
        None, description="Chat data file; default: the toy world's sft_train.jsonl."
    )
    format: Literal["auto", "messages", "alpaca", "sharegpt", "oasst", "hh"] = Field(
        "auto", description="Record format; auto sniffs the first record."
    )
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="A malformed record: stop, or skip and count it."
    )
    curate: CurateSettings | None = Field(
        None,
        description="Curate the examples after reading (filters, decontamination, dedup; "
        "see posttrain/data/curate.py); null: use them all.",
    )
    probe: ProbeSettings | None = Field(
        None,
        exclude_if=lambda v: v is None,
        description="SliCK knowledge probe under a base model after curation (Gekhman et al. "
        "2405.05904; posttrain/data/probe.py): counts per category, Unknown examples kept, "
        "dropped or relabelled; null: off.",
    )


class ReplaySettings(StrictModel):
    rows: int = Field(
        0,
        ge=0,
        description="Windows of pre-training text added to every micro-batch (0: no replay).",
    )
    data: str | None = Field(
        None, description="Replay text (.jsonl of {text} or .txt); default: the toy corpus."
    )

    @model_validator(mode="after")
    def _data_needs_rows(self) -> ReplaySettings:
        if self.data is not None and self.rows == 0:
            raise SettingError("data", "{at}rows is 0 (no replay), so it is never read: set "
                               "{at}rows, or drop it")  # fmt: skip
        return self


class DistillSettings(StrictModel):
    teacher: str | None = Field(
        None, description="Stage or HF dir of a teacher with the same vocabulary (null: off)."
    )
    alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the teacher's soft targets (1 - alpha: labels)."
    )
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of both models.")

    @model_validator(mode="after")
    def _settings_need_a_teacher(self) -> DistillSettings:
        for key in ("alpha", "temperature"):
            if self.teacher is None and is_set(self, key):
                raise SettingError(key, "{at}teacher is null (no distillation), so it has no "
                                   "effect: name a teacher, or drop it")  # fmt: skip
        return self


class Config(StrictModel):
    model: str = Field(
        "pretrain", description="A stage of this run whose model/ to start from, or a local HF dir."
    )
    data: DataSettings = Field(default_factory=DataSettings, description="Training data.")
    world_stage: str = Field(
        "world", description="Stage that holds the toy SFT data (the default data)."
    )
    train_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant", description="Which assistant turns carry loss."
    )
    max_length: int = Field(512, ge=8, description="Max tokens per example (and per packed row).")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate",
        description="Over-long examples: keep the first max_length tokens (dropped if no "
        "trained token is among them), or drop.",
    )
    packing: bool = Field(
        True, description="Pack several examples per row (attention kept within each example)."
    )
    batch_size: int = Field(
        16, ge=1, description="Rows (packed) or examples (padded) per micro-batch."
    )
    epochs: float | None = Field(
        3.0, gt=0, description="Epochs over the data; sets train.steps (null: use train.steps)."
    )
    train: TrainSettings = Field(
        default_factory=lambda: TrainSettings(lr=1e-3, warmup_steps=10, weight_decay=0.0),
        description="Optimiser and schedule.",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA (peft).")
    replay: ReplaySettings = Field(
        default_factory=ReplaySettings,
        description="Mix pre-training text into every micro-batch to keep what the base knew.",
    )
    distill: DistillSettings = Field(
        default_factory=DistillSettings,
        description="Knowledge distillation: also match a teacher's next-token distribution.",
    )
    neftune_alpha: float | None = Field(
        None,
        gt=0,
        description="NEFTune: uniform noise of scale alpha/sqrt(T*C) on the input embeddings "
        "while training (T: the row's length, C: the width); null: off.",
    )

    @model_validator(mode="after")
    def _replay_needs_packing(self) -> Config:
        if self.replay.rows and not self.packing:
            raise ValueError("sft.replay.rows needs sft.packing: true")
        return self

    @model_validator(mode="after")
    def _no_silent_settings(self) -> Config:
        check_epochs(self.epochs, self.train)
        check_heldout(self.train, self.val_fraction, "val_fraction")
        c = self.data.curate
        if c is None:
            return self
        near, decon = c.dedup == "near", bool(c.decontaminate)
        why = {"near_threshold": (near, "{at}data.curate.dedup is not near"),
               "num_perm": (near, "{at}data.curate.dedup is not near"),
               "bands": (near, "{at}data.curate.dedup is not near"),
               "ngram": (decon, "{at}data.curate.decontaminate is empty"),
               "min_match_words": (decon, "{at}data.curate.decontaminate is empty")}  # fmt: skip
        for key, (used, reason) in why.items():
            if not used and is_set(c, key):
                raise SettingError(f"data.curate.{key}", f"has no effect: {reason}; drop it")
        return self

    val_fraction: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Examples held out for eval/loss (logged every train.eval_every steps).",
    )


def inputs(cfg: Config, ctx: StageContext) -> dict[str, Path]:
    out = {
        "model": resolve_model(cfg.model, ctx),
        "data": resolve_input(cfg.data.path, ctx, cfg.world_stage, "sft_train.jsonl"),
    }
    if cfg.replay.rows:
        out["replay"] = resolve_input(cfg.replay.data, ctx, cfg.world_stage, "corpus_train.jsonl")
    if cfg.distill.teacher:
        out["teacher"] = resolve_model(cfg.distill.teacher, ctx)
    if cfg.data.probe is not None:
        out["probe"] = resolve_model(cfg.data.probe.model, ctx)
    if cfg.data.curate is not None:
        from posttrain.data.curate import resolve_eval_file

        for i, entry in enumerate(cfg.data.curate.decontaminate):
            out[f"curate:{i}"] = resolve_eval_file(entry, cfg.data.curate.data_dir)
    return out


class SFTObjective(MicroBatchObjective):
    """Summed cross-entropy over the trained tokens; a step's loss is its mean per token. With a
    teacher (knowledge distillation), `ops.lm.distill_loss_sum` over the same tokens."""

    def __init__(self, data, grad_accum: int, device, teacher=None, distill=None):
        super().__init__(data, grad_accum, device)
        self.teacher, self.distill = teacher, distill

    def weight(self, batch) -> float:
        return batch.n_loss_tokens

    def tokens(self, batch) -> int:
        return batch.n_tokens

    def loss(self, model, batch):
        import torch

        from posttrain.models.forward import target_logits, target_logps
        from posttrain.ops.lm import distill_loss_sum

        args = (batch.input_ids, batch.labels, batch.attention_mask, batch.position_ids)
        if self.teacher is None:  # the LM head a chunk at a time: no (N, V) logits
            logp, _, _ = target_logps(model, *args)
            return -logp.sum(), {}
        # Distillation compares the two full distributions: it keeps the (N, V) logits path.
        logits, targets = target_logits(model, *args)
        with torch.no_grad():
            teacher_logits, _ = target_logits(self.teacher, *args)
        d = self.distill
        return distill_loss_sum(logits, teacher_logits, targets, d.alpha, d.temperature)


def split_validation(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out subset (at least one example when fraction > 0 and there are >= 2)."""
    import random

    n_val = min(len(examples) - 1, max(1, round(fraction * len(examples)))) if fraction > 0 else 0
    if n_val <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed + 17).shuffle(order)
    held = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def neftune(model, alpha: float):
    """NEFTune (Jain et al., 2023): add Uniform(-1, 1) * alpha / sqrt(T * C) to the input
    embeddings, (B, T, C), in training mode only (held-out loss and generation see none).
    Returns the hook's handle; `.remove()` it after training."""
    import math

    import torch

    def hook(module, args, output):
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-scale, scale)

    return model.get_input_embeddings().register_forward_hook(hook)


def _curate(examples: list, settings: CurateSettings, ctx: StageContext) -> tuple[list, dict]:
    from posttrain.data.curate import curate

    kept, stats = curate(examples, settings)
    dropped = ", ".join(f"{v} {k.split('dropped_')[1]}" for k, v in stats.items()
                        if "dropped_" in k and v)  # fmt: skip
    ctx.logger.info(f"{ctx.name}: curated {stats['curate/in']} examples to "
                    f"{stats['curate/kept']} (dropped: {dropped or 'none'})")  # fmt: skip
    if not kept:
        raise ValueError(f"sft.data.curate left no examples of {stats['curate/in']} "
                         f"(dropped: {dropped or 'none'})")  # fmt: skip
    return kept, stats


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from posttrain.data.collate import pad_batch
    from posttrain.data.readers import load_chat_data
    from posttrain.data.sft import SFTBatches, tokenize_examples
    from posttrain.models.load import load_model
    from posttrain.models.tokenizer import load_tokenizer

    paths = inputs(cfg, ctx)
    tok = load_tokenizer(paths["model"])
    examples, read_stats = load_chat_data(paths["data"], cfg.data.format, cfg.data.on_error)
    curate_stats = {}
    if cfg.data.curate is not None:
        examples, curate_stats = _curate(examples, cfg.data.curate, ctx)
    if cfg.data.probe is not None:
        from posttrain.data.probe import probe_data

        examples, probe_stats = probe_data(examples, cfg.data.probe, paths["probe"], ctx.device,
                                           ctx.stage_dir, ctx.logger.info)  # fmt: skip
        curate_stats |= probe_stats
    tokenized, stats = tokenize_examples(tok, examples, cfg.max_length, cfg.overlong, cfg.train_on)
    if line := stats.describe(cfg.max_length, cfg.overlong):
        ctx.logger.info(f"{ctx.name}: {line}")
    tokenized, val = split_validation(tokenized, cfg.val_fraction, ctx.seed)
    stats.read = read_stats
    model = load_model(paths["model"], ctx.device)
    if cfg.lora.enabled:
        from posttrain.models.lora import apply_lora

        model = apply_lora(model, cfg.lora)
    data = SFTBatches(tokenized, batch_size=cfg.batch_size, pad_id=tok.pad_token_id or 0, packing=cfg.packing,
                      row_len=cfg.max_length, seed=ctx.seed)  # fmt: skip
    if cfg.replay.rows:
        from posttrain.data.sft import ReplayBatches
        from posttrain.data.text import read_texts, tokenize_stream

        stream = tokenize_stream(read_texts(paths["replay"]), tok)
        data = ReplayBatches(data, stream, cfg.replay.rows, ctx.seed)
    if cfg.packing:
        from posttrain.data.collate import check_packing_isolation

        check_packing_isolation(model, tokenized, tok.pad_token_id or 0)
    settings = cfg.train
    if cfg.epochs is not None:
        settings = settings.model_copy(
            update={"steps": data.steps_for(cfg.epochs, micro_per_step(settings.grad_accum))}
        )
    ctx.logger.info(
        f"{ctx.name}: {stats.kept} examples ({stats.trained_tokens:,} trained of {stats.total_tokens:,} tokens), "
        f"{data.per_epoch} micro-batches per epoch, {settings.steps} steps"
    )
    teacher = None
    if cfg.distill.teacher:
        teacher = load_model(paths["teacher"], ctx.device).eval().requires_grad_(False)
        sizes = (
            model.get_output_embeddings().weight.shape[0],
            teacher.get_output_embeddings().weight.shape[0],
        )
        if sizes[0] != sizes[1]:
            raise ValueError(f"sft.distill.teacher {paths['teacher']}: vocabulary of {sizes[1]} "
                             f"tokens, the student's has {sizes[0]}: they must be the same")  # fmt: skip
    objective = SFTObjective(data, settings.grad_accum, ctx.device, teacher, cfg.distill)
    evaluate = None
    if val:
        val_batches = [
            pad_batch(val[i : i + cfg.batch_size], data.pad_id).to(ctx.device)
            for i in range(0, len(val), cfg.batch_size)
        ]
        evaluate = partial(evaluate_objective, objective=objective, batches=val_batches)
        if not settings.eval_every:
            settings = settings.model_copy(update={"eval_every": max(1, settings.steps // 10)})
    noise = neftune(model, cfg.neftune_alpha) if cfg.neftune_alpha else None
    try:
        result = train_with_progress(ctx, model, objective, settings, evaluate)
    finally:
        if noise is not None:
            noise.remove()
    if dist.is_main():
        from posttrain.models.lora import save_trained

        save_trained(model, tok, ctx.stage_dir / "model", cfg.lora)
    metrics = (
        {
            "train/loss": result.final_loss,
            "train/steps": result.steps,
            "train/tokens": result.tokens,
            "train/seconds": round(result.seconds, 2),
        }
        | stats.metrics()
        | result.eval
        | {"data/val_examples": len(val)}
        | {f"data/{k}": v for k, v in curate_stats.items()}
    )
    if read_stats.get("errors"):
        metrics["data/first_error"] = read_stats["errors"][0]
    return StageResult(metrics, {"model": f"{ctx.name}/model"})
