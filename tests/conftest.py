from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_configure(config):
    """Under `pytest -n N` (make test: one worker per core) each worker keeps to one thread:
    N workers each spinning up all cores' threads would fight over them."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The lab's --quick tests share one folder of cached stages (the `quick_lab` fixture): under
    `--dist loadgroup` they all go to one worker, so those stages are built once."""
    for item in items:
        if "quick_lab" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("quick_lab"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (`pytestmark = pytest.mark.usefixtures(
    "one_thread")`): the toy model's matmuls are too small to gain from threads, and on a busy
    machine their spin-waiting made tests/test_generate.py 30x slower (120 s instead of 4 s)."""
    from helpers import one_torch_thread

    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def small_tokenizer():
    """A toy tokenizer trained on generated text (fast; no toy world needed)."""
    from posttrain.models.tokenizer import train_tokenizer

    texts = [
        f"Q: What is {a} plus {b}?\nA: {a + b}\nThe cat sat on mat number {a}."
        for a in range(10, 60)
        for b in (11, 23)
    ]
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="session")
def quick_lab(tmp_path_factory):
    """One --out folder for every lab experiment's --quick test: world, pretrain, SFT, the
    sample -> rank -> reward chain and the shared PPO runs of a quick seed are built by the first
    test that needs them and taken from the pipeline's cache by the others (each test still
    passes alone: it builds whatever is missing)."""
    return tmp_path_factory.mktemp("quick_lab")


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"shared datasets not found at {SHARED_DATA} (expected ../shared/data next to the project)"
        )
    return SHARED_DATA


# The smallest toy pipeline that exercises every stage: tests add their stages' sections.
TINY_BASE = """
name: tiny
device: cpu
world: {corpus_docs: 60, heldout_docs: 20, n_train: 12, n_rl: 8, n_eval: 4, vocab_size: 400}
pretrain:
  seq_len: 32
  batch_size: 4
  train: {steps: 3, warmup_steps: 1, checkpoint_every: 0}
  eval: {n_per_family: 0}
sft:
  max_length: 128
  batch_size: 8
  epochs: 1
  train: {checkpoint_every: 0}
"""


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


TINY_PREFIX = ("world", "pretrain", "sft")


@pytest.fixture(scope="session")
def tiny_template(tmp_path_factory):
    """TINY_BASE's world, pretrain and SFT, built once per test process: `run_tiny` copies them
    into each new run, and the pipeline's cache takes them where a test's settings for them are
    TINY_BASE's own (its key holds paths relative to the run, so a copy is cached); where a
    test changes them, the pipeline recomputes them as it would without the copy."""
    import io

    import yaml

    from posttrain.config import load_pipeline
    from posttrain.log import Logger
    from posttrain.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("tiny_template")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(yaml.safe_load(TINY_BASE) | {"stages": list(TINY_PREFIX)}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CI", "true")
        run_pipeline(
            load_pipeline(cfg, [f"out={root / 'run'}"]), logger=Logger(stream=io.StringIO())
        )
    return root / "run"


def seed_tiny_run(template, out) -> None:
    """Copy the tiny template's stages into a run folder that does not exist yet."""
    import shutil

    if out.exists():
        return
    for stage in TINY_PREFIX:
        shutil.copytree(template / stage, out / stage)


@pytest.fixture
def run_tiny(tmp_path, monkeypatch, tiny_template):
    """run_tiny(stages, extra_yaml, force=(), template=True) -> (report, run_dir): TINY_BASE with
    `extra_yaml` merged over it, run in tmp_path/run with plain progress lines; a new run starts
    from the tiny template's world, pretrain and SFT (template=False: from nothing)."""
    import io

    import yaml

    from posttrain.config import load_pipeline
    from posttrain.log import Logger
    from posttrain.pipeline import run_pipeline

    monkeypatch.setenv("CI", "true")

    def run(stages: list[str], extra: str = "", force=(), template: bool = True):
        raw = _merge(yaml.safe_load(TINY_BASE), yaml.safe_load(extra) or {}) | {"stages": stages}
        cfg = tmp_path / "tiny.yaml"
        cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
        out = tmp_path / "run"
        if template:  # else every stage runs here (a test of what running does)
            seed_tiny_run(tiny_template, out)
        pipe = load_pipeline(cfg, [f"out={out}"])
        return run_pipeline(pipe, force=set(force), logger=Logger(stream=io.StringIO())), out

    return run
