"""Forward passes that apply the LM head only where a loss or log-prob is needed.

On a small model the LM head and log-softmax over the vocabulary dominate a training step; on
SFT data most positions are prompt or padding. For architectures whose logits are exactly
`lm_head(final hidden state)` we run the decoder, gather the hidden states at the target
positions, and project only those. Other models (logit soft-capping, logit scaling) fall back
to the full forward, then gather.
"""

from __future__ import annotations

import torch

from posttrain.ops.lm import IGNORE_INDEX

# Causal-LM types whose logits are the plain lm_head projection of the decoder output.
_PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "smollm3"}


def plain_head(model) -> bool:
    cfg = model.config
    plain = getattr(cfg, "model_type", None) in _PLAIN_HEAD
    capped = getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)
    return plain and not capped and hasattr(model, "get_decoder")


def target_logits(
    model, input_ids, labels, attention_mask=None, position_ids=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that have a target, and those targets.

    input_ids, labels, attention_mask, position_ids: (B, T). Returns (N, V) logits and (N,) targets,
    N = number of labels != IGNORE_INDEX, in row-major order.
    """
    keep = labels != IGNORE_INDEX  # (B, T)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    if plain_head(model):
        hidden = model.get_decoder()(**kwargs).last_hidden_state  # (B, T, C)
        logits = model.get_output_embeddings()(hidden[keep])  # (N, V)
    else:
        logits = model(**kwargs).logits[keep]  # (N, V)
    return logits, labels[keep]
