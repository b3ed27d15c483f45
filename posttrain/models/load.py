"""Load and save any local Hugging Face causal LM directory."""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain.io import atomic_dir


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """`AutoModelForCausalLM.from_pretrained` on a local directory (never the hub)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"not a Hugging Face model directory (no config.json): {path}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.to(device)


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """save_pretrained (model and tokenizer) into a temp dir, then rename into place."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
