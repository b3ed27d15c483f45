"""Scripts that test_distributed.py launches under torchrun (not a test module): a rank's last
moments, made deterministic.

teardown: join the group as a run does, import what the stages import once the group exists
(transformers, which imports torch.distributed.nn through torch.distributed.fsdp: its functions
keep the group as a default argument), and leave one gloo worker thread busy with a finished
collective for a second after the rank has moved on (in a real run that window is microseconds,
wide enough only on a loaded machine). Then `dist.close()` and exit. A group that outlives
`close` keeps its worker threads into the interpreter's shutdown, where the busy one, taking
the GIL back, aborts the rank (SIGABRT: "terminate called without an active exception", or
"Fatal Python error"). Prints which gloo threads are alive before and after `close`.

held-group CONFIG: `posttrain run CONFIG` whose group is held by something `close` cannot drop
(as DTensor's planners hold it under train.fsdp), with a gloo worker busy as above: the finished
ranks must still exit 0 (the CLI ends them before the interpreter's shutdown).

report-fails CONFIG: `posttrain run CONFIG` in which rank 0's report raises, while rank 1 waits
for it at the pipeline's last barrier: the run must stop with the error, not wait forever.
"""

import os
import sys
import time

import torch

from posttrain.train import dist


def gloo_threads() -> list[str]:
    tasks = os.listdir("/proc/self/task")
    names = (open(f"/proc/self/task/{t}/comm").read().strip() for t in tasks)
    return sorted(n for n in names if "gloo" in n)


def busy_worker(fut):
    time.sleep(1.0)  # runs on the gloo worker that completed the collective
    return fut.value()


def last_collective() -> None:
    t = torch.ones(4)
    torch.distributed.all_reduce(t, async_op=True).get_future().then(busy_worker)
    # returns: the worker holds the last references to the collective and its tensor


def busy_at_destroy() -> None:
    """Make the collective above the last one before the group is destroyed (after any barrier
    in `dist.close`, which would wait for the busy worker)."""
    destroy = torch.distributed.destroy_process_group

    def busy_destroy(*args, **kwargs):
        last_collective()
        time.sleep(0.2)  # the collective completes; the worker sits in busy_worker
        return destroy(*args, **kwargs)

    torch.distributed.destroy_process_group = busy_destroy


def teardown() -> int:
    dist.init(torch.device("cpu"))
    from transformers import LlamaForCausalLM  # noqa: F401  (after the group exists, as in a stage)

    assert dist.all_sum([1.0]) == [float(dist.world())]
    busy_at_destroy()
    before = gloo_threads()
    dist.close()
    print(f"rank {os.environ['RANK']}: gloo threads before close {before}, after {gloo_threads()}")
    return 0


def held_group(config: str) -> int:
    from posttrain.cli import main

    close, held = dist.close, []

    def held_close(ok: bool = True) -> bool:
        held.append(torch.distributed.group.WORLD)
        return close(ok)

    dist.close = held_close
    busy_at_destroy()
    return main(["run", config])


def report_fails(config: str) -> int:
    import posttrain.report
    from posttrain.cli import main

    def broken(*args, **kwargs):
        raise RuntimeError("rank 0: the report failed (on purpose)")

    if dist.is_main():
        posttrain.report.write_report = broken
    return main(["run", config])


if __name__ == "__main__":
    case, *args = sys.argv[1:]
    cases = {"teardown": teardown, "held-group": held_group, "report-fails": report_fails}
    sys.exit(cases[case](*args))
