"""Held-out perplexity over a token stream, in non-overlapping windows."""

from __future__ import annotations

import math

import torch

from posttrain.ops.lm import lm_loss_sum


@torch.no_grad()
def perplexity(
    model, stream: torch.Tensor, seq_len: int, batch_size: int = 16, max_tokens: int | None = None
) -> dict:
    """exp(mean next-token NLL) over `stream` (1-D ids) cut into windows of seq_len+1 tokens."""
    device = next(model.parameters()).device
    if max_tokens is not None:
        stream = stream[: max_tokens + 1]
    n_windows = (len(stream) - 1) // seq_len
    if n_windows == 0:
        raise ValueError(f"held-out text too short: {len(stream)} tokens for seq_len {seq_len}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, n_windows, batch_size):
        idx = torch.arange(start, min(start + batch_size, n_windows))
        rows = torch.stack(
            [stream[i * seq_len : i * seq_len + seq_len + 1] for i in idx.tolist()]
        ).to(device)
        logits = model(input_ids=rows[:, :-1], use_cache=False).logits  # (B, T, V)
        loss, n = lm_loss_sum(logits, rows[:, 1:])
        total += loss.item()
        count += n.item()
    model.train(was_training)
    nll = total / count
    return {"eval/nll": nll, "eval/perplexity": math.exp(nll), "eval/tokens": count}
