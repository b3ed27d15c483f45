"""The one training loop every stage shares.

A stage supplies an `Objective`: which micro-batches make optimiser step `step`, how much each
weighs (e.g. its number of loss tokens), and the *summed* loss of one micro-batch. The loop
divides every micro-batch's summed loss by the total weight of the whole step before backward,
so gradient accumulation gives exactly the gradient of one big batch (the bug where each
micro-batch is averaged on its own, then averaged again, cannot happen here).

The loop knows nothing about any one stage: AdamW, schedule, accumulation, clipping, mixed
precision, logging, checkpoints, resume and the NaN stop live here.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import Field, model_validator

from posttrain.settings import SettingError, StrictModel, is_set
from posttrain.train import dist
from posttrain.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from posttrain.train.schedule import lr_multiplier


class TrainSettings(StrictModel):
    steps: int = Field(200, ge=1, description="Optimiser steps.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    schedule: Literal["cosine", "wsd", "linear", "constant"] = Field(
        "cosine",
        description="LR schedule after warmup: cosine, warmup-stable-decay (MiniCPM), linear, constant.",
    )
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of the peak.")
    decay_fraction: float = Field(
        0.2, gt=0, le=1, description="WSD: fraction of steps in the decay phase."
    )
    weight_decay: float = Field(
        0.1, ge=0, description="AdamW weight decay on matrices (not norms/biases)."
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the global grad norm (null: no clip)."
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16 autocast (GPU) over fp32 weights, or fp32."
    )
    checkpoint_every: int = Field(
        50, ge=0, description="Save a resumable checkpoint every N steps (0: never)."
    )
    eval_every: int = Field(
        0,
        ge=0,
        description="Run the stage's held-out evaluation every N steps and at the end (0: never).",
    )
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each transformer block's activations in the backward pass "
        "instead of keeping them (less memory, about a third more compute).",
    )
    fsdp: bool = Field(
        False,
        description="Under torchrun: shard weights, gradients and AdamW state across ranks "
        "(FSDP2) instead of a full copy per rank. An error in a single process.",
    )
    compile: bool = Field(
        False,
        description="torch.compile each transformer block for training (GPU: fuses the "
        "elementwise kernels; the first steps pay the compile). Numerics differ in the last bits.",
    )

    @model_validator(mode="after")
    def _no_silent_settings(self) -> TrainSettings:
        unused = {
            "decay_fraction": (self.schedule != "wsd", "only schedule: wsd has a decay phase"),
            "min_lr_ratio": (self.schedule == "constant", "schedule: constant never decays"),
            "keep_checkpoints": (self.checkpoint_every == 0, "checkpoint_every is 0 (none)"),
        }
        for key, (off, why) in unused.items():
            if off and is_set(self, key):
                raise SettingError(key, f"has no effect: {why} ({{at}}schedule "
                                   f"{self.schedule}, {{at}}checkpoint_every "
                                   f"{self.checkpoint_every}); drop it")  # fmt: skip
        return self


def check_epochs(epochs: float | None, train: TrainSettings) -> None:
    """A stage with `epochs` (sft, reward, dpo, kto) sets train.steps from them: train.steps
    given too (other than its default, which a resolved config spells out) would be silently
    replaced. Call from the stage Config's validator."""
    if epochs is not None and is_set(train, "steps"):
        raise SettingError("train.steps", f"is replaced by the steps that {{at}}epochs ({epochs:g}) "
                           "makes of the data; set {at}epochs: null to train for "
                           f"{{at}}train.steps ({train.steps}) steps, or drop {{at}}train.steps")  # fmt: skip


def check_heldout(train: TrainSettings, val_fraction: float, key: str) -> None:
    """train.eval_every with nothing held out (`key`, the val_fraction's name, at 0) does nothing."""
    if val_fraction == 0 and is_set(train, "eval_every"):
        raise SettingError("train.eval_every", f"{{at}}{key} is 0, so nothing is held out to "
                           f"evaluate: set {{at}}{key} above 0, or drop it")  # fmt: skip


def check_schedule(settings: TrainSettings, stage: str) -> str | None:
    """Once a run's steps are known (after `epochs` made them): a warning (or None) when the
    warm-up is longer than the run, which then never reaches its learning rate. A warning, not
    an error: the stages' default warm-up outlasts the tiny runs of tests and smoke checks."""
    if settings.warmup_steps <= settings.steps:
        return None
    return (f"{stage}.train.warmup_steps ({settings.warmup_steps}) is longer than the run's "
            f"{settings.steps} steps ({stage}.train.steps, or what {stage}.epochs made of the "
            f"data): the learning rate peaks at {settings.steps / settings.warmup_steps:.0%} of "
            f"{stage}.train.lr ({settings.lr:g}); set {stage}.train.warmup_steps to at most "
            f"{settings.steps}, or train longer")  # fmt: skip


class Objective(Protocol):
    def batches(self, step: int) -> list[Any]:
        """The micro-batches of optimiser step `step`; a pure function of `step` (for resume)."""

    def weight(self, batch: Any) -> float:
        """The units the loss of `batch` is summed over (loss tokens, sequences, pairs)."""

    def loss(self, model, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """(summed loss over the batch's weight units, metrics summed the same way)."""

    def tokens(self, batch: Any) -> int:
        """Tokens processed by the forward pass (for tokens/s)."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/inf; the last good checkpoint is kept."""


class MicroBatchObjective:
    """The batching half of an Objective: optimiser step s takes micro-batches
    s * G ... s * G + G - 1 of `data` (anything with .micro(k), a pure function of k, so a
    resumed run sees the same data), moved to the device; G = grad_accum x the data-parallel
    ranks, each rank taking every W-th (`dist`)."""

    def __init__(self, data, grad_accum: int, device):
        self.data, self.grad_accum, self.device = data, grad_accum, device

    def batches(self, step: int) -> list:
        return [
            self.data.micro(k).to(self.device) for k in step_micro_indices(step, self.grad_accum)
        ]


def micro_per_step(grad_accum: int) -> int:
    """Micro-batches one optimiser step consumes, over all data-parallel ranks."""
    return grad_accum * dist.world()


def step_micro_indices(step: int, grad_accum: int) -> list[int]:
    """The micro-batch indices this rank trains at optimiser step `step`."""
    per_step = micro_per_step(grad_accum)
    return dist.shard(list(range(step * per_step, (step + 1) * per_step)))


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    tokens: int
    seconds: float
    resumed_from: int | None
    eval: dict = field(default_factory=dict)  # the last held-out evaluation's metrics
    last: dict = field(default_factory=dict)  # the objective's own metrics at the last step


def make_optimizer(model: torch.nn.Module, cfg: TrainSettings) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # One fused kernel for the whole update, on CUDA (the per-tensor loop costs a launch each)
    # and on the CPU (7x faster on a 7.4M-parameter model: 15 ms a step against 110); not for
    # sharded (DTensor) parameters.
    fused = bool(params) and all(
        p.device.type in ("cuda", "cpu") and not hasattr(p, "to_local") for p in params
    )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def _autocast(cfg: TrainSettings, device: torch.device):
    if cfg.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _lr(cfg: TrainSettings, step: int) -> float:
    return cfg.lr * lr_multiplier(
        step,
        cfg.steps,
        schedule=cfg.schedule,
        warmup_steps=cfg.warmup_steps,
        min_lr_ratio=cfg.min_lr_ratio,
        decay_fraction=cfg.decay_fraction,
    )


def train_step(model, objective: Objective, micro: list, cfg: TrainSettings, device) -> dict:
    """Forward/backward over this rank's micro-batches of one step; returns the step's metrics
    summed over every rank's micro-batches, divided by the step's total weight (all ranks)."""
    total_weight = dist.all_sum([sum(objective.weight(b) for b in micro)])[0]
    if total_weight <= 0:
        raise ValueError("a training step has no loss tokens (total weight 0)")
    # FSDP: the loss runs inside the sharded root's registered method (posttrain.train.fsdp),
    # and every rank runs every backward (each one is a collective), NaN or not.
    sharded = hasattr(model, "_posttrain_call")
    loss_sum, sums, tokens, bad = 0.0, {}, 0, None
    for batch in micro:
        with _autocast(cfg, device):
            if sharded:
                loss, metrics = model._posttrain_call(objective.loss, batch)
            else:
                loss, metrics = objective.loss(model, batch)
        value = loss.item()
        if not math.isfinite(value):
            bad = value if bad is None else bad
            if not sharded:
                break
        # FSDP averages the ranks' gradients: scaled by W, the average is the sum.
        (loss * (dist.world() if sharded else 1) / total_weight).backward()
        loss_sum += value
        tokens += objective.tokens(batch)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    if dist.active():  # every rank learns whether any diverged, and the step's sums
        loss_sum, tokens, n_bad = dist.all_sum([loss_sum, tokens, float(bad is not None)])
        tokens = int(tokens)
        if n_bad:
            return {"nonfinite": float("nan") if bad is None else bad}
        keys = sorted(sums)
        sums = dict(zip(keys, dist.all_sum([sums[k] for k in keys]), strict=True))
        if not sharded:  # FSDP reduce-scattered them in the backward passes
            dist.sync_grads(model)
    elif bad is not None:
        return {"nonfinite": bad}
    return {"loss": loss_sum / total_weight, "tokens": tokens, "weight": total_weight} | {
        k: v / total_weight for k, v in sums.items()
    }


def train(
    model: torch.nn.Module,
    objective: Objective,
    cfg: TrainSettings,
    *,
    ckpt_dir: Path,
    steplog=None,
    resume: bool = False,
    seed: int = 0,
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
) -> TrainResult:
    """Run `cfg.steps` optimiser steps (from the last checkpoint when `resume`).

    `evaluate(model) -> {"eval/...": value}` runs every `cfg.eval_every` steps and at the end;
    its metrics join that step's line in metrics.jsonl. With `cfg.compile` the decoder layers
    run compiled during training and are plain again afterwards (for generation, saving).
    """
    dist.broadcast_params(model)  # every rank starts from rank 0's weights
    work = model
    if cfg.fsdp and dist.active():  # a sharded copy trains; `model` waits on the CPU
        from posttrain.train import fsdp

        if cfg.compile:
            raise ValueError("train.compile with train.fsdp is not supported yet; drop one")
        device = next(model.parameters()).device
        work = fsdp.shard(model, device)
    checkpointing = cfg.gradient_checkpointing and _set_checkpointing(work, True)
    layers = compile_layers(work) if cfg.compile else []
    try:
        result = _train(work, objective, cfg, ckpt_dir, steplog, resume, seed, evaluate)
    finally:
        uncompile_layers(layers)
        if checkpointing:
            _set_checkpointing(work, False)
    if work is not model:
        fsdp.unshard_into(model, work, device)
    else:
        dist.check_in_sync(model)  # data-parallel ranks took identical steps
    return result


def _set_checkpointing(model, on: bool) -> bool:
    """Hugging Face's activation checkpointing (non-reentrant: works with frozen inputs, LoRA)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"train.gradient_checkpointing: {type(model).__name__} does not support it; "
            "set train.gradient_checkpointing: false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x's names
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()
    return True


def compile_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """torch.compile each transformer block's forward ("regional" compilation: the blocks share
    one compiled graph, so compiling costs one block, not the model), with dynamic shapes (the
    rows and lengths of batches vary). Fuses the elementwise work (norms, rotary, SwiGLU, the
    autocast casts) into few kernels: on a GPU, where small models are launch-bound, that is
    the step's main cost. Returns the blocks compiled (already-compiled ones are skipped)."""
    blocks = transformer_blocks(model)
    if blocks is None:
        raise ValueError(
            f"train.compile: found no list of transformer blocks in {type(model).__name__} "
            "(expected model.get_decoder().layers); set train.compile: false"
        )
    done = []
    for block in blocks:
        if "forward" not in vars(block):  # not compiled yet
            block.forward = torch.compile(block.forward, dynamic=True)
            done.append(block)
    return done


def uncompile_layers(blocks: list[torch.nn.Module]) -> None:
    for block in blocks:
        vars(block).pop("forward", None)


def transformer_blocks(model) -> torch.nn.ModuleList | None:
    """The list of transformer blocks (decoder layers) of a causal LM or a reward model."""
    get = getattr(model, "get_decoder", None)
    for owner in (get() if callable(get) else None, getattr(model, "model", None)):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return layers
    return None


def _train(model, objective, cfg, ckpt_dir, steplog, resume, seed, evaluate) -> TrainResult:
    device = _device(model)
    torch.manual_seed(seed)
    random.seed(seed)
    optimizer = make_optimizer(model, cfg)
    sharded = hasattr(model, "_posttrain_call")  # FSDP (posttrain.train.fsdp)
    start, resumed_from, tokens_total, extra = 0, None, 0, {}
    last = latest_checkpoint(ckpt_dir) if resume else None
    if last is not None:
        load = None
        if sharded:
            from posttrain.train.fsdp import load_full_states

            load = partial(load_full_states, model, optimizer)
        start, extra = load_checkpoint(last, model, optimizer, load)
        resumed_from, tokens_total = start, extra.get("tokens", 0)
    if steplog is not None:
        steplog.begin(start)
    model.train()
    last_good = last
    # What the last step reported; from the checkpoint, so that a run resumed at its last step
    # (nothing left to train) reports what the unbroken run did.
    final_loss = extra.get("loss", float("nan"))
    last_eval: dict = extra.get("eval", {})
    last_objective: dict = extra.get("last", {})
    t_start = time.perf_counter()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        lr = _lr(cfg, step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        out = train_step(model, objective, objective.batches(step), cfg, device)
        grad_norm = _clip(model, cfg) if "nonfinite" not in out else float("nan")
        if "nonfinite" in out or not math.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            what = f"loss {out['nonfinite']}" if "nonfinite" in out else f"grad norm {grad_norm}"
            raise TrainingDiverged(
                f"non-finite {what} at step {step + 1}; stopped. Last good checkpoint: "
                f"{last_good or 'none (lower the lr, or set checkpoint_every)'}"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        final_loss = out["loss"]
        tokens_total += out["tokens"]
        dt = time.perf_counter() - t0
        metrics = {
            "train/loss": out["loss"],
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens_per_s": out["tokens"] / dt if dt > 0 else 0.0,
            "train/tokens": tokens_total,
        }
        # The objective's metrics: already-namespaced keys ("rewards/margin") are kept as they are.
        last_objective = {(k if "/" in k else f"train/{k}"): v for k, v in out.items()
                          if k not in ("loss", "tokens", "weight")}  # fmt: skip
        metrics |= last_objective
        done = step + 1
        if (
            evaluate is not None
            and cfg.eval_every
            and (done % cfg.eval_every == 0 or done == cfg.steps)
        ):
            with _autocast(cfg, device):  # held-out passes in the training precision
                last_eval = model._posttrain_call(evaluate) if sharded else evaluate(model)
            model.train()
            metrics |= last_eval
        if steplog is not None:
            steplog.log(done, metrics)
        if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            states = None
            if sharded:  # gathered from the shards (every rank takes part)
                from posttrain.train.fsdp import full_states

                states = full_states(model, optimizer)
            if dist.is_main():  # the ranks hold the same weights and optimiser state
                extra = {"tokens": tokens_total, "loss": final_loss, "eval": last_eval,
                         "last": last_objective}  # fmt: skip
                last_good = save_checkpoint(
                    ckpt_dir, done, model, optimizer, extra, cfg.keep_checkpoints, states
                )
            dist.barrier()
    return TrainResult(
        cfg.steps,
        final_loss,
        tokens_total,
        time.perf_counter() - t_start,
        resumed_from,
        last_eval,
        last_objective,
    )


def _clip(model, cfg: TrainSettings) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if cfg.max_grad_norm is None:
        norms = [p.grad.detach().norm() for p in params]
        norm = torch.stack(norms).norm() if norms else torch.tensor(0.0)
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    # Sharded (FSDP) gradients give a DTensor norm over all shards.
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()


def _device(model) -> torch.device:
    p = next(model.parameters())
    return p.to_local().device if hasattr(p, "to_local") else p.device


@torch.no_grad()
def evaluate_objective(model, objective, batches: list) -> dict:
    """Held-out batches (on the device) through a training objective: "eval/loss" and its
    metrics, each averaged over the objective's weight (pairs, replies), in eval mode."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    total, n = 0.0, 0.0
    for b in batches:
        loss, m = objective.loss(model, b)
        total += loss.item()
        n += objective.weight(b)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    model.train(was_training)
    return {"eval/loss": total / n} | {f"eval/{k}": v / n for k, v in sums.items()}


def train_on_batches(model, objective, batches: list, cfg: TrainSettings) -> list[float]:
    """Train on a fixed list of micro-batches, one per step (the benchmarks' harness: same data,
    same order as a hand-written loop), without checkpoints; returns the step losses."""
    losses: list[float] = []

    class _Fixed:
        def __getattr__(self, name):
            return getattr(objective, name)

        def batches(self, step: int) -> list:
            return [batches[step]]

    class _Log:
        def begin(self, start: int) -> None:
            pass

        def log(self, step: int, metrics: dict) -> None:
            losses.append(metrics["train/loss"])

    train(model, _Fixed(), cfg.model_copy(update={"checkpoint_every": 0}), ckpt_dir="/nonexistent",
          steplog=_Log())  # fmt: skip
    return losses


def benchmark_settings(steps: int, lr: float) -> TrainSettings:
    """The benchmarks' recipe, which a hand-written loop reproduces exactly: AdamW (0.9, 0.999,
    1e-8, no weight decay), lr decaying linearly from `lr` to 0 without warm-up, clip 1.0."""
    return TrainSettings(steps=steps, lr=lr, schedule="linear", warmup_steps=0, min_lr_ratio=0.0,
                         weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, max_grad_norm=1.0,
                         checkpoint_every=0)  # fmt: skip
