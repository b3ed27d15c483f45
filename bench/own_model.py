"""configs/own_model.yaml (SFT -> reward -> DPO -> GRPO, LoRA + bf16 + checkpointing), shortened,
on a random-init Qwen2-shaped model: each stage's wall time and peak GPU memory, one JSON line
per stage, plus DPO's memory with a live reference: full fine-tuning (a frozen copy of the base
beside the policy) against LoRA (the same base with its adapters off).

    python bench/own_model.py --out /tmp/own --data-dir ../shared/data [--device cuda]
        [--hidden 896 --layers 24 --heads 14 --kv-heads 2 --intermediate 4864]   # Qwen2-0.5B's shape

The vocabulary is a 8,192-token BPE trained on the data (Qwen2's 151,936 would only add
embedding rows). Steps are few: this measures the mechanics, time and memory, not quality.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_model(args, out: Path) -> Path:
    """A random-init Qwen2 model and a tokenizer trained on the data, with a ChatML template."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from posttrain.models.load import save_model
    from posttrain.models.tokenizer import train_tokenizer

    texts = [json.loads(line)["question"] for line in open(args.data_dir / "gsm8k/train.jsonl")]
    tok = train_tokenizer(texts, vocab_size=8192)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      intermediate_size=args.intermediate, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    save_model(model, tok, out / "model")
    return out / "model"


def shortened(args, model_dir: Path) -> dict:
    """The example config with this model, these data, few steps, and the two DPO variants."""
    import yaml

    raw = yaml.safe_load((ROOT / "configs/own_model.yaml").read_text())
    d = args.data_dir
    raw["device"] = args.device
    raw["sft"] |= {"model": str(model_dir), "epochs": None}
    raw["sft"]["data"]["path"] = str(d / "oasst/en_100_tree.jsonl")
    for stage in ("reward", "dpo"):
        raw[stage]["data"]["path"] = str(d / "hh-rlhf/harmless-base/test.jsonl.gz")
        raw[stage]["epochs"] = None
    raw["grpo"]["prompts"] = str(d / "gsm8k/train.jsonl")
    for stage in ("sft", "reward", "dpo"):
        raw[stage]["train"] |= {"steps": args.steps, "warmup_steps": 1, "checkpoint_every": 0}
    raw["grpo"] |= {"steps": max(2, args.steps // 5), "checkpoint_every": 0}
    raw["grpo"]["rollout"] |= {"max_new_tokens": args.gen_tokens}
    # DPO with the reference alive during training: what LoRA's shared base saves.
    live = {"precompute_ref": False}
    raw["dpo_lora_live"] = raw["dpo"] | {"kind": "dpo"} | live
    raw["dpo_full_live"] = raw["dpo"] | {"kind": "dpo"} | live
    del raw["dpo_full_live"]["lora"]
    raw["dpo_full_live"]["train"] = raw["dpo"]["train"] | {"lr": 1.0e-6}
    raw["stages"] = ["sft", "reward", "dpo", "grpo", "dpo_lora_live", "dpo_full_live"]
    return raw


def run_stages(raw: dict, out: Path) -> list[dict]:
    """Each stage in turn (the earlier ones cached), its time and peak GPU memory."""
    import io

    import torch
    import yaml

    from posttrain.config import load_pipeline
    from posttrain.log import Logger
    from posttrain.pipeline import run_pipeline

    rows, log = [], io.StringIO()
    for i, stage in enumerate(raw["stages"]):
        cfg = out / "pipeline.yaml"
        cfg.write_text(yaml.safe_dump(raw | {"stages": raw["stages"][: i + 1]}, sort_keys=False))
        pipe = load_pipeline(cfg, [f"out={out / 'run'}"])
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        report = run_pipeline(pipe, logger=Logger(stream=log), report=False)
        row = {"stage": stage, "seconds": round(time.perf_counter() - t0, 1)}
        if torch.cuda.is_available():
            row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        metrics = (report or {}).get("stages", {}).get(stage) or json.loads(
            (out / "run" / stage / "result.json").read_text()
        ).get("metrics", {})
        for k in ("train/loss", "reward/mean", "train/steps", "rollout/mean_length"):
            if k in metrics:
                row[k] = metrics[k]
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "log.txt").write_text(log.getvalue())
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared/data"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=4864)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--gen-tokens", type=int, default=128)
    args = ap.parse_args()
    args.data_dir = Path(args.data_dir).resolve()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(args, out)
    from posttrain.models.load import load_model

    n_params = sum(p.numel() for p in load_model(model_dir).parameters())
    rows = run_stages(shortened(args, model_dir), out)
    print(json.dumps({"bench": "own_model", "device": args.device, "params": n_params,
                      "stages": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
