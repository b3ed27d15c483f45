"""Sharded data parallelism (FSDP2) for the shared loop: `train.fsdp: true` under torchrun.

Each rank keeps only its shard of the weights, gradients and AdamW state on its device
(`fully_shard` on every transformer block and on the model). The model the stage holds stays a
plain Hugging Face module: it waits on the CPU while a sharded copy trains, and receives the
trained full weights at the end (so saving it, or evaluating it on rank 0 alone, needs no
collective). Memory per GPU: the model's weights, gradients and optimiser state divided by the
ranks, plus activations and one block gathered at a time; the CPU holds one full copy.

The stages call the model in several ways (the decoder alone with the LM head only at targets,
a reward head on the last token, the full model). FSDP gathers the model's top-level weights
(embeddings, final norm, head) only inside a forward of the sharded root, so every objective
loss and held-out evaluation runs inside one registered root method, `_posttrain_call(fn, ...)`,
= fn(model, ...): the blocks gather themselves as they are called.

FSDP reduce-scatters the gradients as means over ranks; the loop divides each loss by the step's
total weight over all ranks and multiplies it by the number of ranks, so the mean is the sum the
unsharded data-parallel path computes. (A divide factor of 1 would need PREMUL_SUM, which gloo
lacks.)
"""

from __future__ import annotations

import copy

import torch


def _call(self, fn, *args, **kwargs):
    return fn(self, *args, **kwargs)


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A sharded copy of `model` on `device`; `model` itself is moved to the CPU."""
    import types

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from posttrain.train import dist
    from posttrain.train.loop import transformer_blocks

    if any(not p.requires_grad for p in model.parameters()):
        raise ValueError(
            "train.fsdp: the model has frozen parameters (LoRA?); sharding those is not "
            "supported yet: set train.fsdp: false (data parallelism still applies)"
        )
    if transformer_blocks(model) is None:
        raise ValueError(
            f"train.fsdp: found no list of transformer blocks in {type(model).__name__}; "
            "set train.fsdp: false"
        )
    model.to("cpu")
    work = copy.deepcopy(model)
    mesh = init_device_mesh(device.type, (dist.world(),))
    for block in transformer_blocks(work):
        fully_shard(block, mesh=mesh)  # moves the block to the mesh's device, then shards it
    fully_shard(work, mesh=mesh)
    work._posttrain_call = types.MethodType(_call, work)
    register_fsdp_forward_method(work, "_posttrain_call")
    return work


def full_states(work, optimizer) -> tuple[dict, dict | None]:
    """The full (gathered) model and optimiser state dicts, in CPU memory on rank 0 (the one
    that writes); empty on the others. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(work, options=opts)
    optim_sd = get_optimizer_state_dict(work, optimizer, options=opts) if optimizer else None
    return model_sd, optim_sd


def load_full_states(work, optimizer, model_sd: dict, optim_sd: dict | None) -> None:
    """Load full state dicts (every rank holds them, read from the checkpoint) into the shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(work, model_sd, options=opts)
    if optimizer is not None and optim_sd is not None:
        set_optimizer_state_dict(work, optimizer, optim_sd, options=opts)


def unshard_into(model: torch.nn.Module, work, device: torch.device) -> None:
    """Rank 0: copy the trained full weights into the plain `model`. Every rank: put `model`
    back on `device`. (The other ranks' copy keeps its starting weights: only rank 0 saves or
    evaluates after training.)"""
    from posttrain.train import dist

    model_sd, _ = full_states(work, None)
    if dist.is_main():
        model.load_state_dict(model_sd)
    model.to(device)
