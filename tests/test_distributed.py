"""Data parallelism under torchrun (gloo, 2 CPU processes): 2 ranks x G micro-batches train
exactly what one process with 2G micro-batches trains (the loss normalised by the step's total
token count over both ranks, which differ per rank), through the CLI and through a pipeline;
rank 0 alone writes, and stages without a data-parallel path run on rank 0."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import one_torch_thread

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


def torchrun(args: list[str], cwd, nproc: int = 2) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "posttrain.cli", *args]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "CI": "true"}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout + r.stderr


def losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["train/loss"] for x in lines]


def weights(model_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def assert_same_weights(a, b, atol: float = 1e-5) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < atol, worst


def sft_inputs(tmp_path, tokenizer):
    """A toy-xs HF directory and a chat file whose micro-batches all differ in size."""
    from posttrain.models.load import save_model
    from posttrain.models.presets import build_model

    save_model(build_model("toy-xs", tokenizer, seed=3), tokenizer, tmp_path / "hf")
    lines = []
    for a in range(10, 34):  # replies of 1 to 9 extra words: every micro-batch a different size
        reply = f"{a + 11}" + " and the cat sat" * (a % 9)
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": f"What is {a} plus 11?" + " Tell me." * (a % 4)},
            {"role": "assistant", "content": reply}]}))  # fmt: skip
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")


def sft_config(tmp_path, name: str, grad_accum: int, **extra) -> str:
    cfg = {"model": str(tmp_path / "hf"), "data": {"path": str(tmp_path / "chat.jsonl")},
           "max_length": 96, "packing": False, "batch_size": 3, "epochs": 2,
           "val_fraction": 0.0,
           "train": {"lr": 1e-2, "warmup_steps": 1, "grad_accum": grad_accum,
                     "checkpoint_every": 2}}  # fmt: skip
    for key, value in extra.items():
        if isinstance(value, dict):
            cfg[key] = cfg.get(key, {}) | value
        else:
            cfg[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def pipeline_config(tmp_path, raw: dict, name: str, train: dict, stages) -> str:
    """`raw` with `train` merged into the train settings of `stages`, run in tmp_path/name."""
    cfg = json.loads(json.dumps(raw))
    for stage in stages:
        cfg[stage]["train"] |= train
    cfg["out"] = str(tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("packing", [False, True])
def test_sft_on_two_ranks_equals_one_process_with_twice_the_accumulation(
    tmp_path, small_tokenizer, packing
):
    from posttrain.cli import main

    sft_inputs(tmp_path, small_tokenizer)

    def config(grad_accum: int) -> str:
        return sft_config(tmp_path, f"sft_g{grad_accum}", grad_accum, packing=packing)

    assert main(["sft", "--config", config(2), "--out", str(tmp_path / "one")]) == 0
    log = torchrun(["sft", "--config", config(1), "--out", str(tmp_path / "two")], tmp_path)
    assert "data-parallel on 2 ranks" in log
    one, two = tmp_path / "one/sft", tmp_path / "two/sft"
    # One metrics line per step, written once; the same losses and the same final weights.
    assert len(losses(two)) == len(losses(one)) >= 4
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    assert_same_weights(one / "model", two / "model")
    steps = json.loads((two / "result.json").read_text())["metrics"]["train/steps"]
    assert steps == len(losses(one))
    assert sorted(p.name for p in (two / "checkpoints").iterdir())[-1].startswith("step_")


# The FSDP variants of the two pipeline tests are slow-marked (`make test-all`): FSDP itself is
# checked in the default suite by test_fsdp_sft_equals_one_process_and_resumes_from_full_checkpoints.
FSDP_SLOW = [False, pytest.param(True, marks=pytest.mark.slow)]


@pytest.mark.parametrize("fsdp", FSDP_SLOW)
def test_a_pipeline_on_two_ranks(tmp_path, fsdp, monkeypatch):
    """world (rank 0), pretrain and sft (data-parallel, or sharded), evaluate (shared greedy
    decoding): the same pretrain as one process with twice the accumulation, and one report."""
    from conftest import TINY_BASE

    from posttrain.cli import main

    base = yaml.safe_load(TINY_BASE)
    base["stages"] = ["world", "pretrain", "sft", "evaluate"]
    base["evaluate"] = {"max_new_tokens": 4, "diversity": {"n_prompts": 0}}
    from conftest import SHARED_DATA

    if SHARED_DATA.is_dir():  # public benchmarks too: shared decoding, and rank 0's log-probs
        base["evaluate"] |= {"data_dir": str(SHARED_DATA), "benchmarks": {
            name: {"n": 3} | ({} if name == "truthfulqa_mc" else {"max_new_tokens": 4})
            for name in ("xstest", "gsm8k", "truthfulqa_mc")}}  # fmt: skip

    def config(name: str, grad_accum: int) -> str:
        # (train.fsdp in a single process is an error: the one-process reference runs plain)
        train = {"grad_accum": grad_accum, "fsdp": fsdp and name == "two"}
        return pipeline_config(tmp_path, base, name, train, ("pretrain", "sft"))

    monkeypatch.setenv("CI", "true")
    assert main(["run", config("one", 2)]) == 0
    log = torchrun(["run", config("two", 1)], tmp_path)
    assert "world: running (on rank 0)" in log
    assert "evaluate: running (data-parallel on 2 ranks)" in log
    assert log.count("pipeline done") == 1  # rank 0 alone reports
    one, two = tmp_path / "one", tmp_path / "two"
    assert losses(two / "pretrain") == pytest.approx(losses(one / "pretrain"), rel=1e-5)
    assert_same_weights(one / "pretrain/model", two / "pretrain/model")
    report = json.loads((two / "report.json").read_text())
    assert set(report["evals"]) == {"base", "sft"}
    if SHARED_DATA.is_dir():  # the same benchmark answers as one process
        one_report = json.loads((one / "report.json").read_text())
        for label in ("base", "sft"):
            for key in ("xstest/false_refusal_rate", "gsm8k/accuracy", "truthfulqa/mc1"):
                assert report["evals"][label][key] == one_report["evals"][label][key], (label, key)
            recs = [[json.loads(x) for x in (run / f"evaluate/{label}.xstest.jsonl").read_text()
                     .splitlines()] for run in (one, two)]  # fmt: skip
            for a, b in zip(*recs, strict=True):  # log-probs: 1 thread per rank vs 2, rounding
                assert a.pop("logprob") == pytest.approx(b.pop("logprob"), abs=1e-4) and a == b


@pytest.mark.parametrize("fsdp", FSDP_SLOW)
def test_reward_and_dpo_on_two_ranks(tmp_path, fsdp, monkeypatch):
    """reward (Bradley-Terry and Plackett-Luce), DPO and KTO train data-parallel, or sharded
    (not KTO) (their reward-head and policy forwards inside FSDP's root method): the same losses
    and weights as one process with twice the accumulation. The stages before them (world to
    rank) are the one-process run's, copied: their own ranks are tested elsewhere."""
    import shutil

    from conftest import TINY_BASE
    from test_reward_dpo import PREFS

    from posttrain.cli import main

    raw = yaml.safe_load(TINY_BASE) | yaml.safe_load(PREFS)
    raw["stages"] = ["world", "pretrain", "sft", "sample", "rank", "reward", "reward_pl", "dpo"]
    raw.pop("bon")
    trained = ["reward", "reward_pl", "dpo"]
    if not fsdp:  # KTO: its reference point (z0) is one mean over both ranks' sequences
        raw["stages"].append("kto")
        raw["kto"] = {"data": {"val_fraction": 0.3, "max_length": 96}, "batch_size": 8,
                      "train": {"lr": 1.0e-4, "checkpoint_every": 0}}  # fmt: skip
        trained.append("kto")
    for stage in trained:
        raw[stage]["epochs"] = 2

    def config(name: str, grad_accum: int) -> str:
        # (train.fsdp in a single process is an error: the one-process reference runs plain)
        train = {"grad_accum": grad_accum, "fsdp": fsdp and name == "two"}
        return pipeline_config(tmp_path, raw, name, train, trained)

    monkeypatch.setenv("CI", "true")
    assert main(["run", config("one", 2)]) == 0
    for stage in ("world", "pretrain", "sft", "sample", "rank"):
        shutil.copytree(tmp_path / "one" / stage, tmp_path / "two" / stage)
    log = torchrun(["run", config("two", 1)], tmp_path)
    assert "rank: skipped" in log
    for stage in trained:
        assert f"{stage}: running (data-parallel on 2 ranks)" in log
        one, two = tmp_path / "one" / stage, tmp_path / "two" / stage
        assert len(losses(one)) >= 2
        assert losses(two) == pytest.approx(losses(one), rel=1e-5), stage
        # FSDP's reduce-scatter rounds differently from an all-reduce; three trained stages
        # later that is ~2e-5 on weights of size ~1.
        assert_same_weights(one / "model", two / "model", 1e-4 if fsdp else 1e-5)


def test_fsdp_sft_equals_one_process_and_resumes_from_full_checkpoints(tmp_path, small_tokenizer):
    """train.fsdp: weights, gradients and AdamW state sharded over 2 ranks; the same training as
    one process; checkpoints hold the full (gathered) state and a resume from one finishes with
    the same weights; the stage's model is a plain HF model again (saved, loadable)."""
    from posttrain.cli import main

    sft_inputs(tmp_path, small_tokenizer)
    assert (
        main(["sft", "--config", sft_config(tmp_path, "one", 2), "--out", str(tmp_path / "one")])
        == 0
    )
    fsdp = sft_config(tmp_path, "fsdp", 1, train={"fsdp": True})
    log = torchrun(["sft", "--config", fsdp, "--out", str(tmp_path / "two")], tmp_path)
    assert "data-parallel on 2 ranks" in log
    one, two = tmp_path / "one/sft", tmp_path / "two/sft"
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    assert_same_weights(one / "model", two / "model")

    ckpts = sorted((two / "checkpoints").iterdir())
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=False)
    full = weights(two / "model")
    for k, v in full.items():  # full tensors, not shards
        assert type(state["model"][k]) is torch.Tensor and state["model"][k].shape == v.shape, k
    # Resume from the previous checkpoint: the same final weights.
    ckpts[-1].unlink()
    (two / "result.json").unlink()
    final = weights(two / "model")
    log = torchrun(["sft", "--config", fsdp, "--out", str(tmp_path / "two"), "--resume"], tmp_path)
    assert "resuming" in log
    again = weights(two / "model")
    assert max((again[k] - final[k]).abs().max().item() for k in final) < 1e-6


def test_fsdp_with_lora_is_a_clear_error(tmp_path, small_tokenizer):
    sft_inputs(tmp_path, small_tokenizer)
    cfg = sft_config(tmp_path, "lora", 1, train={"fsdp": True}, lora={"enabled": True, "r": 4})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "posttrain.cli", "sft", "--config", cfg, "--out", str(tmp_path / "run")]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "CI": "true"}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "train.fsdp: the model has frozen parameters (LoRA?)" in r.stderr


def test_sample_on_two_ranks_gives_the_single_process_candidates(tmp_path, small_tokenizer):
    """Each rank samples every other chunk of prompts with that chunk's seed; rank 0 writes
    them in order: the file is byte-identical to one process's (both with 1 thread)."""
    from posttrain.cli import main

    sft_inputs(tmp_path, small_tokenizer)
    prompts = [json.dumps({"prompt": f"What is {a} plus {a % 7}?"}) for a in range(23)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(prompts) + "\n")
    cfg = {"model": str(tmp_path / "hf"), "prompts": str(tmp_path / "prompts.jsonl"), "n": 3,
           "chunk": 4, "batch_size": 6, "max_new_tokens": 6, "temperature": 1.0}  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    args = ["sample", "--config", str(tmp_path / "s.yaml"), "--out"]
    with one_torch_thread():  # the single process here, as each rank, on one thread
        assert main([*args, str(tmp_path / "r1")]) == 0
    torchrun([*args, str(tmp_path / "r2")], tmp_path)
    one, two = ((tmp_path / f"r{n}/sample/candidates.jsonl").read_text() for n in (1, 2))
    assert one == two and len(one.splitlines()) == 23


def test_evaluate_on_two_ranks_gives_the_single_process_records(tmp_path, monkeypatch):
    """Greedy decoding shared over 2 ranks (every other batch, the same batches) gives the
    records one process gives, byte for byte; rank 0 scores and writes them."""
    import shutil

    from conftest import TINY_BASE

    from posttrain.cli import main

    raw = yaml.safe_load(TINY_BASE) | {"stages": ["world", "pretrain", "sft"]}
    monkeypatch.setenv("CI", "true")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(raw | {"out": str(tmp_path / "r0")}))
    assert main(["run", str(tmp_path / "base.yaml")]) == 0
    raw["stages"].append("evaluate")
    raw["evaluate"] = {"max_new_tokens": 5, "batch_size": 3, "diversity": {"n_prompts": 2}}
    for n in (1, 2):
        shutil.copytree(tmp_path / "r0", tmp_path / f"r{n}")
        cfg = tmp_path / f"e{n}.yaml"
        cfg.write_text(yaml.safe_dump(raw | {"out": str(tmp_path / f"r{n}")}))
    with one_torch_thread():  # the single process here, as each rank, on one thread
        assert main(["run", str(tmp_path / "e1.yaml")]) == 0
    assert "sft: skipped" in torchrun(["run", str(tmp_path / "e2.yaml")], tmp_path)
    for label in ("base", "sft"):
        one, two = ((tmp_path / f"r{n}/evaluate/{label}.jsonl").read_text() for n in (1, 2))
        assert one == two and one
    reports = [json.loads((tmp_path / f"r{n}/report.json").read_text()) for n in (1, 2)]
    assert reports[0]["evals"] == reports[1]["evals"]


def test_ppo_grpo_rloo_and_online_dpo_on_two_ranks_stay_in_sync(tmp_path, monkeypatch):
    """Each rank rolls out its half of a step's prompts (whole groups) and the gradients of
    every minibatch are summed over ranks, normalised by the whole minibatch (PPO: rewards and
    advantages whitened over both ranks, the value model too); the run checks the ranks' policy
    and value weights are identical at the end."""
    from conftest import TINY_BASE
    from test_rl_stage import RL

    raw = yaml.safe_load(TINY_BASE) | yaml.safe_load(RL)
    raw["stages"] = ["world", "pretrain", "sft", "sample", "rank", "reward", "ppo", "grpo", "rloo",
                     "online_dpo"]  # fmt: skip
    raw.pop("evaluate")
    raw["grpo"] |= {"loss_reduction": "token_mean", "eval_every": 1}
    raw["rloo"] |= {"minibatch_size": 4, "rollout": {"prompts_per_step": 2, "k": 2,
                                                     "max_new_tokens": 8}}  # fmt: skip
    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump(raw | {"out": str(tmp_path / "run")}))
    monkeypatch.setenv("CI", "true")
    log = torchrun(["run", str(path)], tmp_path)
    rl_stages = ("ppo", "grpo", "rloo", "online_dpo")
    for stage in rl_stages:
        assert f"{stage}: running (data-parallel on 2 ranks)" in log
    assert "rank: running (on rank 0)" in log
    for stage in rl_stages:
        lines = (tmp_path / "run" / stage / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 2, stage  # written once, by rank 0
        assert (tmp_path / "run" / stage / "model/model.safetensors").is_file()
        last = json.loads(lines[-1])
        assert math.isfinite(last["reward/mean"]) and math.isfinite(last["policy/loss"]), stage
    grpo = [json.loads(x) for x in (tmp_path / "run/grpo/metrics.jsonl").read_text().splitlines()]
    assert all("eval/reward" in m for m in grpo)  # rank 0 evaluated at every step


def test_the_ranks_whitening_is_masked_whiten_over_all_their_entries(monkeypatch):
    """rl._whiten under torchrun sums (x, x^2, count) over ranks; with the sums of one rank it
    must be exactly ops.masked_whiten (the population variance over the valid entries)."""
    from posttrain.ops import rl as ops
    from posttrain.stages import rl
    from posttrain.train import dist

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g) * 3 + 1
    mask = torch.rand(5, 7, generator=g) > 0.3
    expected = ops.masked_whiten(x, mask)
    monkeypatch.setattr(dist, "active", lambda: True)
    monkeypatch.setattr(dist, "all_sum", lambda values: list(values))
    assert torch.allclose(rl._whiten(x, mask), expected, atol=1e-5)


def run_case(case: str, *args: str, cwd) -> subprocess.CompletedProcess:
    """tests/torchrun_cases.py CASE ARGS on 2 ranks."""
    script = os.path.join(os.path.dirname(__file__), "torchrun_cases.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           script, case, *args]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "CI": "true"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads from /proc")
def test_a_rank_frees_its_process_group_before_it_exits(tmp_path):
    """dist.close frees the group even though torch.distributed.nn (imported by transformers
    after init) holds it in default arguments: gloo's threads are joined before the interpreter
    shuts down, so a worker still busy with the last collective cannot abort the finished rank
    at exit (SIGABRT, "terminate called without an active exception"; see torchrun_cases.py)."""
    import re

    r = run_case("teardown", cwd=tmp_path)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    for rank in (0, 1):  # the group had threads, and close() ended them
        assert re.search(rf"rank {rank}: gloo threads before close \[.+\], after \[\]", log), log


def world_only(tmp_path) -> str:
    """The cheapest pipeline: the toy world stage (on rank 0) alone."""
    from conftest import TINY_BASE

    raw = yaml.safe_load(TINY_BASE) | {"stages": ["world"], "out": str(tmp_path / "run")}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(raw))
    return str(tmp_path / "w.yaml")


def test_a_finished_run_exits_0_even_if_its_group_cannot_be_freed(tmp_path):
    """Something close() cannot drop holds the group (under train.fsdp, DTensor's planners do)
    and a gloo worker is still busy: the finished ranks end before the interpreter's shutdown,
    with status 0, instead of aborting in it."""
    r = run_case("held-group", world_only(tmp_path), cwd=tmp_path)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert log.count("pipeline done") == 1 and (tmp_path / "run/report.json").is_file()


def test_a_rank_failing_at_the_end_stops_the_run_instead_of_hanging(tmp_path):
    """Rank 0 fails writing the report while rank 1 waits for it at the last barrier: the run
    exits non-zero with rank 0's error (no barrier on the failed rank's way out), well before
    the group's 4-hour timeout."""
    r = run_case("report-fails", world_only(tmp_path), cwd=tmp_path)
    assert r.returncode != 0
    assert "rank 0: the report failed (on purpose)" in r.stdout + r.stderr
