"""Mixed precision outside the shared loop: the same bf16 autocast for the passes a stage runs
on its own (reference log-probs, the RL stages' rollout, log-prob, value and update passes)."""

from __future__ import annotations

import contextlib

import torch


def autocast(precision: str, device: torch.device | str):
    """bf16 autocast over fp32 weights (matmuls in bf16, reductions such as log-softmax in fp32
    by autocast's own rules), or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def checkpointed(model, on: bool = True):
    """Activation checkpointing for the passes inside the block, on a model kept in eval mode
    (the RL stages: no dropout, so a recomputed log-prob equals the rollout's). Hugging Face
    checkpoints a block only while that block's `training` flag is set: the flag is raised on
    the blocks alone, never on their dropout modules, and restored afterwards."""
    if not on:
        yield model
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    from posttrain.models.lora import unwrap
    from posttrain.train.loop import _set_checkpointing

    inner = unwrap(model)
    _set_checkpointing(inner, True)
    blocks = [m for m in inner.modules() if isinstance(m, GradientCheckpointingLayer)]
    flags = [b.training for b in blocks]
    for b in blocks:
        b.training = True
    try:
        yield model
    finally:
        for b, f in zip(blocks, flags, strict=True):
            b.training = f
        _set_checkpointing(inner, False)
