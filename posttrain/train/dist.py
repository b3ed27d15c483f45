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
import sys
import types

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
        # torch.distributed.nn binds `group.WORLD` as a default argument of its functions when it
        # is imported; imported after the group exists (transformers does, through
        # torch.distributed.fsdp), it would keep the group alive past `close` (see there).
        # Imported now, those defaults are None.
        from torch.distributed import nn as _  # noqa: F401

        # Long rank-0-only stages (generation, evaluation) keep the others waiting at a barrier.
        torch.distributed.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=4)
        )
    return device


def close(ok: bool = True) -> bool:
    """Leave the process group, and free it before the interpreter shuts down.

    `ok` (this rank finished): first a barrier, so that no rank tears down its end of the group
    while another still works with it. After an error, none: the other ranks may never get
    there; this rank exits, and torchrun (or the broken connection) stops them.

    Destroying the group is not enough: it must be *freed*. Its gloo worker threads release
    each finished collective's tensors, which takes the GIL; anything that still references the
    group keeps it and its threads alive into the interpreter's shutdown, and a rank that exits
    right after its last collective (rank 1, while rank 0 writes the report) can then have a
    worker take the GIL during finalisation: CPython ends that thread inside a C++ destructor
    and the rank aborts ("terminate called without an active exception", SIGABRT) although its
    work is done. So what still holds the group (modules' default arguments, torch's caches) is
    dropped here, and the group's destructor joins its threads now.

    Returns whether the process may shut down normally. False: something else still holds the
    group (DTensor's planners under train.fsdp register callbacks that C++ keeps); the caller
    then ends the finished rank with `exit_now`, skipping the interpreter's shutdown.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return True
    if ok:
        barrier()
    group = torch.distributed.group.WORLD
    torch.distributed.destroy_process_group()
    _drop_references(group)
    # Our `group` and getrefcount's argument: anything more keeps the group (and threads) alive.
    return sys.getrefcount(group) <= 2


def exit_now(code: int) -> None:
    """End the process with `code` after flushing the output, without finalising the
    interpreter (where a live group's gloo worker could abort it: see `close`)."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _drop_references(group) -> None:
    """Drop what still holds `group` once destroyed: default arguments bound at import (a module
    imported after `init` that binds `group.WORLD` as a default, like torch.distributed.nn; None
    means "the default group" to torch.distributed, the same group), and torch.distributed's
    caches of objects built on the group (DTensor's, under train.fsdp, key device meshes)."""
    import functools
    import gc

    for obj in gc.get_objects():
        if type(obj) is types.FunctionType:
            if obj.__defaults__ and any(d is group for d in obj.__defaults__):
                obj.__defaults__ = tuple(None if d is group else d for d in obj.__defaults__)
            if obj.__kwdefaults__ and any(d is group for d in obj.__kwdefaults__.values()):
                kw = obj.__kwdefaults__
                obj.__kwdefaults__ = {k: None if d is group else d for k, d in kw.items()}
        elif type(obj) is functools._lru_cache_wrapper and str(
            getattr(obj, "__module__", "")
        ).startswith("torch.distributed"):
            obj.cache_clear()
    if "torch.distributed.tensor" in sys.modules:
        with contextlib.suppress(ImportError, AttributeError):  # private helpers: best effort
            from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache
            from torch.distributed.tensor.debug import _clear_sharding_prop_cache

            clear_redistribute_planner_cache()
            _clear_sharding_prop_cache()
    gc.collect()  # the meshes, specs and modules in cycles that held it


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
