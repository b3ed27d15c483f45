"""Forward passes that apply the LM head only where a loss or log-prob is needed.

On a small model the LM head and log-softmax over the vocabulary dominate a training step; on
SFT data most positions are prompt or padding. For architectures whose logits are exactly
`lm_head(final hidden state)` we run the decoder, gather the hidden states at the target
positions, and project only those. Other models (logit soft-capping, logit scaling) fall back
to the full forward, then gather.

Where a loss needs only the log-probs of the targets (SFT's cross-entropy, DPO's and KTO's
sequence log-probs, the RL stages' token log-probs), `target_logps` also never builds the
(N, V) logits: a plain nn.Linear head goes through `ops.chunked_head`, a chunk of rows at a
time. `target_logits` stays for the callers that need the logits themselves (distillation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.ops.chunked_head import chunked_token_logps
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
    kwargs = _kwargs(input_ids, attention_mask, position_ids)
    if plain_head(model):
        hidden = model.get_decoder()(**kwargs).last_hidden_state  # (B, T, C)
        logits = model.get_output_embeddings()(hidden[keep])  # (N, V)
    else:
        logits = model(**kwargs).logits[keep]  # (N, V)
    return logits, labels[keep]


def _kwargs(input_ids, attention_mask, position_ids) -> dict:
    return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False)  # fmt: skip


def linear_head(model) -> torch.nn.Linear | None:
    """The model's LM head when it is exactly an nn.Linear (its weight and bias are all it
    computes with), else None: a LoRA or other peft wrapper, a quantised Linear subclass. Under
    `lora.BaseView` (adapters off) a plain head is the same module with or without adapters."""
    from posttrain.models.lora import _OffModule

    head = model.get_output_embeddings()
    if isinstance(head, _OffModule):
        head = head.module
    return head if type(head) is torch.nn.Linear else None


def target_logps(
    model, input_ids, labels, attention_mask=None, position_ids=None, temperature: float = 1.0,
    with_entropy: bool = False, chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:  # fmt: skip
    """log softmax(logits / T) at the targets, the entropies of those distributions when asked
    (without gradient: a metric), and the targets.

    input_ids, labels, attention_mask, position_ids: (B, T). Returns (N,) float32 logp, (N,)
    float32 entropy or None, (N,) targets, in `target_logits`' order. A plain-head model with an
    nn.Linear head never holds more than `chunk` rows of logits (`ops.chunked_head`, whose
    default is about 256 MB of float32 logits); any other model takes the full (N, V) path.
    """
    head = linear_head(model) if plain_head(model) else None
    if head is None:
        logits, targets = target_logits(model, input_ids, labels, attention_mask, position_ids)
        z = logits.float() if temperature == 1.0 else logits.float() / temperature  # (N, V)
        if not with_entropy:
            return -F.cross_entropy(z, targets, reduction="none"), None, targets
        lsm = torch.log_softmax(z, -1)  # (N, V), once for both
        entropy = -(lsm.exp() * lsm).sum(-1).detach()
        return lsm.gather(-1, targets[:, None])[:, 0], entropy, targets
    keep = labels != IGNORE_INDEX  # (B, T)
    out = model.get_decoder()(**_kwargs(input_ids, attention_mask, position_ids))
    hidden, targets = out.last_hidden_state[keep], labels[keep]  # (N, C), (N,)
    logp, entropy = chunked_token_logps(hidden, head, targets, temperature, with_entropy, chunk)
    return logp, entropy, targets
