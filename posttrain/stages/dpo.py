"""The DPO stage: optimise the policy directly on preference pairs (DPO and relatives).

Losses are pure functions chosen by name from posttrain.ops.preference.DPO_LOSSES: `sigmoid`
(DPO; with `label_smoothing` > 0, conservative DPO), `ipo`, `hinge` (SLiC), and the
reference-free, length-normalised `simpo` and `orpo` (ORPO adds the chosen response's NLL: SFT and
preference optimisation in one stage, straight from a base model). Each micro-batch of B pairs is one forward pass over its 2B
sequences (chosen then rejected), log-probs summed over the response tokens and end-of-turn,
with the LM head applied only at those positions. The reference log-probs are computed once
before training (`precompute_ref`, default) with the frozen initial model, so no second model
sits in memory during training; otherwise a frozen copy runs beside the policy.

Logged per step: rewards/chosen, rewards/rejected, rewards/margin, rewards/accuracy (implicit
rewards beta * log-ratio), and kl/ref: the mean of the policy-minus-reference log-ratio over the
pair's two responses, an estimate of KL(policy || ref) on the preference data (not on the
policy's own samples, which the evaluate stage measures).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from posttrain.models.lora import LoraSettings, lora_field
from posttrain.settings import SettingError, is_set
from posttrain.stages._prefs import PairTraining, load_split_pairs, log_fit, pairs_path
from posttrain.stages.base import StageContext, StageResult, resolve_model, train_and_save
from posttrain.train.loop import (
    MicroBatchObjective,
    TrainSettings,
    check_epochs,
    check_heldout,
    micro_per_step,
)


class Config(PairTraining):
    model: str = Field("sft", description="Stage or HF dir of the initial policy.")
    train: TrainSettings = Field(
        default_factory=lambda: TrainSettings(lr=5e-6, warmup_steps=5, weight_decay=0.0),
        description="Optimiser settings.",
    )
    ref_model: str | None = Field(
        None, description="Reference model (default: the initial policy)."
    )
    loss: Literal["sigmoid", "ipo", "hinge", "simpo", "orpo"] = Field(
        "sigmoid", description="DPO-family loss (posttrain.ops.preference.DPO_LOSSES)."
    )
    beta: float = Field(
        0.1, gt=0, description="Inverse temperature of the implicit reward (orpo: lambda)."
    )
    label_smoothing: float = Field(
        0.0, ge=0, le=0.5, description="sigmoid: assumed label-noise rate (conservative DPO)."
    )
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin gamma.")
    precompute_ref: bool = Field(
        True, description="Reference log-probs once before training (no reference in memory)."
    )
    lora: LoraSettings = lora_field(
        "LoRA adapters on the policy; the reference is the same base with them switched off."
    )

    @model_validator(mode="after")
    def _no_silent_settings(self) -> Config:
        from posttrain.ops.preference import REFERENCE_FREE

        check_epochs(self.epochs, self.train)
        check_heldout(self.train, self.data.val_fraction, "data.val_fraction")
        if self.label_smoothing > 0 and self.loss != "sigmoid":
            raise SettingError("label_smoothing", f"only loss: sigmoid (conservative DPO) uses "
                               f"it, and {{at}}loss is {self.loss}: drop it")  # fmt: skip
        if self.loss != "simpo" and is_set(self, "simpo_gamma"):
            raise SettingError("simpo_gamma", f"only loss: simpo uses it, and {{at}}loss is "
                               f"{self.loss}: drop it")  # fmt: skip
        for key in ("ref_model", "precompute_ref"):
            if self.loss in REFERENCE_FREE and is_set(self, key):
                raise SettingError(key, f"loss {self.loss} is reference-free (no reference "
                                   "model, no reference log-probs): drop it")  # fmt: skip
        return self


def inputs(cfg: Config, ctx: StageContext) -> dict[str, Path]:
    found = {"model": resolve_model(cfg.model, ctx), "pairs": pairs_path(cfg.data, ctx)}
    if cfg.ref_model:
        found["ref_model"] = resolve_model(cfg.ref_model, ctx)
    return found


@torch.no_grad()
def reference_logps(model, batches, device, n_pairs: int, mean: bool = False, precision: str = "fp32",
                    progress=None) -> torch.Tensor:  # fmt: skip
    """(n_pairs, 2) chosen/rejected log-probs under `model`, indexed by pair; `progress(done,
    total)` is called after each batch."""
    from posttrain.data.pairs import sequence_logps
    from posttrain.train.precision import autocast

    was_training = model.training
    model.eval()
    out = torch.zeros((n_pairs, 2))
    for k, sb in enumerate(batches):
        with autocast(precision, device):
            lp = sequence_logps(model, sb.to(device), mean=mean).float().cpu()
        out[sb.index, 0], out[sb.index, 1] = lp[: sb.n_pairs], lp[sb.n_pairs :]
        if progress is not None:
            progress(k + 1, len(batches))
    model.train(was_training)
    return out


def reference_of(model, ctx: StageContext, paths: dict, lora: LoraSettings):
    """The reference policy: `ref_model` if given, else the initial policy: under LoRA the same
    module with its adapters off (one copy of the base in memory), else the model itself (to
    be copied if it must stay frozen beside the trained one)."""
    from posttrain.models.load import load_model
    from posttrain.models.lora import BaseView

    if "ref_model" in paths:
        return load_model(paths["ref_model"], ctx.device).eval().requires_grad_(False)
    return BaseView(model) if lora.enabled else model


def ref_progress(ctx: StageContext, what: str):
    """A progress callback for reference passes: a line about every tenth of the way."""
    import time

    t0 = time.perf_counter()

    def report(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            rate = done / max(time.perf_counter() - t0, 1e-9)
            ctx.logger.info(f"{ctx.name}: {what}: batch {done}/{total} "
                            f"({rate:.1f} batches/s, eta {(total - done) / rate:.0f} s)")  # fmt: skip

    return report


class DPOObjective(MicroBatchObjective):
    """A DPO-family loss summed over a micro-batch's pairs; a step's loss is its pair mean."""

    def __init__(self, cfg: Config, data, device, ref_logps=None, ref_model=None):
        super().__init__(data, cfg.train.grad_accum, device)
        self.cfg, self.ref_logps, self.ref_model = cfg, ref_logps, ref_model

    def weight(self, sb) -> float:
        return sb.n_pairs

    def tokens(self, sb) -> int:
        return sb.batch.n_tokens

    def _ref(self, sb) -> tuple[torch.Tensor, torch.Tensor]:
        from posttrain.data.pairs import sequence_logps

        if self.ref_logps is not None:
            ref = self.ref_logps[sb.index].to(self.device)
            return ref[:, 0], ref[:, 1]
        with torch.no_grad():
            lp = sequence_logps(self.ref_model, sb)
        return lp[: sb.n_pairs], lp[sb.n_pairs :]

    def loss(self, model, sb):
        from posttrain.data.pairs import sequence_logps
        from posttrain.ops.preference import REFERENCE_FREE, dpo_loss

        cfg, B = self.cfg, sb.n_pairs
        lp = sequence_logps(model, sb)
        pc, pr = lp[:B], lp[B:]
        has_ref = self.ref_logps is not None or self.ref_model is not None
        rc, rr = self._ref(sb) if has_ref else (None, None)
        if cfg.loss in REFERENCE_FREE:
            n_tok = (
                torch.zeros(sb.n_seqs, device=lp.device)
                .index_add(0, sb.target_seq, torch.ones_like(sb.target_seq, dtype=torch.float))
                .clamp(min=1)
            )
            kw = {"gamma": cfg.simpo_gamma} if cfg.loss == "simpo" else {}
            loss, m = dpo_loss(cfg.loss, pc / n_tok[:B], pr / n_tok[B:], None, None, cfg.beta, **kw)
        else:
            kw = {"label_smoothing": cfg.label_smoothing} if cfg.loss == "sigmoid" else {}
            loss, m = dpo_loss(cfg.loss, pc, pr, rc, rr, cfg.beta, **kw)
        metrics = {k: v * B for k, v in m.items()}
        if rc is not None:
            metrics["kl/ref"] = (((pc - rc) + (pr - rr)) / 2).detach().sum()
        return loss.sum(), metrics


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from posttrain.data.collate import check_packing_isolation
    from posttrain.data.pairs import PairBatches, tokenize_pairs
    from posttrain.models.load import load_model
    from posttrain.models.tokenizer import load_tokenizer

    paths = inputs(cfg, ctx)
    tok = load_tokenizer(paths["model"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    train_pairs, val_pairs, read_stats = load_split_pairs(cfg.data, ctx)
    tokenized, stats = tokenize_pairs(tok, train_pairs, cfg.data.max_length, cfg.data.overlong)
    log_fit(ctx, stats, cfg.data)
    model = load_model(paths["model"], ctx.device)
    if cfg.lora.enabled:
        from posttrain.models.lora import apply_lora

        model = apply_lora(model, cfg.lora)
    row_len = 2 * cfg.data.max_length
    data = PairBatches(tokenized, batch_size=cfg.batch_size, pad_id=pad, packing=cfg.packing,
                       row_len=row_len, seed=ctx.seed)  # fmt: skip
    if cfg.packing:
        check_packing_isolation(model, [tokenized[0].chosen, tokenized[0].rejected], pad)
    val = []
    if val_pairs:
        val_tok, val_stats = tokenize_pairs(tok, val_pairs, cfg.data.max_length, cfg.data.overlong)
        log_fit(ctx, val_stats, cfg.data, "held-out pairs")
        val = PairBatches(val_tok, batch_size=cfg.batch_size, pad_id=pad, packing=cfg.packing,
                          row_len=row_len, seed=0).all()  # fmt: skip
    ref_model = ref_logps = val_ref = None
    from posttrain.ops.preference import REFERENCE_FREE

    if cfg.loss not in REFERENCE_FREE:
        ref = reference_of(model, ctx, paths, cfg.lora)
        if cfg.precompute_ref:
            n = len(tokenized) + (len(val_tok) if val else 0)
            ctx.logger.info(f"{ctx.name}: reference log-probs of {n} pairs")
            prec, show = cfg.train.precision, ref_progress(ctx, "reference log-probs")
            ref_logps = reference_logps(ref, data.all(), ctx.device, len(tokenized), precision=prec,
                                        progress=show)  # fmt: skip
            if val:
                val_ref = reference_logps(ref, val, ctx.device, len(val_tok), precision=prec)
            del ref
        elif ref is model:  # full fine-tuning: a frozen copy beside the policy
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        else:
            ref_model = ref
    settings = cfg.train
    if cfg.epochs is not None:
        settings = settings.model_copy(
            update={"steps": data.steps_for(cfg.epochs, micro_per_step(settings.grad_accum))}
        )
    ctx.logger.info(f"{ctx.name}: {cfg.loss} (beta {cfg.beta}) on {len(tokenized)} train pairs, {settings.steps} steps")  # fmt: skip
    objective = DPOObjective(cfg, data, ctx.device, ref_logps, ref_model)
    val_obj = DPOObjective(cfg, None, ctx.device, val_ref, ref_model) if val else None
    val = [sb.to(ctx.device) for sb in val]
    result, metrics = train_and_save(ctx, model, tok, objective, settings, val_obj, val, cfg.lora)
    metrics |= result.last | stats.metrics() | (val_stats.metrics("val_") if val_pairs else {}) | read_stats | result.eval  # fmt: skip
    return StageResult(metrics, {"model": f"{ctx.name}/model"})
