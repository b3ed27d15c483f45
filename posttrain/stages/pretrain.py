"""The pretrain stage: next-token training of a base model on a text corpus.

On the toy world it builds a tiny Llama from a preset and trains it on the world's corpus; on a
user's model it continues pre-training a local HF directory on their text (JSONL or .txt).
`midtrain` mixes instruction data (chat rendered with the template, or text) into the last part
of training, DESIGN.md's mid-training: from step `start` x steps, `fraction` of every
micro-batch's windows come from it (the rest, and every earlier step, are unchanged).
Then it measures held-out perplexity and, on the toy world, the base model's gold score on the
verifiable task families by few-shot continuation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from posttrain.models.lora import LoraSettings, lora_field
from posttrain.settings import SettingError, StrictModel, is_set
from posttrain.stages.base import StageContext, StageResult, resolve_input, train_with_progress
from posttrain.train import dist
from posttrain.train.loop import TrainSettings, micro_per_step


class EvalSettings(StrictModel):
    families: list[str] = Field(
        ["arithmetic", "string", "knowledge"],
        description="Toy-world families scored by few-shot continuation.",
    )
    n_per_family: int = Field(
        50, ge=0, description="Eval-split tasks per family (0: skip the gold eval)."
    )
    few_shot: int = Field(3, ge=0, description="Worked examples in each few-shot prompt.")
    max_new_tokens: int = Field(48, ge=1, description="Tokens generated per few-shot answer.")
    max_heldout_tokens: int = Field(
        200_000, ge=1, description="Cap on held-out tokens for perplexity."
    )

    @model_validator(mode="after")
    def _no_gold_eval_no_settings(self) -> EvalSettings:
        for key in ("families", "few_shot", "max_new_tokens"):
            if self.n_per_family == 0 and is_set(self, key):
                raise SettingError(key, "{at}n_per_family is 0 (no few-shot gold eval), so it "
                                   "has no effect: drop it")  # fmt: skip
        return self


class MidtrainSettings(StrictModel):
    data: str | None = Field(
        None,
        description="Instruction data mixed into the end of pre-training: chat JSONL (any format "
        "the sft stage reads, rendered with the chat template) or text; null: off.",
    )
    from_world: bool = Field(
        False, description="Use the toy world's SFT conversations (sft_train.jsonl) as the data."
    )
    format: Literal["chat", "text"] = Field(
        "chat", description="chat: conversations through the chat template; text: {text} JSONL."
    )
    start: float = Field(
        0.8,
        ge=0,
        lt=1,
        description="Fraction of the steps after which it is mixed in (with a "
        "wsd schedule, set it to where the decay starts).",
    )
    fraction: float = Field(
        0.25, gt=0, le=1, description="Share of each micro-batch's windows drawn from it then."
    )

    @model_validator(mode="after")
    def _one_source(self) -> MidtrainSettings:
        if self.data and self.from_world:
            raise ValueError("midtrain: give data or from_world, not both")
        for key in ("format", "start", "fraction"):
            if not (self.data or self.from_world) and is_set(self, key):
                raise SettingError(key, "mid-training is off ({at}data is null and "
                                   "{at}from_world false), so it has no effect: give data, or "
                                   "drop it")  # fmt: skip
        return self


class Config(StrictModel):
    model: str = Field(
        "toy-xs",
        description="Preset to build from scratch (toy-xs, toy-s, toy-m) or a local HF model directory.",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer directory; default: the world stage's tokenizer."
    )
    data: str | None = Field(
        None, description="Training text (.jsonl of {text} or .txt); default: the toy corpus."
    )
    heldout: str | None = Field(
        None, description="Held-out text for perplexity; default: the toy held-out corpus."
    )
    world_stage: str = Field("world", description="Stage whose corpus/tokenizer are the defaults.")
    lora: LoraSettings = lora_field(
        "LoRA adapters for continued pre-training of a model directory (not of a preset: a "
        "model built from scratch has nothing to adapt)."
    )
    seq_len: int = Field(256, ge=8, description="Tokens per training window.")
    batch_size: int = Field(16, ge=1, description="Windows per micro-batch.")
    train: TrainSettings = Field(
        default_factory=TrainSettings, description="Optimiser and schedule."
    )
    eval: EvalSettings = Field(default_factory=EvalSettings, description="Held-out evaluation.")
    midtrain: MidtrainSettings = Field(
        default_factory=MidtrainSettings,
        description="Mid-training: instruction data mixed into the last part (the decay phase).",
    )

    @model_validator(mode="after")
    def _no_silent_settings(self) -> Config:
        if is_set(self.train, "eval_every"):
            raise SettingError("train.eval_every", "pretrain measures held-out perplexity once, "
                               "at the end (no evaluation during training): drop it")  # fmt: skip
        return self


def inputs(cfg: Config, ctx: StageContext) -> dict[str, Path]:
    found = {
        "data": resolve_input(cfg.data, ctx, cfg.world_stage, "corpus_train.jsonl"),
        "heldout": resolve_input(cfg.heldout, ctx, cfg.world_stage, "corpus_heldout.jsonl"),
    }
    if cfg.tokenizer or cfg.model in _presets():
        found["tokenizer"] = resolve_input(cfg.tokenizer, ctx, cfg.world_stage, "tokenizer")
    if cfg.model not in _presets():
        found["model"] = Path(cfg.model)
    if cfg.midtrain.data or cfg.midtrain.from_world:
        found["midtrain"] = resolve_input(
            cfg.midtrain.data, ctx, cfg.world_stage, "sft_train.jsonl"
        )
    return found


def _presets():
    from posttrain.models.presets import PRESETS

    return PRESETS


class WindowObjective:
    """Random windows of a token stream; the windows of step s depend only on (seed, s)."""

    def __init__(
        self,
        stream: torch.Tensor,
        seq_len: int,
        batch_size: int,
        grad_accum: int,
        seed: int,
        device,
        mid: tuple[torch.Tensor, int, float] | None = None,
    ):
        if len(stream) < seq_len + 2:
            raise ValueError(f"training text too short: {len(stream)} tokens for seq_len {seq_len}")
        self.stream, self.seq_len, self.batch_size = stream, seq_len, batch_size
        self.grad_accum, self.seed, self.device = grad_accum, seed, device
        # mid-training: (its stream, the first step that mixes it in, its share of windows)
        self.mid = mid
        if mid is not None and len(mid[0]) < seq_len + 2:
            raise ValueError(
                f"mid-training text too short: {len(mid[0])} tokens for seq_len {seq_len}"
            )

    def batches(self, step: int) -> list[torch.Tensor]:
        """This rank's micro-batches: a step draws grad_accum x ranks of them, rank r takes
        every W-th (one process with W x grad_accum draws the same windows)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        high = len(self.stream) - self.seq_len - 1
        n = micro_per_step(self.grad_accum)
        starts = torch.randint(0, high, (n, self.batch_size), generator=g)
        span = torch.arange(self.seq_len + 1)
        mine = dist.shard(list(range(n)))  # every rank draws all n, gathers only its own
        windows = self.stream[starts[mine, :, None] + span]  # (len(mine), B, T+1)
        if self.mid is not None and step >= self.mid[1]:
            mid, _, share = self.mid
            k = max(1, round(share * self.batch_size))  # the last k windows of each micro-batch
            gm = torch.Generator().manual_seed(self.seed * 1_000_033 + step)
            mstarts = torch.randint(0, len(mid) - self.seq_len - 1, (n, k), generator=gm)
            windows[:, self.batch_size - k :] = mid[mstarts[mine, :, None] + span]
        return [w.to(self.device) for w in windows]  # each (B, T+1)

    def weight(self, batch: torch.Tensor) -> float:
        return batch.shape[0] * (batch.shape[1] - 1)

    def tokens(self, batch: torch.Tensor) -> int:
        return batch.shape[0] * (batch.shape[1] - 1)

    def loss(self, model, batch: torch.Tensor):
        from posttrain.ops.lm import lm_loss_sum

        # use_cache=False: no KV cache built (and copied into) on every training forward.
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits  # (B, T, V)
        loss, _ = lm_loss_sum(logits, batch[:, 1:])
        return loss, {}


def _midtrain_texts(cfg: MidtrainSettings, path: Path, tok) -> list[str]:
    """Mid-training documents: text, or conversations rendered with the chat template."""
    from posttrain.data.text import read_texts

    if cfg.format == "text":
        return read_texts(path)
    from posttrain.data.readers import load_chat_data

    examples, _ = load_chat_data(path)
    return [tok.apply_chat_template(e["messages"], tokenize=False) for e in examples]


def _model_and_tokenizer(cfg: Config, ctx: StageContext, paths: dict):
    from posttrain.models.load import load_model
    from posttrain.models.presets import build_model, count_parameters
    from posttrain.models.tokenizer import load_tokenizer

    tok = load_tokenizer(paths.get("tokenizer") or cfg.model)
    if cfg.model in _presets():
        model = build_model(
            cfg.model, tok, max_position_embeddings=max(512, cfg.seq_len), seed=ctx.seed
        )
    else:
        model = load_model(cfg.model)
    ctx.logger.info(
        f"{ctx.name}: model {cfg.model} with {count_parameters(model) / 1e6:.2f}M parameters"
    )
    if cfg.lora.enabled:
        if cfg.model in _presets():
            raise ValueError(f"{ctx.name}.lora: {cfg.model} is a preset built from scratch (random "
                             "weights); LoRA adapts a trained model: give a model directory as "
                             f"{ctx.name}.model, or set lora.enabled: false")  # fmt: skip
        from posttrain.models.lora import apply_lora

        model = apply_lora(model, cfg.lora)
    return model.to(ctx.device), tok


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from posttrain.data.text import read_texts, tokenize_stream
    from posttrain.eval.perplexity import perplexity
    from posttrain.io import atomic_write_jsonl
    from posttrain.models.lora import save_trained

    paths = inputs(cfg, ctx)
    model, tok = _model_and_tokenizer(cfg, ctx, paths)
    stream = tokenize_stream(read_texts(paths["data"]), tok)
    ctx.logger.info(
        f"{ctx.name}: {len(stream):,} training tokens; {cfg.train.steps} steps of "
        f"{cfg.batch_size * micro_per_step(cfg.train.grad_accum) * cfg.seq_len:,} tokens"
    )
    mid = None
    if "midtrain" in paths:
        mid_stream = tokenize_stream(_midtrain_texts(cfg.midtrain, paths["midtrain"], tok), tok)
        first = int(cfg.midtrain.start * cfg.train.steps)
        mid = (mid_stream, first, cfg.midtrain.fraction)
        ctx.logger.info(f"{ctx.name}: mid-training on {len(mid_stream):,} tokens of "
                        f"{paths['midtrain']}, {cfg.midtrain.fraction:.0%} of the windows from "
                        f"step {first + 1}")  # fmt: skip
    objective = WindowObjective(
        stream, cfg.seq_len, cfg.batch_size, cfg.train.grad_accum, ctx.seed, ctx.device, mid
    )
    result = train_with_progress(ctx, model, objective, cfg.train)
    metrics = {
        "train/loss": result.final_loss,
        "train/steps": result.steps,
        "train/tokens": result.tokens,
        "train/seconds": round(result.seconds, 2),
        "train/epochs": round(result.tokens / len(stream), 3),
    }
    if mid is not None:
        metrics |= {"midtrain/tokens": len(mid[0]), "midtrain/first_step": mid[1] + 1}
    if not dist.is_main():  # rank 0 saves and evaluates; its result is the stage's
        return StageResult(metrics)
    model = save_trained(model, tok, ctx.stage_dir / "model", cfg.lora)

    heldout = tokenize_stream(read_texts(paths["heldout"]), tok)
    metrics |= perplexity(model, heldout, cfg.seq_len, max_tokens=cfg.eval.max_heldout_tokens)
    artifacts = {"model": f"{ctx.name}/model"}
    if cfg.eval.n_per_family and cfg.data is None:  # the gold eval needs the toy world
        from posttrain.eval.fewshot import fewshot_gold

        gold, records = fewshot_gold(
            model,
            tok,
            ctx.world(),
            cfg.eval.families,
            cfg.eval.n_per_family,
            cfg.eval.few_shot,
            cfg.eval.max_new_tokens,
        )
        metrics |= gold
        atomic_write_jsonl(ctx.stage_dir / "fewshot_eval.jsonl", records)
        artifacts["fewshot_eval"] = f"{ctx.name}/fewshot_eval.jsonl"
    return StageResult(metrics, artifacts)
