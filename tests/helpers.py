"""Small helpers shared by test modules (pytest puts tests/ on sys.path)."""

import importlib.util
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


def sharp_toy_model(tokenizer, std: float):
    """toy-xs with weights drawn at `std` (seed 0) instead of the usual small init: sharp,
    varied next-token distributions, so a wrong position, mask or distribution shows."""
    import torch

    from posttrain.models.presets import build_model

    m = build_model("toy-xs", tokenizer, max_position_embeddings=256, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std, generator=g)
    return m.eval()
