"""Training checkpoints for resume: model, optimiser, step and RNG state, written atomically.

What a killed or disk-full write left behind (`.step_*.pt.*.tmp`) is removed when the folder is
next written or resumed from.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from posttrain.io import atomic_path, clean_stale_temps

_NAME = re.compile(r"step_(\d+)\.pt$")


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:07d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.search(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def save_checkpoint(
    ckpt_dir: Path, step: int, model, optimizer, extra: dict, keep: int, states=None
) -> Path:
    """`states`: (model, optimiser) state dicts to save instead of the objects' own (FSDP's
    gathered full dicts)."""
    model_sd, optim_sd = states or (model.state_dict(), optimizer.state_dict())
    state = {
        "step": step,
        "model": model_sd,
        "optimizer": optim_sd,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python_rng": random.getstate(),
        "extra": extra,
    }
    path = checkpoint_path(ckpt_dir, step)
    clean_stale_temps(ckpt_dir)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path, model, optimizer, load=None) -> tuple[int, dict]:
    """`load(model_sd, optim_sd)` applies the saved dicts instead of load_state_dict (FSDP)."""
    clean_stale_temps(Path(path).parent)  # a resume: no write into the folder is under way
    state = torch.load(path, map_location="cpu", weights_only=False)
    if load is not None:
        load(state["model"], state["optimizer"])
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])
    return state["step"], state.get("extra", {})
