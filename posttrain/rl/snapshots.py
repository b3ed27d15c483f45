"""Snapshots of the policy during an RL run: loadable Hugging Face directories at chosen steps.

Gao et al. (2210.10760) plot gold and proxy reward against d = sqrt(KL) along one RL run; that
needs the policy as it was at many steps, not only the final model. With `snapshot_every: N`
an RL stage saves its policy every N steps and at the last one:

    <stage>/snapshots/step_0000050/     save_pretrained output (model and tokenizer)
    <stage>/snapshots.jsonl             one line per snapshot: {"step", "path", "kl/ref", ...}

`path` is relative to the stage folder. The other fields are the metrics of that step's rollout,
which was sampled before the step's update: "kl/ref" is the KL of the policy of step - 1 (the
snapshot's own KL is what an evaluation of it measures). A snapshot directory is written before
its line, so a listed snapshot is always whole.

On resume from step s, snapshots up to s are kept as they are; those after s (written by the
killed run after its last checkpoint) are removed with their lines, and the resumed run writes
them again when it passes their steps.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

LISTING = "snapshots.jsonl"
FOLDER = "snapshots"
# the metrics of a step that a snapshot's line keeps (those the step logged)
KEPT = ("kl/ref", "kl/coef", "reward/mean", "gold/mean", "rollout/mean_length")
_NAME = re.compile(r"step_(\d+)$")


def snapshot_steps(steps: int, every: int) -> list[int]:
    """The steps a run of `steps` steps snapshots: every `every`-th, and the last."""
    if every <= 0:
        return []
    return sorted({*range(every, steps + 1, every), steps})


def snapshot_path(stage_dir: Path, step: int) -> Path:
    return Path(stage_dir) / FOLDER / f"step_{step:07d}"


def read_snapshots(stage_dir: Path) -> list[dict]:
    """The listing's lines, by step (empty if the stage wrote none)."""
    from posttrain.io import read_jsonl

    path = Path(stage_dir) / LISTING
    return sorted(read_jsonl(path), key=lambda r: r["step"]) if path.is_file() else []


def prepare(stage_dir: Path, start: int) -> None:
    """Before a run's first step (`start`: 0, or the step it resumes from): keep the snapshots
    up to `start`, remove any later one and its line."""
    from posttrain.io import atomic_write_jsonl, clean_stale_temps

    stage_dir = Path(stage_dir)
    folder = stage_dir / FOLDER
    clean_stale_temps(folder)  # what a killed save left
    if folder.is_dir():
        for p in folder.iterdir():
            if (m := _NAME.match(p.name)) and int(m.group(1)) > start:
                shutil.rmtree(p)
    kept = [r for r in read_snapshots(stage_dir) if r["step"] <= start]
    if (stage_dir / LISTING).is_file():
        atomic_write_jsonl(stage_dir / LISTING, kept)


def save(stage_dir: Path, step: int, model, tokenizer, metrics: dict) -> dict:
    """Save the policy of `step` and add its line to the listing; returns the line."""
    from posttrain.io import append_jsonl
    from posttrain.models.load import save_model

    path = snapshot_path(stage_dir, step)
    save_model(model, tokenizer, path)
    line = {"step": step, "path": str(path.relative_to(stage_dir))}
    line |= {k: metrics[k] for k in KEPT if k in metrics}
    append_jsonl(Path(stage_dir) / LISTING, line)
    return line
