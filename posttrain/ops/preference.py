"""Preference-learning losses (DPO family, SimPO, ORPO; KTO on unpaired feedback) and
reward-model losses (Bradley-Terry, Plackett-Luce). Pure torch.

Conventions:
- Inputs to the DPO-family losses are per-sequence log-probs, one entry per pair: (B,).
  "policy"/"ref" are summed response log-probs (`sequence_logps`), except for SimPO and ORPO
  (REFERENCE_FREE), which take length-normalised ones (`sequence_mean_logps`).
- Each pairwise loss returns `(per_pair_loss (B,), metrics)`; the caller reduces (mean).
  Metrics are detached 0-dim tensors with namespaced keys (`rewards/...`, `logps/...`).
- Logs of sigmoids use `F.logsigmoid`, which is stable for large |x| (log(sigmoid(x)) is
  -inf for x < -104 in float32).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from posttrain.ops.reduce import masked_mean, masked_sum

Metrics = dict[str, torch.Tensor]
PairLoss = Callable[..., tuple[torch.Tensor, Metrics]]


# --- sequence log-probs ----------------------------------------------------------------------


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probs of the response tokens: (B, T), (B, T) -> (B,).

    Padded positions (mask 0) are replaced, not multiplied, so NaN/inf there never leaks into
    the sum or its gradient.
    """
    return masked_sum(token_logps, mask, dim=-1)  # (B,)


def sequence_mean_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Length-normalised log-probs (SimPO's implicit reward / beta): (B, T) -> (B,); 0 where the
    mask is empty."""
    return masked_mean(token_logps, mask, dim=-1)  # (B,)


def kl_from_logps(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Per-sequence estimate of KL(policy || ref): masked sum of (policy - ref) token log-probs,
    the k1 estimator (unbiased when tokens are sampled from the policy; can be negative for a
    single sequence). (B, T) x3 -> (B,). Logged as `kl/ref`."""
    return masked_sum(policy_logps - ref_logps, mask, dim=-1)  # (B,)


# --- metrics and checks ----------------------------------------------------------------------


def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> Metrics:
    """Means of the implicit rewards (B,) and the fraction of pairs ranked right (strict >,
    so a tie counts as wrong)."""
    chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margin": (chosen - rejected).mean(),
        "rewards/accuracy": (chosen > rejected).float().mean(),
    }


def _check_beta(beta: float) -> None:
    if not beta > 0:  # also rejects NaN
        raise ValueError(f"beta must be > 0, got {beta}")


def _log_ratios(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    loss_name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pi_c - r_c, pi_r - r_r), each (B,)."""
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"loss {loss_name!r} needs ref_chosen and ref_rejected (got None)")
    return policy_chosen - ref_chosen, policy_rejected - ref_rejected


def _ref_based_metrics(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_ratio: torch.Tensor,
    rejected_ratio: torch.Tensor,
    beta: float,
) -> Metrics:
    metrics = _reward_metrics(beta * chosen_ratio, beta * rejected_ratio)
    metrics["logps/chosen"] = policy_chosen.detach().mean()
    metrics["logps/rejected"] = policy_rejected.detach().mean()
    return metrics


# --- DPO family ------------------------------------------------------------------------------


def dpo_sigmoid_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    *,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """DPO (Rafailov et al. 2023): -log sigmoid(h), h = beta * [(pi_c - r_c) - (pi_r - r_r)].

    With label_smoothing eps in [0, 0.5] (conservative DPO, Mitchell 2023; the label is flipped
    with probability eps): -(1 - eps) log sigmoid(h) - eps log sigmoid(-h). eps = 0.5 makes the
    loss symmetric in h, so it carries no preference signal.
    """
    _check_beta(beta)
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    chosen_ratio, rejected_ratio = _log_ratios(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, "sigmoid"
    )
    h = beta * (chosen_ratio - rejected_ratio)  # (B,)
    loss = -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    metrics = _ref_based_metrics(policy_chosen, policy_rejected, chosen_ratio, rejected_ratio, beta)
    return loss, metrics


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, Metrics]:
    """IPO (Azar et al. 2023, eq. 17 with tau = beta): (rho - 1/(2 beta))^2 with the *un-scaled*
    log-ratio difference rho = (pi_c - r_c) - (pi_r - r_r); minimised at rho = 1/(2 beta), so a
    smaller beta asks for a larger margin. Rewards in the metrics are still beta * log-ratio."""
    _check_beta(beta)
    chosen_ratio, rejected_ratio = _log_ratios(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, "ipo"
    )
    rho = chosen_ratio - rejected_ratio  # (B,)
    loss = (rho - 1.0 / (2.0 * beta)) ** 2
    metrics = _ref_based_metrics(policy_chosen, policy_rejected, chosen_ratio, rejected_ratio, beta)
    return loss, metrics


def slic_hinge_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, Metrics]:
    """SLiC hinge (Zhao et al. 2023), on the DPO margin as in TRL's "hinge":
    max(0, 1 - h), h = beta * [(pi_c - r_c) - (pi_r - r_r)]; zero loss and gradient once h >= 1."""
    _check_beta(beta)
    chosen_ratio, rejected_ratio = _log_ratios(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, "hinge"
    )
    h = beta * (chosen_ratio - rejected_ratio)  # (B,)
    loss = torch.relu(1.0 - h)
    metrics = _ref_based_metrics(policy_chosen, policy_rejected, chosen_ratio, rejected_ratio, beta)
    return loss, metrics


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    beta: float = 2.0,
    *,
    gamma: float = 0.5,
) -> tuple[torch.Tensor, Metrics]:
    """SimPO (Meng et al. 2024, eq. 6), reference-free:
    -log sigmoid(beta * (pi_c - pi_r) - gamma), pi = *length-normalised* log-probs
    (`sequence_mean_logps`). gamma is the paper's target reward margin, in reward units and
    NOT scaled by beta (TRL's `simpo_gamma` is the same quantity; SimPO's code exposes
    gamma / beta as `gamma_beta_ratio`). The ref arguments are accepted for a uniform call
    signature and ignored. Rewards in the metrics are beta * pi; gamma does not enter them.
    """
    _check_beta(beta)
    chosen_rewards = beta * policy_chosen  # (B,)
    rejected_rewards = beta * policy_rejected  # (B,)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return loss, _reward_metrics(chosen_rewards, rejected_rewards)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x (Maechler 2012)."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None = None,
    ref_rejected: torch.Tensor | None = None,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """ORPO (Hong et al. 2024, eqs. 6-7), reference-free, SFT and preference in one loss:
    -pi_c - beta * log sigmoid(log odds(pi_c) - log odds(pi_r)), with pi the *length-normalised*
    log-prob (`sequence_mean_logps`: the paper's P = exp(mean token log-prob)), odds(p) =
    p / (1 - p), and -pi_c the chosen response's per-token NLL. beta is the paper's lambda (TRL
    calls it beta too). A probability of exactly 1 has infinite odds; pi is capped at -1e-6.
    The ref arguments are accepted for a uniform call signature and ignored. Rewards in the
    metrics are beta * pi, as TRL logs them.
    """
    _check_beta(beta)
    cap = torch.tensor(-1e-6, dtype=policy_chosen.dtype, device=policy_chosen.device)
    pc, pr = torch.minimum(policy_chosen, cap), torch.minimum(policy_rejected, cap)
    log_odds = (pc - _log1mexp(pc)) - (pr - _log1mexp(pr))  # (B,)
    ratio_loss = -F.logsigmoid(log_odds)  # (B,)
    nll = -policy_chosen  # (B,)
    metrics = _reward_metrics(beta * policy_chosen, beta * policy_rejected)
    metrics |= {"orpo/nll": nll.detach().mean(), "orpo/log_odds_ratio": log_odds.detach().mean(),
                "orpo/ratio_loss": ratio_loss.detach().mean()}  # fmt: skip
    return nll + beta * ratio_loss, metrics


def kto_loss(
    policy: torch.Tensor,
    ref: torch.Tensor,
    desirable: torch.Tensor,
    kl_ref_point: torch.Tensor | float,
    beta: float,
    *,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """KTO (Ethayarajh et al. 2024, eq. 8; TRL's `kto` loss) on unpaired judgements.

    r = pi - ref, the summed log-ratio of each reply (B,); z0 = `kl_ref_point`, an estimate of
    KL(policy || ref) that carries no gradient and is clamped at 0. A desirable reply costs
    w_D (1 - sigmoid(beta (r - z0))), an undesirable one w_U (1 - sigmoid(beta (z0 - r))): each
    is pushed to the right side of the reference point, with a saturating value function.
    Metrics: rewards/mean (beta r), rewards/signed (beta r, negated for undesirable replies:
    rising when training works), rewards/accuracy (replies on their right side of z0),
    kl/ref_point (z0) and kto/desirable_frac.
    """
    _check_beta(beta)
    d = desirable.bool()
    z = (
        torch.as_tensor(kl_ref_point, dtype=policy.dtype, device=policy.device)
        .detach()
        .clamp(min=0)
    )
    r = policy - ref  # (B,)
    loss = torch.where(d, desirable_weight * (1 - torch.sigmoid(beta * (r - z))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z - r))))  # fmt: skip
    rd = (beta * r).detach()
    sign = d.to(rd.dtype) * 2 - 1
    metrics = {
        "rewards/mean": rd.mean(),
        "rewards/signed": (rd * sign).mean(),
        "rewards/accuracy": ((r.detach() - z) * sign > 0).to(rd.dtype).mean(),
        "kl/ref_point": z.expand_as(rd).mean(),
        "kto/desirable_frac": d.to(rd.dtype).mean(),
    }
    return loss, metrics


DPO_LOSSES: dict[str, PairLoss] = {
    "sigmoid": dpo_sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": slic_hinge_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}
# Losses without a reference model, on length-normalised log-probs.
REFERENCE_FREE = ("simpo", "orpo")


def dpo_loss(
    name: str,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    beta: float,
    **kw: float,
) -> tuple[torch.Tensor, Metrics]:
    """Dispatch to `DPO_LOSSES[name]`; extra keywords (label_smoothing, gamma) go to that loss,
    and one it does not take is a TypeError naming the keyword."""
    if name not in DPO_LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; known: {sorted(DPO_LOSSES)}")
    return DPO_LOSSES[name](policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, **kw)


# --- reward-model losses ---------------------------------------------------------------------


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, Metrics]:
    """Bradley-Terry reward-model loss: -log sigmoid(r_c - r_r - m), (B,) -> (B,).

    `margin` m (scalar or (B,)) is optional, as in Llama 2's RM (a larger m for pairs rated
    "significantly better"). Metrics use the raw difference r_c - r_r, without m.
    """
    diff = r_chosen - r_rejected  # (B,)
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits)
    return loss, _reward_metrics(r_chosen, r_rejected)


def plackett_luce_loss(
    rewards: torch.Tensor, order: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Negative log-likelihood of a full ranking under Plackett-Luce, (B, K) -> (B,):

        sum_k [ -r_{o_k} + logsumexp(r_{o_k}, ..., r_{o_K}) ]

    rewards: (B, K) scores of K candidates. order: (B, K) long, a permutation of 0..K-1 per
    row, best first. mask: (B, K), aligned with `rewards` (candidate-wise, not rank-wise), true
    for real candidates; padded candidates may sit anywhere in `order` and may hold NaN/inf:
    they are dropped from every term, so the result is the NLL of the valid candidates in the
    order given. With K = 2 this is Bradley-Terry. Ties are not supported: expand a tied
    ranking into the strict rankings it allows before calling.
    """
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    K = rewards.shape[-1]
    ranked = rewards.gather(-1, order)  # (B, K) scores, best first
    valid = mask.bool().gather(-1, order)  # (B, K)
    neg_inf = torch.full((), float("-inf"), dtype=rewards.dtype, device=rewards.device)
    # suffix[k, j]: j >= k, i.e. candidate at rank j is still in the pool when picking rank k.
    suffix = torch.ones(K, K, dtype=torch.bool, device=rewards.device).triu()  # (K, K)
    pool = suffix & valid.unsqueeze(-2)  # (B, K, K)
    # where (not multiply) keeps NaN padding out of the value and the gradient.
    scores = torch.where(pool, ranked.unsqueeze(-2), neg_inf)  # (B, K, K)
    log_norm = torch.logsumexp(scores, dim=-1)  # (B, K); -inf only where rank k is padding
    return masked_sum(log_norm - ranked, valid, dim=-1)  # (B,)
