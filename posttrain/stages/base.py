"""What every stage gets (StageContext) and returns (StageResult)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from posttrain.log import Logger

if TYPE_CHECKING:  # the pipeline is built above the stages (config.py knows their registry)
    from posttrain.config import Pipeline


@dataclass
class StageResult:
    metrics: dict[str, float | int | str | None]  # namespaced, e.g. "train/loss", "eval/perplexity"
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> path relative to the run dir
    evals: dict[str, dict] = field(
        default_factory=dict
    )  # model label -> eval summary (report card)
    samples: dict[str, list] = field(default_factory=dict)  # model label -> sample responses


@dataclass
class StageContext:
    name: str
    kind: str
    run_dir: Path
    pipeline: Pipeline
    logger: Logger
    resume: bool = False

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.name

    def stage_path(self, stage: str, *parts: str) -> Path:
        """A path inside another stage's folder of this run."""
        return self.run_dir.joinpath(stage, *parts)

    @property
    def seed(self) -> int:
        """The stage's own seed: derived from the global seed and the stage name."""
        return (self.pipeline.config.seed * 1_000_003 + zlib.crc32(self.name.encode())) % 2**31

    @property
    def device(self):
        from posttrain.models.load import resolve_device

        return resolve_device(self.pipeline.config.device)

    def world(self):
        from posttrain.world import World

        return World(self.pipeline.world_config())

    def relative(self, path: Path) -> str:
        try:
            return str(Path(path).relative_to(self.run_dir))
        except ValueError:
            return str(path)


def resolve_input(value: str | None, ctx: StageContext, default_stage: str, *parts: str) -> Path:
    """An explicit path if given, else a file of another stage of this run. A given path whose
    first part names a stage of this pipeline (and that is not a path that exists from here),
    e.g. `self_instruct/sft_train.jsonl`, is that file of that stage's folder in this run."""
    if not value:
        return ctx.stage_path(default_stage, *parts)
    path = Path(value)
    names = {s.name for s in [*ctx.pipeline.stages, *ctx.pipeline.unlisted]}
    if not path.is_absolute() and len(path.parts) > 1 and path.parts[0] in names:
        if not path.exists():
            return ctx.stage_path(*path.parts)
    return path


def resolve_model(value: str, ctx: StageContext) -> Path:
    """A stage name of this pipeline means that stage's model/; anything else is a directory,
    checked here, before the stage starts (a missing one is the pipeline's "input not found")."""
    names = {s.name for s in [*ctx.pipeline.stages, *ctx.pipeline.unlisted]}  # run before, too
    if value in names:
        return ctx.stage_path(value, "model")
    if Path(value).exists():
        from posttrain.models.load import check_model_dir

        check_model_dir(value)
    return Path(value)


def train_with_progress(ctx: StageContext, model, objective, settings, evaluate=None):
    """The shared loop with this stage's progress line, checkpoints folder, resume and seed."""
    from posttrain.train import dist
    from posttrain.train.loop import check_schedule, train

    if note := check_schedule(settings, ctx.name):  # steps are known only now (epochs)
        ctx.logger.warning(note)
    # Under torchrun only rank 0 logs (the step's metrics are already summed over ranks).
    steplog = (
        ctx.logger.progress(ctx.name, settings.steps, ctx.stage_dir) if dist.is_main() else None
    )
    try:
        return train(model, objective, settings, ckpt_dir=ctx.stage_dir / "checkpoints", steplog=steplog,
                     resume=ctx.resume, seed=ctx.seed, evaluate=evaluate)  # fmt: skip
    finally:
        if steplog is not None:
            steplog.close()


def train_and_save(ctx: StageContext, model, tok, objective, settings, val_objective=None,
                   val_batches: list | None = None, lora=None) -> tuple:  # fmt: skip
    """Train a policy (held-out batches through `val_objective` ten times over the run unless
    settings.eval_every says otherwise), save it to <stage>/model on rank 0 (merged or as an
    adapter under `lora`); returns the TrainResult and the metrics every training stage reports."""
    from functools import partial

    from posttrain.models.lora import save_trained
    from posttrain.train import dist
    from posttrain.train.loop import evaluate_objective

    evaluate = None
    if val_batches:
        evaluate = partial(evaluate_objective, objective=val_objective, batches=val_batches)
        if not settings.eval_every:
            settings = settings.model_copy(update={"eval_every": max(1, settings.steps // 10)})
    result = train_with_progress(ctx, model, objective, settings, evaluate)
    if dist.is_main():
        save_trained(model, tok, ctx.stage_dir / "model", lora)
    metrics = {"train/loss": result.final_loss, "train/steps": result.steps,
               "train/seconds": round(result.seconds, 2)}  # fmt: skip
    return result, metrics
