"""LoRA and bf16 in every training stage: only adapter (and head) weights change, the reference
with adapters off is the base model, one copy of the base in memory, every stage end to end."""

import math

import pytest
import torch
import yaml
from test_rl_stage import RL

from posttrain.models.lora import BaseView, LoraSettings, adapters_off, apply_lora, unwrap
from posttrain.models.presets import build_model

LORA = {"enabled": True, "r": 4, "alpha": 8.0}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture
def tiny(small_tokenizer):
    torch.manual_seed(0)
    return build_model("toy-xs", small_tokenizer, max_position_embeddings=128, seed=0).eval()


def _targeted(name: str) -> bool:
    return any(f".{t}." in name or name.endswith(f".{t}.weight") for t in TARGETS)


def test_only_adapters_train_and_adapters_off_is_the_base(tiny, small_tokenizer):
    import copy

    base = copy.deepcopy(tiny)
    model = apply_lora(tiny, LoraSettings(**LORA))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.tensor([small_tokenizer("Q: What is 12 plus 11?\nA: 23")["input_ids"]])
    for _ in range(3):  # move the adapters away from their zero start (B = 0)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        on = model(input_ids=ids).logits
        with adapters_off(model):
            off = model(input_ids=ids).logits
        via_view = BaseView(model)(input_ids=ids).logits
        want = base(input_ids=ids).logits
    assert not torch.allclose(on, want, atol=1e-4)  # the adapters did learn something
    torch.testing.assert_close(off, want)  # reference = base, bit for bit up to float order
    torch.testing.assert_close(via_view, want)
    # No base weight moved.
    got = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
           for n, p in model.named_parameters() if "lora_" not in n}  # fmt: skip
    for n, p in base.named_parameters():
        assert torch.equal(got[n], p), n


def test_base_view_gives_the_base_log_probs_through_the_head_only_path(tiny, small_tokenizer):
    """sequence_logps goes through get_decoder() + the LM head: the view switches the adapters
    off there too."""
    import copy

    from posttrain.data.pairs import PairBatches, sequence_logps, tokenize_pairs

    base = copy.deepcopy(tiny)
    model = apply_lora(tiny, LoraSettings(**LORA))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    pairs = [{"prompt_id": "a", "messages": [{"role": "user", "content": "What is 2 plus 2?"}],
              "chosen": "4", "rejected": "5 or so."}]  # fmt: skip
    tok_pairs, _ = tokenize_pairs(small_tokenizer, pairs, max_length=64)
    sb = PairBatches(tok_pairs, batch_size=1, pad_id=0, packing=False, row_len=128, seed=0).all()[0]
    with torch.no_grad():
        want = sequence_logps(base, sb)
        got = sequence_logps(BaseView(model), sb)
        policy = sequence_logps(model, sb)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(policy, want, atol=1e-3)


def test_scalar_model_trains_adapters_and_the_whole_head(small_tokenizer, tmp_path):
    from posttrain.models.load import save_model
    from posttrain.models.reward import reward_model_from, score_head

    lm = build_model("toy-xs", small_tokenizer, max_position_embeddings=128, seed=0)
    save_model(lm, small_tokenizer, tmp_path / "lm")
    rm = apply_lora(reward_model_from(tmp_path / "lm", small_tokenizer), LoraSettings(**LORA),
                    task="scalar")  # fmt: skip
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    head = {n for n in trainable if "lora_" not in n}
    assert head and all("score" in n for n in head)  # the head, in full
    assert score_head(rm).weight.requires_grad


def test_settings_of_disabled_lora_are_an_error():
    with pytest.raises(ValueError, match="r: is set but enabled is false"):
        LoraSettings(r=16)
    LoraSettings(r=8)  # the default spelled out (a resolved pipeline.yaml) is no setting
    from posttrain.config import ConfigError, build_pipeline

    raw = {"name": "x", "stages": ["world", "dpo"], "dpo": {"lora": {"r": 16}}}
    with pytest.raises(ConfigError, match=r"dpo\.lora\.r.*dpo\.lora\.enabled is false"):
        build_pipeline(raw, "test")
    from posttrain.stages.rl import GRPOConfig

    with pytest.raises(ValueError, match="train.fsdp"):
        GRPOConfig(train={"fsdp": True})


def test_lora_is_out_of_the_cache_key_while_off():
    """Stages cached before these options existed stay cached."""
    from posttrain.stages.dpo import Config as DPOConfig
    from posttrain.stages.rl import PPOConfig

    assert "lora" not in DPOConfig().model_dump()
    assert "lora" not in PPOConfig().model_dump() and "train" not in PPOConfig().model_dump()
    assert PPOConfig(train={"precision": "bf16"}).model_dump()["train"]["precision"] == "bf16"


def _held_bytes(*models) -> int:
    """Bytes of the distinct tensor storages that these models' parameters and buffers hold
    (a weight shared by two of them counts once)."""
    seen, total = set(), 0
    for m in models:
        for t in [*m.parameters(), *m.buffers()]:
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total


def test_lora_dpo_with_a_live_reference_holds_one_copy_of_the_base(tiny, small_tokenizer):
    """Measured on the objects a DPO run keeps: under LoRA the policy and its reference hold one
    base plus adapters; a full fine-tune with a live reference holds two bases (bench/RESULTS.md
    has the GPU figures: 2.8 GB against 7.7 GB on a 365M model)."""
    import copy

    from posttrain.stages.dpo import reference_of

    class Ctx:
        device = torch.device("cpu")

    base_bytes = _held_bytes(tiny)
    model = apply_lora(tiny, LoraSettings(**LORA))
    ref = reference_of(model, Ctx(), {}, LoraSettings(**LORA))
    assert isinstance(ref, BaseView) and ref.model is model
    held = _held_bytes(model, ref.model)
    assert base_bytes < held < 1.1 * base_bytes  # one base, plus r=4 adapters
    full = build_model("toy-xs", small_tokenizer, max_position_embeddings=128, seed=0)
    frozen = copy.deepcopy(full).eval().requires_grad_(False)  # what full DPO keeps beside it
    assert _held_bytes(full, frozen) == 2 * _held_bytes(full)


def test_checkpointed_recomputes_blocks_in_eval_mode_and_changes_no_gradient(tiny, small_tokenizer):
    """RL keeps the policy in eval mode (no dropout); checkpointing must still engage there
    (each block runs again in the backward pass) and give the same gradients."""
    from posttrain.train.precision import checkpointed

    model = apply_lora(tiny, LoraSettings(**LORA)).eval()
    ids = torch.tensor([small_tokenizer("Q: What is 12 plus 11?\nA: 23")["input_ids"]])
    block = unwrap(model).model.layers[0]
    calls = []
    # A child of the block: hooks on the block itself stay outside the checkpoint.
    block.mlp.register_forward_pre_hook(lambda *a: calls.append(1))

    def grads():
        calls.clear()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return g, len(calls)

    plain, n_plain = grads()
    with checkpointed(model):
        ckpt, n_ckpt = grads()
    again, n_again = grads()
    assert (n_plain, n_ckpt, n_again) == (1, 2, 1)  # recomputed once inside, off afterwards
    assert not block.training and not model.training
    for n, g in plain.items():
        torch.testing.assert_close(ckpt[n], g)


STAGES = ["world", "pretrain", "sft", "sample", "rank", "reward", "dpo", "kto", "ppo", "grpo",
          "rloo", "online_dpo"]  # fmt: skip


def _with_lora_bf16() -> dict:
    extra = yaml.safe_load(RL)
    del extra["evaluate"]
    extra["dpo"] = {"data": {"val_fraction": 0.3, "max_length": 96}, "batch_size": 8,
                    "precompute_ref": False,
                    "train": {"lr": 1.0e-2, "checkpoint_every": 0}}  # fmt: skip
    extra["kto"] = {"data": {"val_fraction": 0.3, "max_length": 96}, "batch_size": 8,
                    "train": {"lr": 1.0e-2, "checkpoint_every": 0}}  # fmt: skip
    extra["sample"]["n"] = 3
    for stage in ("sft", "reward", "dpo", "kto", "ppo", "grpo", "rloo", "online_dpo"):
        sec = extra.setdefault(stage, {})
        sec["lora"] = dict(LORA, save="adapter") if stage in ("reward", "dpo", "ppo") else LORA
        train = sec.setdefault("train", {})
        train["precision"] = "bf16"
        if stage in ("dpo", "ppo", "grpo"):
            train["gradient_checkpointing"] = True
    for stage in ("ppo", "grpo", "rloo", "online_dpo"):
        extra[stage]["lr"] = 1.0e-2
    return extra


def test_every_training_stage_with_lora_and_bf16(run_tiny):
    from safetensors.torch import load_file

    from posttrain.models.load import load_model
    from posttrain.models.reward import reward_model_from
    from posttrain.models.tokenizer import load_tokenizer

    report, run = run_tiny(STAGES, yaml.safe_dump(_with_lora_bf16()))
    st = report["stages"]
    for stage in ("sft", "reward", "dpo", "kto"):
        assert math.isfinite(st[stage]["train/loss"]), stage
    for stage in ("ppo", "grpo", "rloo", "online_dpo"):
        assert math.isfinite(st[stage]["reward/mean"]), stage
    # Adapter saves: only adapter weights (and the reward model's head) on disk, loadable.
    sft = load_model(run / "sft/model")
    for stage in ("dpo", "ppo"):
        saved = load_file(str(run / stage / "model/adapter_model.safetensors"))
        assert saved and all("lora_" in k for k in saved), stage
        merged = load_model(run / stage / "model")
        base = dict(sft.named_parameters())
        changed = {n for n, p in merged.named_parameters() if not torch.equal(p, base[n])}
        assert changed and all(_targeted(n) for n in changed), (stage, sorted(changed)[:3])
    saved = load_file(str(run / "reward/model/adapter_model.safetensors"))
    assert any("lora_" in k for k in saved) and any("score" in k for k in saved)
    rm = reward_model_from(run / "reward/model", load_tokenizer(run / "sft/model"))
    base = dict(sft.model.named_parameters())
    for n, p in unwrap(rm).model.named_parameters():
        if not _targeted(n):
            assert torch.equal(p, base[n]), n
    assert rm.score.weight.abs().sum() > 0  # the head trained from its zero start
    # Merged saves (sft, kto, grpo, rloo, online_dpo) are plain HF directories.
    for stage in ("kto", "grpo", "rloo", "online_dpo"):
        assert (run / stage / "model/config.json").is_file(), stage


def test_the_own_model_example_config_loads_and_is_the_readme_one():
    """configs/own_model.yaml (README's one-GPU example): every training stage with LoRA and
    bf16; the README shows the same settings."""
    from pathlib import Path

    from posttrain.config import load_pipeline

    root = Path(__file__).resolve().parents[1]
    pipe = load_pipeline(root / "configs/own_model.yaml")
    for spec in pipe.stages:
        assert spec.config.lora.enabled and spec.config.train.precision == "bf16", spec.name
    readme = (root / "README.md").read_text()
    body = [line for line in (root / "configs/own_model.yaml").read_text().splitlines()
            if line and not line.startswith("#")]  # fmt: skip
    assert all(line in readme for line in body)


def test_continued_pretraining_with_lora_and_bf16(run_tiny, tmp_path):
    """The pretrain stage on a model directory: adapters only (merged on save), bf16; a preset
    (random weights) with LoRA is an error naming the key."""
    from posttrain.models.load import load_model

    _, run = run_tiny(["world", "pretrain"])
    base_dir = run / "pretrain/model"
    cpt = {"cpt": {"kind": "pretrain", "model": str(base_dir), "seq_len": 32, "batch_size": 4,
                   "lora": LORA, "eval": {"n_per_family": 0},
                   "train": {"steps": 3, "warmup_steps": 1, "checkpoint_every": 0, "lr": 0.05,
                             "precision": "bf16"}}}  # fmt: skip
    report, run = run_tiny(["world", "pretrain", "cpt"], yaml.safe_dump(cpt))
    assert math.isfinite(report["stages"]["cpt"]["train/loss"])
    base = dict(load_model(base_dir).named_parameters())
    changed = {n for n, p in load_model(run / "cpt/model").named_parameters()
               if not torch.equal(p, base[n])}  # fmt: skip
    assert changed and all(_targeted(n) for n in changed)
    bad = {"pretrain": {"lora": LORA}}
    with pytest.raises(ValueError, match="pretrain.lora: toy-xs is a preset"):
        run_tiny(["world", "pretrain"], yaml.safe_dump(bad))
