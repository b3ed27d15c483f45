"""Next-token cross-entropy and per-token log-probs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL and the number of target tokens.

    logits: (B, T, V) for positions 0..T-1; labels: (B, T) already shifted so that labels[:, t]
    is the token that should follow position t, IGNORE_INDEX where there is no target.
    Returns (loss_sum (), n_targets ()).
    """
    B, T, V = logits.shape
    loss = F.cross_entropy(
        logits.reshape(B * T, V).float(),
        labels.reshape(B * T),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, (labels != IGNORE_INDEX).sum()


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[b, t] | prefix) for every position: (B, T, V), (B, T) -> (B, T).

    Positions with IGNORE_INDEX get 0 (gathered at index 0, then zeroed) so callers can sum
    under a mask without NaN leaking.
    """
    safe = labels.clamp(min=0)
    logps = (
        torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    )  # (B, T)
    return torch.where(labels == IGNORE_INDEX, torch.zeros_like(logps), logps)
