"""Tiny Llama-architecture presets, built from scratch (no hub download)."""

from __future__ import annotations

# Parameter counts with a 1,024-token vocabulary and tied embeddings:
#   toy-xxs ~ 0.26M, toy-xs ~ 0.9M, toy-s ~ 6.6M, toy-m ~ 25M.
PRESETS: dict[str, dict] = {
    "toy-xxs": dict(  # the student of configs/toy_distill.yaml
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=176
    ),
    "toy-xs": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=352
    ),
    "toy-s": dict(
        hidden_size=256, num_hidden_layers=8, num_attention_heads=8, intermediate_size=688
    ),
    "toy-m": dict(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376
    ),
}


def build_model(preset: str, tokenizer, max_position_embeddings: int = 512, seed: int = 0):
    """A fresh `LlamaForCausalLM` from a preset, sized to `tokenizer`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known: {sorted(PRESETS)}")
    p = PRESETS[preset]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=p["num_attention_heads"],
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **p,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
