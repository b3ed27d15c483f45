"""`posttrain lab run ... --jobs N`: the seeds' runs in N processes at once, then the pooled pass.

Each seed's experiments run in a process of its own (`posttrain lab run NAME --seeds S --runs
OUT --out OUT/jobs/seed-S`): its stages land in the shared per-seed run folder
(`OUT/seeds/S/`, locked per seed, so no two processes write one seed), its one-seed reports in
a folder of its own. When every seed has finished, the parent runs the experiments once more
on all the seeds in-process: every stage is then cached, so that pass only pools the figures
and writes `OUT/<name>/`. A process runs one torch thread (unless OMP_NUM_THREADS says
otherwise): N processes on N cores instead of one process spinning threads over all of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from posttrain.log import Logger

POLL_S = 2.0
PROGRESS_EVERY_S = 60.0


def child_command(name: str, seed: int, out: Path, runs: Path, quick: bool) -> list[str]:
    cmd = [sys.executable, "-m", "posttrain", "lab", "run", name, "--seeds", str(seed),
           "--out", str(out / "jobs" / f"seed-{seed}"), "--runs", str(runs)]  # fmt: skip
    return cmd + (["--quick"] if quick else [])


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 400))
            lines = f.read().decode("utf-8", "replace").replace("\r", "\n").splitlines()
    except OSError:
        return ""
    lines = [x.strip() for x in lines if x.strip()]
    return lines[-1] if lines else ""


def run_seeds(name: str, seeds: list[int], out: Path, runs: Path, quick: bool, jobs: int,
              logger: Logger) -> list[int]:  # fmt: skip
    """Run `name` (an experiment or "all") for each seed in its own process, at most `jobs` at
    once; returns the seeds whose process failed (their logs are named in the log)."""
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    waiting, running, failed = list(seeds), {}, []
    last_progress = time.monotonic()
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                seed = waiting.pop(0)
                log = out / "jobs" / f"seed-{seed}.log"
                with open(log, "w") as f:
                    proc = subprocess.Popen(child_command(name, seed, out, runs, quick),
                                            stdout=f, stderr=subprocess.STDOUT, env=env)  # fmt: skip
                running[seed] = (proc, log, time.monotonic())
                logger.info(f"lab {name}: seed {seed} started (process {proc.pid}; log {log})")
            time.sleep(POLL_S)
            for seed, (proc, log, t0) in list(running.items()):
                if (rc := proc.poll()) is None:
                    continue
                del running[seed]
                took = time.monotonic() - t0
                if rc == 0:
                    logger.info(f"lab {name}: seed {seed} done in {took:.0f}s")
                else:
                    failed.append(seed)
                    logger.info(f"lab {name}: seed {seed} FAILED (exit {rc}) after {took:.0f}s; "
                                f"see {log}: {_last_line(log)}")  # fmt: skip
            if running and time.monotonic() - last_progress >= PROGRESS_EVERY_S:
                last_progress = time.monotonic()
                for seed, (_, log, t0) in running.items():
                    took = time.monotonic() - t0
                    logger.info(f"lab {name}: seed {seed} ({took:.0f}s) {_last_line(log)}")
    finally:  # left running only by Ctrl-C or an error here: no seed outlives the parent
        for proc, _, _ in running.values():
            proc.terminate()
        for proc, _, _ in running.values():
            proc.wait()
    return failed
