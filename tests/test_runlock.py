"""One run at a time in a run directory (posttrain.runlock): a second run on a folder that a live
run holds stops with an error naming the folder and the holder; a lock left by a killed run is
taken over; a run holds the lock while it works and releases it at the end."""

import io
import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
import yaml

from posttrain import runlock
from posttrain.runlock import RunDirLocked, hold

# A process that holds a folder's lock until its stdin closes.
HOLD = """import sys
from posttrain.runlock import hold
with hold(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


@contextmanager
def holder(folder):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert p.stdout.readline().strip() == "held"
        yield p
    finally:
        if p.poll() is None:
            p.stdin.close()
        p.wait(timeout=60)


def world_config(tmp_path, run) -> str:
    """The cheapest pipeline: the toy world stage alone, run in `run`."""
    from conftest import TINY_BASE

    raw = yaml.safe_load(TINY_BASE) | {"stages": ["world"], "out": str(run)}
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_a_second_run_on_a_held_folder_fails_naming_the_folder_and_the_holder(
    tmp_path, capsys, monkeypatch
):
    from posttrain.cli import main

    monkeypatch.setenv("CI", "true")
    run = tmp_path / "run"
    cfg = world_config(tmp_path, run)
    with holder(run) as p:
        assert main(["run", cfg]) == 2
        err = capsys.readouterr().err
        assert f"posttrain: error: run directory {run} is in use by another run" in err
        assert f"pid {p.pid} on {socket.gethostname()}" in err
        assert "-c " + str(run) in err  # the holder's command line
        assert not (run / "pipeline.yaml").exists()  # the second run touched nothing
        # the single-stage commands go through the same pipeline
        (tmp_path / "s.yaml").write_text(yaml.safe_dump({"model": "x", "prompts": "y"}))
        argv = ["sample", "--config", str(tmp_path / "s.yaml"), "--out", str(run)]
        assert main(argv) == 2
        assert f"pid {p.pid}" in capsys.readouterr().err


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    with holder(tmp_path) as p:
        p.kill()  # SIGKILL: no clean-up; its record stays in the lock file
        p.wait()
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == p.pid
        said = []
        with hold(tmp_path, said.append) as me:
            assert me["pid"] == os.getpid()
            assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        assert len(said) == 1 and "taking over" in said[0] and f"pid {p.pid} " in said[0]


def test_a_run_holds_the_lock_while_it_works_and_releases_it(tmp_path, monkeypatch):
    import posttrain.report
    from posttrain.config import load_pipeline
    from posttrain.log import Logger
    from posttrain.pipeline import run_pipeline

    monkeypatch.setenv("CI", "true")
    run = tmp_path / "run"
    seen = {}
    write_report = posttrain.report.write_report

    def spy(pipeline, run_dir, *args, **kwargs):  # the lock while the run writes its report
        seen["holder"] = json.loads((run_dir / ".lock").read_text())
        with pytest.raises(RunDirLocked, match=f"pid {os.getpid()} "):
            with hold(run_dir):
                pass
        return write_report(pipeline, run_dir, *args, **kwargs)

    monkeypatch.setattr(posttrain.report, "write_report", spy)
    pipe = load_pipeline(world_config(tmp_path, run), [])
    run_pipeline(pipe, logger=Logger(stream=io.StringIO()))
    assert seen["holder"]["pid"] == os.getpid()
    assert (run / ".lock").read_text() == ""  # released cleanly
    said = []
    with hold(run, said.append):
        pass
    assert said == []  # free, not taken over


def test_without_flock_the_holder_record_decides(tmp_path, monkeypatch):
    """Filesystems without flock: a record of a live process on this host (or of another host,
    which cannot be checked) holds the folder; one of a dead process here is taken over."""
    monkeypatch.setattr(runlock, "fcntl", None)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    lock = tmp_path / ".lock"
    for record, busy in [({"pid": os.getppid(), "host": socket.gethostname()}, True),
                         ({"pid": 1, "host": "elsewhere"}, True),
                         ({"pid": int(dead), "host": socket.gethostname()}, False)]:  # fmt: skip
        lock.write_text(json.dumps(record))
        said = []
        if busy:
            with pytest.raises(RunDirLocked, match=f"pid {record['pid']} on {record['host']}"):
                with hold(tmp_path, said.append):
                    pass
        else:
            with hold(tmp_path, said.append):
                pass
            assert "taking over" in said[0]


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)
def test_a_torchrun_run_on_a_held_folder_stops_every_rank(tmp_path):
    """Rank 0 alone takes the lock; the other ranks learn that it could not, so the whole job
    stops at once with the error (instead of rank 1 waiting for rank 0 at a barrier)."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "posttrain.cli", "run", world_config(tmp_path, run)]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "CI": "true"}
    with holder(run) as p:
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.count(f"is in use by another run (pid {p.pid} ") == 2  # both ranks say why
    assert not (run / "pipeline.yaml").exists()
