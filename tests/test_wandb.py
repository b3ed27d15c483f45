"""`log.wandb`: one W&B run per stage, in offline mode (no network), read back from its files.

An offline run is one `run-<id>.wandb` file of protobuf records (wandb.proto's Record) framed as
a LevelDB log: wandb 0.31 has no Python reader for it (its own is in Go), so `_records` is one.
"""

import importlib.util
import json
import struct
from pathlib import Path

import pytest

from posttrain.io import read_jsonl

pytest.importorskip("wandb")

TWO_STAGES = ["world", "pretrain"]
OFFLINE = "log: {wandb: {project: t, mode: offline, tags: [tiny]}}"


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    """Nothing leaves the machine or lands outside tmp_path (W&B's settings, cache, logs)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))


def _records(path: Path) -> list:
    """The records of a .wandb file: a 7-byte file header (":W&B", magic, version), then 32 KiB
    blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle,
    4 last); a block's tail shorter than a header is padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _items(items) -> dict:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def _read_run(folder: Path) -> dict:
    """One offline run: its run record, config, history by step, final summary and exit code."""
    (file,) = folder.glob("run-*.wandb")
    run = {"config": {}, "history": {}, "summary": {}, "exit_code": None}
    for rec in _records(file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run["run"] = rec.run
            run["config"] |= _items(rec.run.config.update)
        elif kind == "config":
            run["config"] |= _items(rec.config.update)
        elif kind == "history":
            row = _items(rec.history.item)
            run["history"][rec.history.step.num] = {
                k: v for k, v in row.items() if not k.startswith("_")
            }
        elif kind == "summary":
            run["summary"] |= _items(rec.summary.update)
        elif kind == "exit":
            run["exit_code"] = rec.exit.exit_code
    return run


def _runs(run_dir: Path) -> dict[str, dict]:
    """The offline runs under the run directory, by display name."""
    runs = [_read_run(f) for f in sorted((run_dir / "wandb").glob("offline-run-*"))]
    return {r["run"].display_name: r for r in runs}


def test_each_stage_logs_its_metrics_config_and_result_to_one_offline_run(run_tiny):
    _, run_dir = run_tiny(TWO_STAGES, OFFLINE, template=False)
    runs = _runs(run_dir)
    assert sorted(runs) == ["tiny/pretrain", "tiny/world"]
    for stage in TWO_STAGES:
        run = runs[f"tiny/{stage}"]
        assert (run["run"].project, run["run"].run_group, run["run"].job_type) == ("t", "tiny",
                                                                                     stage)  # fmt: skip
        assert list(run["run"].tags) == ["tiny"] and run["exit_code"] == 0
        result = json.loads((run_dir / stage / "result.json").read_text())
        final = {k: v for k, v in result["metrics"].items() if isinstance(v, int | float)}
        assert final and run["summary"].items() >= (final | {"seconds": result["seconds"]}).items()
        assert run["config"]["pipeline"]["name"] == "tiny"
        assert run["config"]["pipeline"]["stages"] == TWO_STAGES

    pretrain = runs["tiny/pretrain"]
    assert pretrain["config"]["seq_len"] == 32 and pretrain["config"]["train"]["steps"] == 3
    assert runs["tiny/world"]["config"]["n_train"] == 12
    logged = read_jsonl(run_dir / "pretrain" / "metrics.jsonl")
    expected = {
        r["step"]: {k: v for k, v in r.items() if k != "step" and isinstance(v, int | float)}
        for r in logged
    }
    assert sorted(expected) == [1, 2, 3] and "train/loss" in expected[3]
    assert pretrain["history"] == expected
    assert runs["tiny/world"]["history"] == {}  # the world logs no steps

    # A cached rerun logs nothing; a forced rerun under `mode: disabled` neither.
    run_tiny(TWO_STAGES, OFFLINE)
    run_tiny(TWO_STAGES, "log: {wandb: {project: t, mode: disabled}}", force=["pretrain"])
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2


def test_a_failing_stage_finishes_its_run_with_exit_code_1(run_tiny, tmp_path, monkeypatch):
    from posttrain.stages.base import StageContext

    def boom(ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(StageContext, "world", boom)  # the world stage's first step
    with pytest.raises(RuntimeError, match="boom"):
        run_tiny(["world"], OFFLINE, template=False)
    (run,) = _runs(tmp_path / "run").values()
    assert run["exit_code"] == 1


def test_unknown_or_missing_keys_under_log_wandb_are_named(tmp_path):
    from posttrain.config import load_pipeline
    from posttrain.settings import ConfigError

    cfg = tmp_path / "p.yaml"
    cfg.write_text("stages: [world]\nlog: {wandb: {project: t, projct: u}}\n")
    with pytest.raises(ConfigError, match="unknown config key 'log.wandb.projct'"):
        load_pipeline(cfg)
    cfg.write_text("stages: [world]\nlog: {wandb: {project: ''}}\n")
    with pytest.raises(ConfigError, match="'log.wandb.project'"):
        load_pipeline(cfg)
    # Off, it is left out of the resolved config (pipeline.yaml reads as before it existed).
    cfg.write_text("stages: [world]\n")
    assert load_pipeline(cfg).resolved()["log"] == {"every": 10, "tensorboard": False}


def test_without_wandb_installed_the_error_says_how_before_any_stage_runs(tmp_path, monkeypatch):
    from posttrain.config import load_pipeline
    from posttrain.pipeline import run_pipeline
    from posttrain.settings import ConfigError

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else find_spec(name, *a))  # fmt: skip
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"stages: [world]\nout: {tmp_path / 'run'}\nlog: {{wandb: {{project: t}}}}\n")
    with pytest.raises(ConfigError, match=r"log\.wandb.*pip install 'posttrain\[wandb\]'"):
        run_pipeline(load_pipeline(cfg))
    assert not (tmp_path / "run").exists()
