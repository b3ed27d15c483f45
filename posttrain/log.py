"""One shared logger: human messages, a live progress line per step, metrics.jsonl, TensorBoard,
Weights & Biases.

On a terminal the progress is a rich progress bar; elsewhere (CI, pipes) it is one dense plain
line every `every` steps, nanochat style:
    pretrain step 40/200 | loss 1.234 | lr 3.00e-04 | tok/s 12,345 | eta 2:10
Each field's label is unique in its line: the training loss is `loss`, the held-out one `val
loss`; an RL step shows `gen tok/s` (sampling) and `train tok/s` (the update).

Besides metrics.jsonl a step's metrics go to sinks (`log(step, metrics)`, `close()`): a
progress's own (TensorBoard, <stage>/tb/) and the logger's `sinks`, which outlive a progress:
the running stage's W&B run (`wandb_run`, one per stage, opened and finished by the pipeline).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

from posttrain.io import append_jsonl, atomic_write_jsonl, read_jsonl
from posttrain.settings import ConfigError

_SHOWN = ("loss", "lr", "tokens_per_s")
# How a metric's namespace reads in the progress line (the training loop's own, "train", reads
# as nothing unless another field of the line has the same name).
_PREFIX = {"train": "", "eval": "val", "rollout": "gen", "sample": "gen"}


def _fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return (
        f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


def _fmt(key: str, v) -> str:
    if isinstance(v, float):
        if key.endswith("lr"):
            return f"{v:.2e}"
        if key.endswith("tokens_per_s"):
            return f"{v:,.0f}"
        return f"{v:.4g}"
    return str(v)


def shown_fields(metrics: dict) -> list[tuple[str, str]]:
    """(label, formatted value) of the metrics the progress line shows, each label unique:
    `train/loss` -> "loss", `eval/loss` -> "val loss", `policy/loss` -> "policy loss",
    `rollout/tokens_per_s` -> "gen tok/s" and, beside it, `train/tokens_per_s` -> "train tok/s"."""
    keys = [k for k in metrics if k.split("/")[-1] in _SHOWN]
    leaf = {k: k.split("/")[-1].replace("tokens_per_s", "tok/s") for k in keys}
    labels = {}
    for k in keys:
        ns = k.split("/")[0] if "/" in k else "train"
        prefix = _PREFIX.get(ns, ns.replace("_", " "))
        if not prefix and leaf[k] == "tok/s" and sum(leaf[j] == leaf[k] for j in keys) > 1:
            prefix = ns  # "train tok/s" beside "gen tok/s" (a loss beside "val loss" is clear)
        labels[k] = f"{prefix} {leaf[k]}" if prefix else leaf[k]
    return [(labels[k], _fmt(k, metrics[k])) for k in keys]


def is_interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


def numeric(metrics: dict) -> dict:
    """The metrics a plotting sink takes: numbers (a string or None stays in metrics.jsonl)."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


class TensorBoardSink:
    """TensorBoard event files of one progress (<stage>/tb/)."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: dict) -> None:
        for k, v in numeric(metrics).items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One stage's Weights & Biases run: its steps' metrics as history, its final metrics as the
    summary. `settings` is the pipeline's `log.wandb` (posttrain.config.WandbConfig)."""

    def __init__(self, settings, *, name: str, group: str, job_type: str, config: dict, run_dir):
        import wandb

        where = Path(settings.dir or run_dir)
        where.mkdir(parents=True, exist_ok=True)  # W&B writes to <dir>/wandb/
        self.run = wandb.init(project=settings.project, entity=settings.entity,
                              mode=settings.mode, name=name, group=settings.group or group,
                              job_type=job_type, tags=settings.tags, config=config,
                              dir=str(where), reinit="create_new")  # fmt: skip

    def log(self, step: int, metrics: dict) -> None:
        if values := numeric(metrics):
            self.run.log(values, step=step)

    def summarize(self, metrics: dict) -> None:
        self.run.summary.update(numeric(metrics))

    def close(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def _wandb_on(settings) -> bool:
    return settings is not None and settings.mode != "disabled"


def check_wandb(settings) -> None:
    """Before any stage runs: `log.wandb` needs the wandb package (an optional extra)."""
    if _wandb_on(settings) and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "config key 'log.wandb': logging to Weights & Biases needs the wandb package, which "
            "is not installed: pip install 'posttrain[wandb]' (or remove log.wandb)"
        )


@contextlib.contextmanager
def wandb_run(logger: Logger, settings, **run):
    """One stage's W&B run (WandbSink's keyword arguments), in `logger.sinks` while the stage
    runs, so that every progress of the stage logs to it; finished with exit code 1 if the stage
    raises. Yields None where nothing is logged: `settings` None or disabled, or a rank other
    than 0 under torchrun."""
    from posttrain.train import dist

    if not _wandb_on(settings) or not dist.is_main():
        yield None
        return
    sink = WandbSink(settings, **run)
    logger.sinks.append(sink)
    try:
        yield sink
    except BaseException:
        sink.close(exit_code=1)
        raise
    else:
        sink.close()
    finally:
        logger.sinks.remove(sink)


class Logger:
    """Writes messages to stderr; `progress()` makes a StepLogger for one stage's steps."""

    def __init__(self, every: int = 10, tensorboard: bool = False, stream=None):
        self.every = every
        self.tensorboard = tensorboard
        self.stream = stream or sys.stderr
        self.sinks: list = []  # the running stage's (its W&B run), beside each progress's own

    def info(self, msg: str) -> None:
        from posttrain.train import dist

        if dist.is_main():  # under torchrun, rank 0 speaks for all
            print(f"[posttrain] {msg}", file=self.stream, flush=True)

    def warning(self, msg: str) -> None:
        """Something the user should act on, or at least know (a reused stage whose code changed,
        a setting that costs time): the same stream, marked."""
        self.info(f"WARNING: {msg}")

    def progress(self, stage: str, total: int, stage_dir: Path, start: int = 0) -> StepLogger:
        return StepLogger(self, stage, total, Path(stage_dir), start)


class StepLogger:
    """Logs one step's metrics (namespaced keys, e.g. `train/loss`) to every sink."""

    def __init__(self, parent: Logger, stage: str, total: int, stage_dir: Path, start: int):
        self.parent, self.stage, self.total, self.start = parent, stage, total, start
        self.metrics_path = stage_dir / "metrics.jsonl"
        self.t0 = time.perf_counter()
        self.sinks = [TensorBoardSink(stage_dir / "tb")] if parent.tensorboard else []
        self.bar = None
        if is_interactive():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task(stage, total=total, completed=start, info="")

    def begin(self, start: int) -> None:
        """Called once training knows its first step: drop metrics logged after it (a resume)."""
        self.start, self.t0 = start, time.perf_counter()
        if self.metrics_path.exists():
            kept = [r for r in read_jsonl(self.metrics_path) if r.get("step", 0) <= start]
            atomic_write_jsonl(self.metrics_path, kept)
        if self.bar is not None:
            self.bar.update(self.task, completed=start)

    def eta(self, step: int) -> float:
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        return elapsed / done * (self.total - step) if done > 0 else float("inf")

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: v for k, v in metrics.items()}}
        append_jsonl(self.metrics_path, record)
        for sink in [*self.sinks, *self.parent.sinks]:
            sink.log(step, metrics)
        shown = " | ".join(f"{label} {value}" for label, value in shown_fields(metrics))
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=shown)
        elif step % self.parent.every == 0 or step == self.total or step == self.start + 1:
            line = (
                f"{self.stage} step {step}/{self.total} | {shown} | eta {_fmt_eta(self.eta(step))}"
            )
            print(line, file=self.parent.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        for sink in self.sinks:
            sink.close()
