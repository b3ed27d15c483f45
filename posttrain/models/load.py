"""Load and save any local Hugging Face causal LM directory."""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain.io import atomic_dir, clean_stale_temps
from posttrain.models.tokenizer import has_tokenizer_files


def resolve_device(name: str = "auto") -> torch.device:
    """auto: cuda if available, else cpu. Under torchrun a bare "cuda" is this rank's GPU."""
    import os

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def check_model_dir(path: str | Path) -> Path:
    """`path` if it is a model directory: a Hugging Face one (config.json) or a LoRA adapter
    (adapter_config.json). Else a FileNotFoundError naming it, what it lacks and what to give;
    cheap, so a stage can check its models before it starts."""
    path = Path(path)
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return path
    lacks, state = "no config.json", " does not exist"
    if path.is_dir():
        lacks += "" if has_tokenizer_files(path) else ", no tokenizer files"
        state = " is empty" if not any(path.iterdir()) else ""
    elif path.exists():
        state = " is a file"
    raise FileNotFoundError(
        f"not a Hugging Face model directory ({lacks}): {path}{state}; give a directory written "
        "by save_pretrained (config.json, weights, tokenizer files) or the name of a stage of "
        "the pipeline that trains one"
    )


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """`AutoModelForCausalLM.from_pretrained` on a local directory (never the hub)."""
    from transformers import AutoModelForCausalLM

    path = check_model_dir(path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return _load_adapter(path, device, dtype)
    # An absolute path: a LoRA adapter saved from this model names it as its base directory.
    model = AutoModelForCausalLM.from_pretrained(path.resolve(), dtype=dtype, local_files_only=True)
    return model.to(device)


def _load_adapter(path: Path, device, dtype):
    """A LoRA adapter directory: load its base model (a local path), apply and merge the adapter."""
    import json

    from peft import PeftModel

    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise FileNotFoundError(f"{path}: adapter's base model directory not found: {base!r}")
    model = PeftModel.from_pretrained(load_model(base, "cpu", dtype), path)
    return model.merge_and_unload().to(device)


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """save_pretrained (model and tokenizer) into a temp dir, then rename into place (first
    removing what an earlier, killed save of it left: `.model.*.tmp/`, `.model.*.old/`)."""
    clean_stale_temps(Path(out_dir).parent, Path(out_dir).name)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
