"""Data parallelism across processes started by `torchrun`.

Every rank holds the whole model and takes its own share of each optimiser step's micro-batches:
with W ranks and `grad_accum` G, step s is micro-batches s*G*W ... s*G*W + G*W - 1 of the data,
rank r taking those whose index is r modulo W. Each rank backpropagates its losses divided by
the step's total weight summed over *all* ranks (tokens, pairs, sequences), and the gradients are
summed across ranks before clipping and the update. So W ranks x G micro-batches compute exactly
the gradient one process computes with G*W micro-batches: the invariant that averaging per-rank
means (each normalised by its own token count) breaks when ranks hold different token counts.

The collectives are plain all-reduces after the backward pass (not overlapped with it, unlike
DistributedDataParallel): any forward the stages use (the decoder alone, the LM head only at
targets) stays correct. Outside torchrun (no WORLD_SIZE, or 1) everything here is a no-op.
Only rank 0 writes (run directory, checkpoints, models, logs); stages that have no data-parallel
path run on rank 0 while the others wait. `train.fsdp` shards the model instead of copying it
(posttrain.train.fsdp); the micro-batch split and the normalisation stay the same.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch

# Stages of these kinds share their work over the ranks (training data-parallel, sampling or
# greedy decoding a share of the prompts); the others run on rank 0 only.
DATA_PARALLEL_KINDS = {"pretrain", "sft", "reward", "dpo", "kto", "sample", "evaluate", "ppo", "grpo",
                       "rloo", "online_dpo"}  # fmt: skip


_alone = False  # inside `alone()`: this rank works by itself (a rank-0-only stage)


def active() -> bool:
    """Whether this process is one of several in an initialised process group (and not inside
    `alone()`)."""
    return (
        not _alone
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


@contextlib.contextmanager
def alone():
    """Run a rank-0-only stage: everything here behaves as in a single process (no collective
    a waiting rank could never join)."""
    global _alone
    before, _alone = _alone, True
    try:
        yield
    finally:
        _alone = before


def world() -> int:
    """Data-parallel ranks (1 until `init` has joined a group)."""
    return torch.distributed.get_world_size() if active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def is_main() -> bool:
    """Whether this process writes: rank 0, or the only process (read from torchrun's
    environment, so it holds before `init` too)."""
    return int(os.environ.get("RANK", "0")) == 0


def launched() -> bool:
    """Whether torchrun started several processes (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on the CPU); `device` is
    this rank's (`resolve_device` gives cuda:LOCAL_RANK). A no-op in a single process."""
    if not launched():
        return device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        # Long rank-0-only stages (generation, evaluation) keep the others waiting at a barrier.
        torch.distributed.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=4)
        )
    return device


def close() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks, in float64 (on the GPU under NCCL, which has no CPU path)."""
    if not active():
        return list(values)
    dev = _collective_device()
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(t)
    return t.tolist()


def gather(obj) -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] in a single process."""
    if not active():
        return [obj]
    out = [None] * world()
    torch.distributed.all_gather_object(out, obj)
    return out


def sync_grads(model: torch.nn.Module) -> None:
    """Sum every trainable parameter's gradient over ranks, in one flat buffer per dtype (a
    parameter without a gradient on this rank contributes zeros, so the collectives line up)."""
    if not active():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        torch.distributed.all_reduce(flat)
        at = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[at : at + n].view_as(p.grad))
            at += n


def check_in_sync(model: torch.nn.Module) -> None:
    """Raise if the ranks' copies of `model` differ (they take identical updates, so any
    difference is a bug: a rank that skipped a step, or gradients summed wrongly)."""
    if not active():
        return
    with torch.no_grad():
        sums = [float(p.double().sum()) for p in model.parameters()]
    mine = torch.tensor(sums, dtype=torch.float64, device=_collective_device())
    low, high = mine.clone(), mine.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(
            f"rank {rank()}: the ranks' model copies differ after training "
            f"(largest parameter-sum gap {float((high - low).max()):.3g})"
        )


def broadcast_params(model: torch.nn.Module) -> None:
    """Make every rank start from rank 0's weights (randomly initialised adapters, heads)."""
    if not active():
        return
    for t in list(model.parameters()) + list(model.buffers()):
        torch.distributed.broadcast(t.data, src=0)


def shard(indices: list[int]) -> list[int]:
    """This rank's share of an ordered list (every W-th, starting at its rank)."""
    return indices[rank() :: world()]


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
