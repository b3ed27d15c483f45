"""The same code on a GPU: every stage of the tiny pipeline on CUDA, training in bf16 autocast,
and the SFT loss of a packed batch equal to the unpacked one there (the block-diagonal mask that
position resets build goes through a different attention kernel on CUDA).

Skipped without a GPU; on a GPU machine `pytest tests/test_cuda.py` (bench/gpu_check.sh runs it).
"""

import math
import os

import pytest
import torch
from test_rl_stage import RL

# POSTTRAIN_TEST_DEVICE=cpu runs these on the CPU (to check the tests themselves without a GPU).
DEVICE = os.environ.get("POSTTRAIN_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no GPU")

ALL = """
device: {device}
sft: {{train: {{precision: bf16}}}}
dpo:
  data: {{val_fraction: 0.3, max_length: 96}}
  batch_size: 8
  train: {{lr: 1.0e-4, checkpoint_every: 0, precision: bf16}}
"""


def test_every_stage_runs_on_the_device(run_tiny):
    import yaml

    extra = yaml.safe_load(RL) | yaml.safe_load(ALL.format(device=DEVICE))
    extra["evaluate"]["models"]["dpo"] = {"model": "dpo"}
    stages = ["world", "pretrain", "sft", "sample", "rank", "reward", "dpo", "ppo", "grpo",
              "rloo", "evaluate"]  # fmt: skip
    report, run = run_tiny(stages, yaml.safe_dump(extra))
    for stage in ("pretrain", "sft", "reward", "dpo"):
        assert math.isfinite(report["stages"][stage]["train/loss"]), stage
    for stage in ("ppo", "grpo", "rloo"):
        assert math.isfinite(report["stages"][stage]["reward/mean"]), stage
    assert set(report["evals"]) == {"sft", "dpo", "ppo", "grpo"}
    for label, ev in report["evals"].items():
        assert 0.0 <= ev["gold/mean"] <= 1.0, label
    # Saved weights come back to the CPU in float32 whatever the training precision.
    from safetensors.torch import load_file

    weights = load_file(str(run / "sft/model/model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_packed_loss_equals_unpacked_on_the_device(small_tokenizer, precision):
    from posttrain.data.chat import TokenizedExample
    from posttrain.data.collate import packed_batch, pad_batch
    from posttrain.models.presets import build_model
    from posttrain.stages.sft import SFTObjective

    model = build_model("toy-xs", small_tokenizer, max_position_embeddings=256, seed=0)
    model = model.to(DEVICE).eval()
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (37, 5, 64, 21, 50, 12):
        ids = torch.randint(5, len(small_tokenizer), (n,), generator=g).tolist()
        start = n // 3  # a "prompt" then a trained "response"
        examples.append(TokenizedExample(ids, [0] * start + [1] * (n - start)))
    pad_id = small_tokenizer.pad_token_id
    padded = pad_batch(examples, pad_id).to(DEVICE)
    packed = packed_batch([examples[:3], examples[3:]], pad_id).to(DEVICE)
    assert packed.n_loss_tokens == padded.n_loss_tokens
    obj = SFTObjective(None, 1, DEVICE)
    dtype = torch.bfloat16 if precision == "bf16" else None
    with torch.no_grad(), torch.autocast(DEVICE, dtype=dtype, enabled=dtype is not None):
        a = obj.loss(model, padded)[0].item() / padded.n_loss_tokens
        b = obj.loss(model, packed)[0].item() / packed.n_loss_tokens
    # fp32: the same sums in another order. bf16: each example sees the same keys, but the
    # packed rows go through other kernels (tiles, a block mask), so the roundings differ.
    assert b == pytest.approx(a, rel=1e-5 if precision == "fp32" else 1e-2)


def test_every_training_stage_with_lora_bf16_and_checkpointing_on_the_device(run_tiny):
    """What a user with one GPU runs: LoRA adapters, bf16 autocast and activation checkpointing
    in SFT, reward, DPO, KTO and the four RL stages."""
    import yaml
    from test_lora_stages import STAGES, _with_lora_bf16

    extra = _with_lora_bf16() | {"device": DEVICE}
    report, run = run_tiny(STAGES, yaml.safe_dump(extra))
    for stage in ("sft", "reward", "dpo", "kto"):
        assert math.isfinite(report["stages"][stage]["train/loss"]), stage
    for stage in ("ppo", "grpo", "rloo", "online_dpo"):
        assert math.isfinite(report["stages"][stage]["reward/mean"]), stage
    assert (run / "dpo/model/adapter_config.json").is_file()
