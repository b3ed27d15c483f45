"""Next-token cross-entropy, per-token log-probs, and the distillation loss."""

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


def distill_loss_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Knowledge distillation (Hinton et al. 2015) summed over N target positions:
    (1 - alpha) * CE(student, targets) + alpha * T^2 * KL(teacher_T || student_T), where _T is
    the softmax at temperature T; the T^2 keeps the soft term's gradient scale independent of T.
    (N, V), (N, V), (N,) -> (loss sum, {"kd/ce", "kd/kl"} sums, detached).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: the two models need the same vocabulary"
        )
    ce = F.cross_entropy(student_logits.float(), targets, reduction="sum")
    s_logp = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    t_logp = torch.log_softmax(teacher_logits.float().detach() / temperature, dim=-1)  # (N, V)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum() * temperature**2
    loss = (1.0 - alpha) * ce + alpha * kl
    return loss, {"kd/ce": ce.detach(), "kd/kl": kl.detach()}
