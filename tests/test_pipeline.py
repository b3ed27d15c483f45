import io
import json

import pytest

from posttrain.config import load_pipeline
from posttrain.log import Logger
from posttrain.pipeline import run_pipeline

TINY = """
name: tiny
seed: 0
device: cpu
stages: [world, pretrain]
world: {corpus_docs: 60, heldout_docs: 20, n_train: 20, n_rl: 10, n_eval: 10, vocab_size: 400}
pretrain:
  seq_len: 32
  batch_size: 4
  train: {steps: 4, warmup_steps: 1, checkpoint_every: 2}
  eval: {n_per_family: 2, max_new_tokens: 4}
"""


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "true")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)

    def run(*overrides, force=()):
        stream = io.StringIO()
        pipe = load_pipeline(cfg, [f"out={tmp_path / 'run'}", *overrides])
        report = run_pipeline(pipe, force=set(force), logger=Logger(stream=stream))
        return report, stream.getvalue()

    return run, tmp_path / "run"


def test_run_writes_the_run_directory_and_report(tiny):
    run, run_dir = tiny
    report, log = run()
    pre = report["stages"]["pretrain"]
    assert pre["train/loss"] > 0 and pre["eval/perplexity"] > 1
    assert {"eval/gold/arithmetic", "eval/gold/knowledge", "eval/gold/mean"} <= set(pre)
    assert json.loads((run_dir / "report.json").read_text()) == report
    for f in ["pipeline.yaml", "report.md", "report.html", "plots/pretrain_loss.png",
              "world/config.yaml", "world/result.json", "world/tokenizer/tokenizer.json",
              "pretrain/config.yaml", "pretrain/metrics.jsonl", "pretrain/result.json",
              "pretrain/model/config.json", "pretrain/model/model.safetensors"]:  # fmt: skip
        assert (run_dir / f).is_file(), f
    steps = [
        json.loads(x)["step"] for x in (run_dir / "pretrain/metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]
    assert "pretrain step 4/4 | loss" in log
    assert "data:image/png;base64," in (run_dir / "report.html").read_text()


def test_unchanged_stages_are_skipped_and_changed_ones_rerun(tiny):
    run, run_dir = tiny
    run()
    mtime = (run_dir / "pretrain/result.json").stat().st_mtime_ns
    _, log = run()
    assert "world: skipped" in log and "pretrain: skipped" in log
    assert (run_dir / "pretrain/result.json").stat().st_mtime_ns == mtime

    _, log = run("pretrain.train.lr=5e-4")
    assert "world: skipped" in log
    assert "pretrain: running" in log
    assert (run_dir / "pretrain/result.json").stat().st_mtime_ns != mtime


def test_force_reruns_a_stage_and_deterministic_outputs_keep_downstream_cached(tiny):
    run, run_dir = tiny
    run()
    _, log = run(force=["world"])
    assert "world: running" in log
    # The world is seeded: the same files again, so pretrain's input hashes are unchanged.
    assert "pretrain: skipped" in log
    _, log = run("world.seed=1")
    assert "world: running" in log and "pretrain: running" in log


def test_force_unknown_stage(tiny):
    run, _ = tiny
    with pytest.raises(ValueError, match="no stage named"):
        run(force=["sft"])


def test_pretrain_continues_a_local_hf_model_on_user_text(tmp_path, small_tokenizer, monkeypatch):
    # A user's own HF directory and JSONL text: no world stage, no toy presets involved.
    from posttrain.models.load import save_model
    from posttrain.models.presets import build_model

    monkeypatch.setenv("CI", "true")
    save_model(build_model("toy-xs", small_tokenizer), small_tokenizer, tmp_path / "hf")
    lines = [json.dumps({"text": f"Q: What is {a} plus 11?\nA: {a + 11}"}) for a in range(10, 60)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = tmp_path / "hf.yaml"
    cfg.write_text(f"""
name: mine
out: {tmp_path / "run"}
device: cpu
stages: [pretrain]
pretrain:
  model: {tmp_path / "hf"}
  data: {tmp_path / "train.jsonl"}
  heldout: {tmp_path / "train.jsonl"}
  seq_len: 16
  batch_size: 2
  train: {{steps: 2, checkpoint_every: 0}}
""")
    report = run_pipeline(load_pipeline(cfg), logger=Logger(stream=io.StringIO()))
    pre = report["stages"]["pretrain"]
    assert pre["eval/perplexity"] > 1 and "eval/gold/mean" not in pre
    assert (tmp_path / "run/pretrain/model/tokenizer.json").is_file()


def test_missing_input_names_the_stage_and_path(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"out: {tmp_path / 'run'}\nstages: [pretrain]\n")
    with pytest.raises(
        FileNotFoundError,
        match=r"stage 'pretrain': input 'data' not found at .*corpus_train\.jsonl",
    ):
        run_pipeline(load_pipeline(cfg), logger=Logger(stream=io.StringIO()))


def test_resume_after_a_stop_gives_the_same_final_loss(tiny, monkeypatch):
    from posttrain.stages import pretrain

    run, run_dir = tiny
    clean, _ = run()
    original = pretrain.WindowObjective.batches

    def stop_at_3(self, step):
        if step == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self, step)

    monkeypatch.setattr(pretrain.WindowObjective, "batches", stop_at_3)
    with pytest.raises(KeyboardInterrupt):
        run(force=["pretrain"])
    assert not (run_dir / "pretrain/result.json").exists()
    monkeypatch.setattr(pretrain.WindowObjective, "batches", original)
    stream = io.StringIO()
    pipe = load_pipeline(run_dir.parent / "tiny.yaml", [f"out={run_dir}"])
    resumed = run_pipeline(pipe, resume=True, logger=Logger(stream=stream))
    assert "pretrain: resuming" in stream.getvalue()
    assert resumed["stages"]["pretrain"]["train/loss"] == clean["stages"]["pretrain"]["train/loss"]
    steps = [
        json.loads(x)["step"] for x in (run_dir / "pretrain/metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]


def test_midtraining_mixes_its_windows_into_the_last_steps_only():
    """Before `start` the windows are exactly those of plain pre-training; from then on the last
    round(fraction x B) windows of every micro-batch come from the mid-training stream."""
    import torch

    from posttrain.stages.pretrain import WindowObjective

    base = torch.arange(1, 500)  # tokens < 1000
    mid = torch.arange(1000, 1400)  # tokens >= 1000
    plain = WindowObjective(base, 8, 4, 2, seed=3, device="cpu")
    mixed = WindowObjective(base, 8, 4, 2, seed=3, device="cpu", mid=(mid, 5, 0.5))
    for step in range(8):
        a, b = plain.batches(step), mixed.batches(step)
        # plain pre-training draws what it always drew: seeded window starts per step
        g = torch.Generator().manual_seed(3 * 1_000_003 + step)
        starts = torch.randint(0, len(base) - 9, (2, 4), generator=g)
        assert all(torch.equal(a[i], base[starts[i][:, None] + torch.arange(9)]) for i in range(2))
        assert len(a) == len(b) == 2
        for x, y in zip(a, b, strict=True):
            if step < 5:
                assert torch.equal(x, y)
            else:
                assert torch.equal(x[:2], y[:2]) and bool((y[2:] >= 1000).all())
                assert bool((y[2:, 1:] - y[2:, :-1] == 1).all())  # contiguous windows of it


def test_pretrain_with_midtraining_on_the_worlds_conversations(run_tiny):
    from posttrain.config import ConfigError

    extra = "pretrain: {midtrain: {from_world: true, start: 0.5, fraction: 0.5}}"
    report, run = run_tiny(["world", "pretrain", "sft"], extra)
    m = report["stages"]["pretrain"]
    assert m["train/steps"] == 3 and m["midtrain/first_step"] == 2 and m["midtrain/tokens"] > 0
    with pytest.raises(ConfigError, match="give data or from_world, not both"):
        run_tiny(
            ["world", "pretrain", "sft"], "pretrain: {midtrain: {from_world: true, data: x.jsonl}}"
        )


def test_a_cached_stage_whose_code_changed_is_reused_with_a_warning(tiny, monkeypatch):
    """The code fingerprint is lineage, not cache key: the lab reuses cached stages while the
    code changes all day. A stage whose code changed is reused, with a warning naming it, the
    two fingerprints and how to recompute it; --force recomputes it and records the new code."""
    import yaml

    from posttrain import pipeline

    run, run_dir = tiny
    run()
    mtime = (run_dir / "pretrain/result.json").stat().st_mtime_ns
    was = yaml.safe_load((run_dir / "pretrain/config.yaml").read_text())["code"]["fingerprint"]
    real = pipeline.code_fingerprint
    monkeypatch.setattr(pipeline, "code_fingerprint",
                        lambda kind: "f" * 64 if kind == "pretrain" else real(kind))  # fmt: skip
    _, log = run()
    assert "pretrain: skipped" in log and "world: skipped" in log
    assert (run_dir / "pretrain/result.json").stat().st_mtime_ns == mtime  # reused
    (warning,) = [line for line in log.splitlines() if "WARNING" in line]  # world: unchanged
    assert "pretrain: reused from the cache, but its code changed since it was computed" in warning
    assert f"code {was[:12]} -> 0.1.0 code ffffffffffff" in warning
    assert "--force pretrain recomputes it (--force all: every stage" in warning

    _, log = run(force=["pretrain"])
    assert "pretrain: running" in log and "WARNING" not in log
    code = yaml.safe_load((run_dir / "pretrain/config.yaml").read_text())["code"]
    assert code == {"posttrain": "0.1.0", "fingerprint": "f" * 64}
    _, log = run()
    assert "pretrain: skipped" in log and "WARNING" not in log


def test_force_all_reruns_every_stage(tiny):
    run, _ = tiny
    run()
    _, log = run(force=["all"])
    assert "world: running" in log and "pretrain: running" in log


def test_stages_cached_before_the_code_was_recorded_are_reused_with_one_warning(tiny):
    import yaml

    run, run_dir = tiny
    run()
    for stage in ("world", "pretrain"):  # as a cache written before the code record existed
        f = run_dir / stage / "config.yaml"
        f.write_text(yaml.safe_dump({k: v for k, v in yaml.safe_load(f.read_text()).items()
                                     if k != "code"}))  # fmt: skip
    _, log = run()
    assert "world: skipped" in log and "pretrain: skipped" in log
    (warning,) = [line for line in log.splitlines() if "WARNING" in line]  # once, not per stage
    assert "world: reused from the cache" in warning and "unknown" in warning
    assert "--force world" in warning


def test_the_code_fingerprint_covers_what_a_stage_runs_and_not_the_entry_points():
    import inspect
    from pathlib import Path

    from posttrain.pipeline import PACKAGE, _stage_files, code_fingerprint
    from posttrain.stages import STAGES

    def files(kind):
        found = _stage_files(Path(inspect.getfile(STAGES[kind].run)))
        return {str(f.relative_to(PACKAGE)) for f in found}

    dpo = files("dpo")
    assert {"stages/dpo.py", "stages/_prefs.py", "stages/base.py", "ops/preference.py",
            "train/loop.py", "data/pairs.py", "settings.py", "log.py"} <= dpo  # fmt: skip
    assert not {"cli.py", "config.py", "pipeline.py", "report.py", "stages/sft.py"} & dpo
    assert not any(f.startswith(("lab/", "annotate/")) for f in dpo)
    assert "stages/sample.py" in files("best_of_n")
    assert {"stages/rl.py", "stages/rl_config.py", "stages/rl_settings.py", "stages/rl_trainer.py",
            "stages/rl_rollout.py", "stages/rl_update.py"} <= files("grpo")  # fmt: skip
    assert {"stages/evaluate.py", "stages/_eval_world.py", "stages/_eval_benchmarks.py",
            "stages/_eval_agent.py", "stages/_eval_judge.py"} <= files("evaluate")  # fmt: skip
    assert code_fingerprint("grpo") == code_fingerprint("rloo") != code_fingerprint("dpo")
    assert len(code_fingerprint("sft")) == 64


def test_a_missing_relative_path_is_named_absolute_with_what_it_is_relative_to(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    cfg = tmp_path / "configs" / "p.yaml"
    cfg.write_text("stages: [pretrain]\npretrain: {data: data/train.jsonl}\n")
    with pytest.raises(FileNotFoundError) as err:
        run_pipeline(load_pipeline(cfg), logger=Logger(stream=io.StringIO()))
    msg = str(err.value)
    assert f"input 'data' not found at {tmp_path / 'data' / 'train.jsonl'}" in msg
    assert "relative to the current directory, not to the config file" in msg


def test_a_run_directory_copied_elsewhere_keeps_its_cache(tmp_path, monkeypatch):
    # A config may name a file inside its own run directory by its absolute path (the lab writes
    # its SFT sets there): the key holds it relative to the run, so a copied run is still cached.
    import shutil

    monkeypatch.setenv("CI", "true")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)

    def run(run_dir):
        stream = io.StringIO()
        corpus = run_dir / "world" / "corpus_train.jsonl"
        pipe = load_pipeline(cfg, [f"out={run_dir}", f"pretrain.data={corpus}"])
        run_pipeline(pipe, logger=Logger(stream=stream))
        return stream.getvalue()

    first = tmp_path / "first"
    run(first)  # the world stage writes the corpus; then pretrain reads it by absolute path
    assert "pretrain: skipped" in run(first)
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(first, moved)
    log = run(moved)
    assert "world: skipped" in log and "pretrain: skipped" in log
    recorded = (moved / "pretrain" / "config.yaml").read_text()
    assert "$RUN/world/corpus_train.jsonl" in recorded and str(first) not in recorded
