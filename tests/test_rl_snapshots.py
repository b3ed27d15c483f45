"""RL snapshots (`snapshot_every`): the policy every N steps and at the last, loadable, listed
with its step's metrics; kept across a resume; written once under torchrun."""

import io
import json

import pytest
import torch
import yaml
from helpers import run_killed_at_step

from posttrain.rl.snapshots import snapshot_steps

# PPO on the world's verifier (no reward model to train): 5 steps, a snapshot every 2
PPO = """
ppo:
  reward: {kind: verifier}
  steps: 5
  snapshot_every: 2
  checkpoint_every: 3
  rollout: {prompts_per_step: 2, max_new_tokens: 6}
  minibatch_size: 2
  eval_prompts: 0
"""
STAGES = ["world", "pretrain", "sft", "ppo"]


def test_snapshot_steps():
    # every 2nd of 5 steps, and the last: 2, 4, 5; when N divides the steps the last is one of them
    assert snapshot_steps(5, 2) == [2, 4, 5]
    assert snapshot_steps(6, 3) == [3, 6]
    assert snapshot_steps(5, 0) == []


def test_snapshot_every_below_steps_else_an_error():
    from posttrain.stages.rl import GRPOConfig, PPOConfig

    assert PPOConfig(steps=5, snapshot_every=4).snapshot_every == 4
    for every in (5, 9):  # only the last step: that is model/ already
        with pytest.raises(ValueError, match=rf"snapshot_every \({every}\) >= steps \(5\)"):
            PPOConfig(steps=5, snapshot_every=every)
    with pytest.raises(ValueError, match="snapshot_every"):
        GRPOConfig(steps=3, snapshot_every=3)


def _metrics(run) -> dict[int, dict]:
    return {
        r["step"]: r for r in map(json.loads, (run / "ppo/metrics.jsonl").read_text().splitlines())
    }


def _listing(run) -> list[dict]:
    return [json.loads(x) for x in (run / "ppo/snapshots.jsonl").read_text().splitlines()]


def test_snapshots_are_loadable_and_listed_and_kept_across_a_resume(run_tiny, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    from safetensors.torch import load_file

    from posttrain.config import load_pipeline
    from posttrain.log import Logger
    from posttrain.models.load import load_model
    from posttrain.pipeline import run_pipeline

    _, run = run_tiny(STAGES, PPO)
    snaps = run / "ppo/snapshots"
    assert sorted(p.name for p in snaps.iterdir()) == ["step_0000002", "step_0000004",
                                                       "step_0000005"]  # fmt: skip
    listing = _listing(run)
    metrics = _metrics(run)
    assert [r["step"] for r in listing] == [2, 4, 5]
    for r in listing:
        assert r["path"] == f"snapshots/step_{r['step']:07d}"
        # the line carries that step's logged metrics
        for key in ("kl/ref", "kl/coef", "reward/mean", "gold/mean"):
            assert r[key] == metrics[r["step"]][key]
        load_model(run / "ppo" / r["path"], "cpu")  # a loadable HF directory
    # the last snapshot is the final model; an earlier one differs from it (the policy moved)
    final = load_file(str(run / "ppo/model/model.safetensors"))
    last = load_file(str(snaps / "step_0000005/model.safetensors"))
    first = load_file(str(snaps / "step_0000002/model.safetensors"))
    assert all((final[k] == last[k]).all() for k in final)
    assert any((final[k] != first[k]).any() for k in final)

    # killed during step 5 (checkpoint at step 3, snapshots 2 and 4 written), then resumed
    unbroken = listing
    run_killed_at_step(monkeypatch, 5, lambda: run_tiny(STAGES, PPO, force={"ppo"}))
    assert [r["step"] for r in _listing(run)] == [2, 4]
    before = {n: (snaps / n / "model.safetensors").stat().st_mtime_ns
              for n in ("step_0000002", "step_0000004")}  # fmt: skip
    stream = io.StringIO()
    run_pipeline(load_pipeline(tmp_path / "tiny.yaml", [f"out={run}"]), resume=True,
                 logger=Logger(stream=stream))  # fmt: skip
    assert "ppo: resumed from step_0000003.pt (step 3)" in stream.getvalue()
    # step 2 (before the checkpoint) kept as it was; step 4 (after it) written again by the
    # resumed run; each listed once, with the unbroken run's values
    assert (snaps / "step_0000002/model.safetensors").stat().st_mtime_ns == before["step_0000002"]
    assert (snaps / "step_0000004/model.safetensors").stat().st_mtime_ns != before["step_0000004"]
    assert _listing(run) == unbroken
    assert sorted(p.name for p in snaps.iterdir()) == ["step_0000002", "step_0000004",
                                                       "step_0000005"]  # fmt: skip


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)
def test_snapshots_on_two_ranks_are_written_once(tmp_path, monkeypatch):
    from conftest import TINY_BASE
    from test_distributed import torchrun

    raw = yaml.safe_load(TINY_BASE) | yaml.safe_load(PPO)
    raw["ppo"] |= {"steps": 3, "snapshot_every": 1, "checkpoint_every": 0}
    raw |= {"stages": STAGES, "out": str(tmp_path / "run")}
    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("CI", "true")
    log = torchrun(["run", str(path)], tmp_path)
    assert "ppo: running (data-parallel on 2 ranks)" in log
    run = tmp_path / "run"
    assert [r["step"] for r in _listing(run)] == [1, 2, 3]  # rank 0 alone wrote the lines
    assert sorted(p.name for p in (run / "ppo/snapshots").iterdir()) == [
        "step_0000001", "step_0000002", "step_0000003"]  # fmt: skip
