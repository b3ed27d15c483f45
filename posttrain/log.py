"""One shared logger: human messages, a live progress line per step, metrics.jsonl, TensorBoard.

On a terminal the progress is a rich progress bar; elsewhere (CI, pipes) it is one dense plain
line every `every` steps, nanochat style:
    pretrain step 40/200 | loss 1.234 | lr 3.00e-04 | tok/s 12,345 | eta 2:10
Each field's label is unique in its line: the training loss is `loss`, the held-out one `val
loss`; an RL step shows `gen tok/s` (sampling) and `train tok/s` (the update).
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

from posttrain.io import append_jsonl, atomic_write_jsonl, read_jsonl

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


class Logger:
    """Writes messages to stderr; `progress()` makes a StepLogger for one stage's steps."""

    def __init__(self, every: int = 10, tensorboard: bool = False, stream=None):
        self.every = every
        self.tensorboard = tensorboard
        self.stream = stream or sys.stderr

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
        self.tb = None
        if parent.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(stage_dir / "tb"))
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
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float):
                    self.tb.add_scalar(k, v, step)
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
        if self.tb is not None:
            self.tb.close()
