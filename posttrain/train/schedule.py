"""Learning-rate schedules as pure functions of the step: warmup + cosine, warmup-stable-decay."""

from __future__ import annotations

import math


def lr_multiplier(
    step: int,
    total: int,
    *,
    schedule: str,
    warmup_steps: int,
    min_lr_ratio: float,
    decay_fraction: float = 0.2,
) -> float:
    """Multiplier on the peak lr for optimiser step `step` (0-based) of `total`.

    cosine: linear warmup to 1, then cosine from 1 down to min_lr_ratio at the last step.
    wsd: linear warmup, flat at 1, then linear decay to min_lr_ratio over the last
         `decay_fraction` of the steps (Hu et al. 2024, MiniCPM); the mid-training lever.
    linear: linear warmup, then linear decay towards min_lr_ratio, reaching
            1 - (1 - min_lr_ratio) * (total - 1 - w) / (total - w) at the last step (as in HF's
            get_linear_schedule_with_warmup when min_lr_ratio is 0: lr * (S - s) / S).
    constant: linear warmup, then 1.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1 - (1 - min_lr_ratio) * (step - warmup_steps) / max(1, total - warmup_steps)
    if schedule == "cosine":
        span = max(1, total - 1 - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * total))
        decay_start = max(warmup_steps, total - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
        return 1 - (1 - min_lr_ratio) * progress
    raise ValueError(f"unknown schedule {schedule!r}; known: cosine, wsd, linear, constant")
