"""`posttrain lab run --jobs N`: seeds in processes of their own, then one pooled pass that
finds every stage cached and computes the same figures one process computes."""

import json
import os
import subprocess
import sys

from posttrain.lab.jobs import child_command

NAME = "style_vs_capability"  # the quickest experiment at --quick sizes


def lab(*args, cwd):
    env = os.environ | {"CI": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "posttrain", "lab", "run", NAME, "--quick", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def figures(path):
    """result.json without its wall times (the only figures that differ between two passes)."""
    result = json.loads(path.read_text())
    result.pop("seconds", None)
    return result


def test_seeds_in_parallel_processes_then_the_same_pooled_result(tmp_path):
    out = tmp_path / "lab"
    r = lab("--seeds", "3,4", "--jobs", "2", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for seed in (3, 4):  # each seed's process: its log, its one-seed report, its stages
        assert "pipeline done" in (out / "jobs" / f"seed-{seed}.log").read_text()
        one = json.loads((out / "jobs" / f"seed-{seed}" / NAME / "result.json").read_text())
        assert one["seeds"] == [seed]
        assert (out / "seeds-quick" / str(seed) / "sft" / "result.json").is_file()
    assert "seed 3 started" in r.stderr and "seed 4 done in" in r.stderr
    assert "pooling seeds [3, 4] from the cache" in r.stderr
    pooled = figures(out / NAME / "result.json")
    assert pooled["seeds"] == [3, 4]

    # One process over the same runs (--runs): nothing left to train, the same figures.
    again = tmp_path / "again"
    r = lab("--seeds", "3,4", "--out", str(again), "--runs", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "running" not in r.stderr.replace("pipeline", "")
    assert figures(again / NAME / "result.json") == pooled
    assert not (again / "seeds-quick").exists()


def test_a_failing_seed_is_named_and_nothing_is_pooled(tmp_path):
    runs = tmp_path / "not_a_folder"
    runs.write_text("")  # the seeds' run folders cannot be made under a file
    out = tmp_path / "lab"
    r = lab("--seeds", "3,4", "--jobs", "2", "--out", str(out), "--runs", str(runs), cwd=tmp_path)
    assert r.returncode == 1
    assert "seed 3 FAILED" in r.stderr and "seed 4 FAILED" in r.stderr
    assert "the pooled pass did not run" in r.stderr
    assert not (out / NAME).exists()


def test_the_child_command_runs_one_seed_into_its_own_report_folder(tmp_path):
    cmd = child_command("all", 7, tmp_path / "o", tmp_path / "r", quick=True)
    assert cmd[1:] == ["-m", "posttrain", "lab", "run", "all", "--seeds", "7", "--out",
                       str(tmp_path / "o" / "jobs" / "seed-7"), "--runs", str(tmp_path / "r"),
                       "--quick"]  # fmt: skip
