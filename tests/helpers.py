"""Small helpers shared by test modules (pytest puts tests/ on sys.path)."""

import contextlib
import importlib.util
import json
from pathlib import Path


def load_bench(name: str):
    """bench/<name>.py as a module (bench/ is scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def sharp_toy_model(tokenizer, std: float, positions: int = 256):
    """toy-xs with weights drawn at `std` (seed 0) instead of the usual small init: sharp,
    varied next-token distributions, so a wrong position, mask or distribution shows."""
    import torch

    from posttrain.models.presets import build_model

    m = build_model("toy-xs", tokenizer, max_position_embeddings=positions, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std, generator=g)
    return m.eval()


def check_lab_outputs(folder, seeds):
    """A lab experiment's result.json and report.md (quick run over `seeds`) are complete and
    consistent: verdict from the criteria, every criterion in the table, every plot on disk."""
    result = json.loads((folder / "result.json").read_text())
    assert result["seeds"] == seeds and result["quick"] is True
    assert result["verdict"] in ("PASS", "FAIL")
    assert result["verdict"] == ("PASS" if all(c["passed"] for c in result["criteria"]) else "FAIL")
    for c in result["criteria"]:
        assert set(c) == {"name", "claim", "rule", "estimate", "passed", "note"}
    report = (folder / "report.md").read_text()
    assert "| criterion | claim | rule | measured (95% interval) | verdict |" in report
    for c in result["criteria"]:
        assert f"| {c['name']} |" in report
    for line in report.splitlines():
        if line.startswith("![") and "](plots/" in line:
            assert (folder / line.split("](")[1].rstrip(")")).is_file()
    return result


def run_killed_at_step(monkeypatch, step: int, run) -> None:
    """Call run() with the RL stage killed (KeyboardInterrupt) during its `step`-th update, as a
    SIGINT would, then restore RLTrainer: for resume tests."""
    import pytest

    from posttrain.stages.rl import RLTrainer

    original, calls = RLTrainer.adapt_kl, []

    def stop(self, kl, n):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt("simulated kill")
        return original(self, kl, n)

    monkeypatch.setattr(RLTrainer, "adapt_kl", stop)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(RLTrainer, "adapt_kl", original)


@contextlib.contextmanager
def one_torch_thread():
    """torch on one intra-op thread inside the block, as many as before after it (also after an
    error)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
