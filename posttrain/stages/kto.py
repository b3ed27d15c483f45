"""The KTO stage: optimise the policy on unpaired feedback, each reply judged good or bad alone.

KTO (Ethayarajh et al. 2024) needs no pairs: thumbs up/down on single replies are enough, which
is the feedback most products collect. Input: feedback records `{"prompt_id", "messages" (or
"prompt"), "completion", "label": bool}`, or any preference-pair file, each pair split into its
chosen reply (desirable) and its rejected one (TRL's conversion); by default the rank stage's
pairs. Loss: `posttrain.ops.preference.kto_loss`.

The KL reference point z0 is estimated, as in the paper and TRL, from mismatched sequences
(each prompt with another record's reply, fixed once): the mean policy-minus-reference
log-ratio over them, without gradient. TRL estimates it per micro-batch, so its loss changes
with gradient accumulation and device count; here it is the mean over every mismatched sequence
of the optimiser step, on all ranks (one no-grad forward pass over them, before the step's first
micro-batch), so a step's loss is the same however the step is split. Reference log-probs are
computed once before training (the frozen initial model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from posttrain.models.lora import LoraSettings, lora_field
from posttrain.stages._prefs import PairData, PairTraining, log_fit, pairs_path, split_pairs
from posttrain.stages.base import StageContext, StageResult, resolve_model, train_and_save
from posttrain.train import dist
from posttrain.train.loop import (
    MicroBatchObjective,
    TrainSettings,
    check_epochs,
    check_heldout,
    micro_per_step,
    step_micro_indices,
)


class FeedbackData(PairData):
    format: Literal["auto", "feedback", "pairs", "hh", "oasst", "alpaca_eval"] = Field(
        "auto",
        description="feedback records (auto: first record has completion and label), or a "
        "preference-pair format whose pairs are split into desirable and undesirable replies.",
    )


class Config(PairTraining):
    model: str = Field("sft", description="Stage or HF dir of the initial policy.")
    data: FeedbackData = Field(default_factory=FeedbackData, description="Feedback data.")
    batch_size: int = Field(8, ge=1, description="Replies per micro-batch.")
    train: TrainSettings = Field(
        default_factory=lambda: TrainSettings(lr=5e-6, warmup_steps=5, weight_decay=0.0),
        description="Optimiser settings.",
    )
    beta: float = Field(0.1, gt=0, description="Inverse temperature of the implied reward.")
    desirable_weight: float = Field(1.0, gt=0, description="lambda_D: weight of good replies.")
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U: weight of bad replies.")
    lora: LoraSettings = lora_field(
        "LoRA adapters on the policy; the reference is the same base with them switched off."
    )

    @model_validator(mode="after")
    def _no_silent_settings(self) -> Config:
        check_epochs(self.epochs, self.train)
        check_heldout(self.train, self.data.val_fraction, "data.val_fraction")
        return self


def inputs(cfg: Config, ctx: StageContext) -> dict[str, Path]:
    return {"model": resolve_model(cfg.model, ctx), "feedback": pairs_path(cfg.data, ctx)}


def _split(data, index: list[int]):
    """(replies, mismatched sequences) of these records: two SeqBatches, the replies carrying
    their judgements."""
    from posttrain.data.pairs import SeqBatch, sequence_batch

    out = []
    for part in ("chosen", "rejected"):
        seqs = [getattr(data.pairs[i], part) for i in index]
        batch, target_seq, last = sequence_batch(seqs, data.pad_id, data.packing, data.row_len)
        out.append(SeqBatch(batch, target_seq, last, len(seqs), torch.tensor(index)))
    out[0].desirable = torch.tensor([data.pairs[i].desirable for i in index], dtype=torch.bool)
    return out


class KTOObjective(MicroBatchObjective):
    """kto_loss summed over a micro-batch's replies; a step's loss is its mean over replies."""

    def __init__(self, cfg: Config, data, device, ref_logps: torch.Tensor):
        super().__init__(data, cfg.train.grad_accum, device)
        self.cfg, self.ref_logps = cfg, ref_logps  # (N, 2): reply, mismatched sequence
        self._step: list | None = None  # this step's mismatched batches, until z0 is known
        self._z: float | None = None

    def weight(self, mb) -> float:
        return mb[0].n_seqs

    def tokens(self, mb) -> int:
        return mb[0].batch.n_tokens

    def batches(self, step: int) -> list:
        out = [tuple(b.to(self.device) for b in _split(self.data, self.data.indices(k)))
               for k in step_micro_indices(step, self.grad_accum)]  # fmt: skip
        self._step, self._z = [kl for _, kl in out], None
        return out

    @torch.no_grad()
    def reference_point(self, model, kl_batches) -> float:
        """z0: the mean log-ratio over these mismatched sequences on every rank (no gradient)."""
        from posttrain.data.pairs import sequence_logps

        total, n = 0.0, 0
        for kl in kl_batches:
            ref = self.ref_logps[kl.index, 1].to(self.device)
            total += float((sequence_logps(model, kl) - ref).sum())
            n += kl.n_seqs
        total, n = dist.all_sum([total, n])
        return total / max(n, 1)

    def loss(self, model, mb):
        from posttrain.data.pairs import sequence_logps
        from posttrain.ops.preference import kto_loss

        reply, kl = mb
        if self._z is None:  # the step's first micro-batch (or an evaluation batch on its own)
            self._z = self.reference_point(model, self._step or [kl])
        z = self._z
        if self._step is None:
            self._z = None
        pi = sequence_logps(model, reply)
        ref = self.ref_logps[reply.index, 0].to(pi.device)
        cfg = self.cfg
        loss, m = kto_loss(pi, ref, reply.desirable, z, cfg.beta, desirable_weight=cfg.desirable_weight,
                           undesirable_weight=cfg.undesirable_weight)  # fmt: skip
        return loss.sum(), {k: v * reply.n_seqs for k, v in m.items()}


def _prepared(tok, records, cfg: Config, pad: int, seed: int):
    from posttrain.data.pairs import PairBatches, tokenize_feedback

    tokenized, stats = tokenize_feedback(tok, records, cfg.data.max_length, cfg.data.overlong)
    data = PairBatches(tokenized, batch_size=cfg.batch_size, pad_id=pad, packing=cfg.packing,
                       row_len=2 * cfg.data.max_length, seed=seed)  # fmt: skip
    return tokenized, stats, data


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from posttrain.data.preferences import load_feedback
    from posttrain.models.load import load_model
    from posttrain.models.lora import BaseView, apply_lora
    from posttrain.models.tokenizer import load_tokenizer
    from posttrain.stages.dpo import ref_progress, reference_logps

    paths = inputs(cfg, ctx)
    if cfg.train.fsdp:
        raise ValueError("kto: train.fsdp is not supported (the reference point needs the model)")
    tok = load_tokenizer(paths["model"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    records, read = load_feedback(paths["feedback"], cfg.data.format)
    if not records:
        raise ValueError(f"{paths['feedback']}: no feedback records")
    train_recs, val_recs = split_pairs(records, cfg.data.val_fraction, ctx.pipeline.config.seed)
    tokenized, stats, data = _prepared(tok, train_recs, cfg, pad, ctx.seed)
    log_fit(ctx, stats, cfg.data, "replies")
    model = load_model(paths["model"], ctx.device)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    base = BaseView(model) if cfg.lora.enabled else model  # the reference: the initial policy
    ctx.logger.info(f"{ctx.name}: reference log-probs of {len(tokenized) + len(val_recs)} replies")
    prec = cfg.train.precision
    ref = reference_logps(base, data.all(), ctx.device, len(tokenized), precision=prec,
                          progress=ref_progress(ctx, "reference log-probs"))  # fmt: skip
    settings = cfg.train
    if cfg.epochs is not None:
        settings = settings.model_copy(
            update={"steps": data.steps_for(cfg.epochs, micro_per_step(settings.grad_accum))}
        )
    good = sum(t.desirable for t in tokenized)
    ctx.logger.info(f"{ctx.name}: kto (beta {cfg.beta}) on {len(tokenized)} train replies ({good} desirable), {settings.steps} steps")  # fmt: skip
    objective = KTOObjective(cfg, data, ctx.device, ref)
    val_obj, val = None, []
    if val_recs:
        val_tok, val_stats, val_data = _prepared(tok, val_recs, cfg, pad, 0)
        log_fit(ctx, val_stats, cfg.data, "held-out replies")
        val_ref = reference_logps(base, val_data.all(), ctx.device, len(val_tok), precision=prec)
        val_obj = KTOObjective(cfg, val_data, ctx.device, val_ref)
        n, bs = len(val_tok), cfg.batch_size
        val = [tuple(b.to(ctx.device) for b in _split(val_data, list(range(s, min(s + bs, n)))))
               for s in range(0, n, bs)]  # fmt: skip
    result, metrics = train_and_save(ctx, model, tok, objective, settings, val_obj, val, cfg.lora)
    metrics |= {"data/train_replies": len(tokenized), "data/desirable": good,
                "data/val_replies": len(val_recs)}  # fmt: skip
    metrics |= result.last | stats.metrics() | (val_stats.metrics("val_") if val_recs else {})
    metrics |= {f"read/{k}": v for k, v in read.items() if isinstance(v, int)}
    return StageResult(metrics | result.eval, {"model": f"{ctx.name}/model"})
