"""RL ops for policy-gradient post-training (PPO, GRPO, RLOO, GSPO, CISPO, REINFORCE++, DAPO's
overlong penalty). Pure torch.

Conventions:
- Token tensors are (B, T) over response tokens, with `mask` (B, T) (bool or 0/1) true on valid
  tokens. Any mask works (right- or left-padded, or with gaps): masked-out positions are
  replaced by 0 with `torch.where` *before* any arithmetic, so whatever they hold (NaN, inf,
  1e9) reaches neither a value nor a gradient (`where` after a NaN computation would still send
  0 * NaN = NaN back through that computation). Per-token outputs are exactly 0 there.
- Losses return `(per_token_loss (B, T), metrics)`; `reduce_loss` does the reduction. Metrics
  are detached 0-dim tensors with namespaced keys (`policy/...`, `value/...`), computed over
  valid tokens; an empty mask gives 0 for each (masked_mean's convention).
- Group tensors (GRPO, RLOO) are (G, K): G prompts, K sampled responses each, no mask.
- Nothing is detached on the way in: pass detached advantages / old log-probs / values where
  they must not carry gradient (`gae`'s outputs included).
"""

from __future__ import annotations

from typing import Literal

import torch

from posttrain.ops.reduce import masked_mean, masked_sum

__all__ = [
    "cispo_policy_loss",
    "entropy_from_logits",
    "explained_variance",
    "frac_zero_std",
    "gae",
    "group_advantages",
    "gspo_policy_loss",
    "kl_estimate",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "ppo_policy_loss",
    "reduce_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "soft_overlong_penalty",
    "value_loss",
]

Metrics = dict[str, torch.Tensor]
KLKind = Literal["k1", "k2", "k3"]
ReduceMode = Literal["token_mean", "seq_mean", "constant"]


def _clean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with masked-out positions replaced by 0 (value and gradient)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _masked_var(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked (mean, population variance) over all valid entries; x must already be clean."""
    mean = masked_mean(x, mask)
    return mean, masked_mean((x - mean) ** 2, mask)


# --- KL to the reference ---------------------------------------------------------------------


def kl_estimate(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    kind: KLKind,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from tokens sampled from the policy (Schulman
    2020, "Approximating KL divergence"), with logr = ref_logps - logps:

        k1 = -logr                 unbiased, can be negative
        k2 = 0.5 * logr**2         biased (low bias when the policies are close), >= 0
        k3 = exp(logr) - 1 - logr  unbiased, >= 0 (exp(x) >= 1 + x)

    (B, T) x2 -> (B, T); 0 where `mask` (optional) is false.
    """
    if kind not in ("k1", "k2", "k3"):
        raise ValueError(f"kind must be 'k1', 'k2' or 'k3', got {kind!r}")
    if mask is not None:
        mask = mask.bool()
        logps, ref_logps = _clean(logps, mask), _clean(ref_logps, mask)  # logr = 0 -> k = 0
    logr = ref_logps - logps  # (B, T)
    if kind == "k1":
        return -logr
    if kind == "k2":
        return 0.5 * logr**2
    return torch.expm1(logr) - logr  # expm1: accurate for small logr


# --- advantages ------------------------------------------------------------------------------


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and var (population, unbiased=False) over all
    valid entries of the batch; (B, T) -> (B, T), 0 at masked positions. With
    shift_mean=False the mean is added back (TRL's `masked_whiten(..., shift_mean=False)`:
    rescaled to unit std, mean kept). TRL's var is Bessel-corrected; ours is not."""
    mask = mask.bool()
    x = _clean(values, mask)
    mean, var = _masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _clean(whitened, mask)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's valid tokens:

        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}

    where t+1 is the row's next *valid* token (masked-out positions are skipped, as in verl), and
    V = A = 0 after the last valid token (the episode ends with the response: bootstrap 0).
    (B, T) x3 -> (advantages (B, T), returns = advantages + values (B, T)), 0 where masked.
    gamma = lam = 1: A_t = reward-to-go - V_t. lam = 0: A_t = delta_t.
    """
    mask = mask.bool()
    rewards, values = _clean(rewards, mask), _clean(values, mask)
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    next_value = rewards.new_zeros(rewards.shape[0])  # (B,)
    next_adv = rewards.new_zeros(rewards.shape[0])  # (B,)
    advantages = []
    for t in reversed(range(rewards.shape[1])):
        valid = mask[:, t]  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv  # (B,)
        advantages.append(torch.where(valid, adv, zero))
        # A masked position passes the carry through unchanged.
        next_value = torch.where(valid, values[:, t], next_value)
        next_adv = torch.where(valid, adv, next_adv)
    adv = torch.stack(advantages[::-1], dim=1)  # (B, T)
    return adv, _clean(adv + values, mask)


def _constant_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(G, K) -> (G,) bool: every reward in the group equal (exactly; zero std)."""
    return (rewards == rewards[..., :1]).all(dim=-1)


def group_advantages(
    rewards: torch.Tensor, std_normalize: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO advantages (Shao et al. 2024): (r - mean) / (std + eps) within each group, or
    r - mean with std_normalize=False (Dr. GRPO, Liu et al. 2025). (G, K) -> (G, K).

    std is the *population* std (unbiased=False), so K = 1 is defined (advantage 0) and the
    advantages of a group have std ~1. TRL and verl use torch's Bessel-corrected std, which
    scales these by ~sqrt((K - 1) / K). A group with all rewards equal gets exactly 0 (no
    rounding residue from the mean, never NaN).
    """
    mean = rewards.mean(dim=-1, keepdim=True)  # (G, 1)
    adv = rewards - mean
    if std_normalize:
        adv = adv / (rewards.std(dim=-1, unbiased=False, keepdim=True) + eps)
    return torch.where(_constant_groups(rewards).unsqueeze(-1), torch.zeros_like(adv), adv)


def frac_zero_std(rewards: torch.Tensor) -> torch.Tensor:
    """Fraction of groups (G, K) whose rewards are all equal, hence carry no GRPO/RLOO signal;
    detached 0-dim tensor."""
    return _constant_groups(rewards.detach()).float().mean()


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024):
    A_i = r_i - mean_{j != i} r_j = K / (K - 1) * (r_i - mean). (G, K) -> (G, K), K >= 2.
    A group with all rewards equal gets exactly 0."""
    K = rewards.shape[-1]
    if K < 2:
        raise ValueError(f"rloo_advantages needs K >= 2 responses per group, got K={K}")
    others = (rewards.sum(dim=-1, keepdim=True) - rewards) / (K - 1)  # (G, K)
    adv = rewards - others
    return torch.where(_constant_groups(rewards).unsqueeze(-1), torch.zeros_like(adv), adv)


def reinforce_pp_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, whiten=masked_whiten
) -> torch.Tensor:
    """REINFORCE++-baseline (Hu et al. 2025, 2501.03262; OpenRLHF's `reinforce_baseline`):
    each response's reward minus its group's mean, on every one of its tokens, then whitened
    over all valid tokens of the batch:

        a_i = r_i - mean_group(r),   A_it = (a_i - mean_tok(a)) / sqrt(var_tok(a) + 1e-8)

    mean_tok and var_tok (population) run over the batch's valid tokens, as OpenRLHF's do, so a
    long response weighs more in them, and a group whose rewards are all equal gets
    -mean_tok(a) / std_tok(a), not 0. Unlike GRPO there is no per-group std (a group's scale is
    the batch's). `whiten(x, mask)` does the last step (the stage passes one whose statistics
    span every rank). rewards (G, K), mask (G*K, T), rows group by group -> (G*K, T), 0 where
    masked. (The paper's per-token KL-to-go in the return is not included: use a KL loss.)
    """
    mask = mask.bool()
    centred = group_advantages(rewards, std_normalize=False).reshape(-1)  # (G*K,)
    return whiten(centred[:, None].expand(mask.shape), mask)


def soft_overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, 2503.14476, eq. 13), added to the
    reward of a response of L tokens, with L_max = max_length and L_cache = buffer:

        0                               if L <= L_max - L_cache
        ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max   (0 down to -1)
        -1                              if L > L_max

    (B,) -> (B,) float. Needs 0 < buffer <= max_length."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"need 0 < buffer <= max_length, got {buffer} and {max_length}")
    L = lengths.to(torch.float64)
    start = max_length - buffer  # the expected length: no penalty up to it
    ramp = (start - L) / buffer
    out = torch.where(L <= start, torch.zeros_like(L), torch.where(L <= max_length, ramp, -1.0))
    return out.to(torch.get_default_dtype())


# --- losses ----------------------------------------------------------------------------------


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    dual_clip: float | None = None,
    clip_eps_high: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017), per token, to minimise:

        ratio = exp(logps - old_logps)
        loss  = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)

    eps_high = `clip_eps_high`, or eps when None; a larger one is DAPO's clip-higher (Yu et al.
    2025): low-probability tokens with positive advantage may grow further, against entropy
    collapse.

    dual_clip c > 1 (Ye et al. 2020): where A < 0, loss = min(loss, -c * A), i.e. capped at
    c * |A| (zero gradient there). (B, T) x3 -> ((B, T), metrics), 0 where masked.

    Metrics over valid tokens: `policy/clip_frac` (clipped term strictly larger, i.e. the clip
    branch is taken: its gradient is 0), `policy/dual_clip_frac` (cap taken; 0 without
    dual_clip), `policy/approx_kl` (mean of (ratio - 1) - log ratio: k3 estimate of
    KL(old || new) from tokens sampled by the old policy), `policy/ratio_mean`, `_max`, `_min`.
    """
    if not clip_eps >= 0:
        raise ValueError(f"clip_eps must be >= 0, got {clip_eps}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    if not high >= 0:
        raise ValueError(f"clip_eps_high must be >= 0, got {clip_eps_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    mask = mask.bool()
    log_ratio = _clean(logps, mask) - _clean(old_logps, mask)  # (B, T), 0 where masked
    A = _clean(advantages, mask)
    ratio = torch.exp(log_ratio)
    unclipped = -ratio * A
    clipped = -torch.clamp(ratio, 1.0 - clip_eps, 1.0 + high) * A
    loss = torch.maximum(unclipped, clipped)  # = -min(ratio A, clip(ratio) A)
    capped = torch.zeros_like(mask)
    if dual_clip is not None:
        cap = -dual_clip * A
        capped = (A < 0) & (loss > cap)
        loss = torch.where(capped, cap, loss)
    loss = _clean(loss, mask)

    r = ratio.detach()
    metrics = {
        "policy/clip_frac": masked_mean((clipped.detach() > unclipped.detach()).to(r.dtype), mask),
        "policy/dual_clip_frac": masked_mean(capped.to(r.dtype), mask),
        "policy/approx_kl": _approx_kl(log_ratio, mask),
    }
    return loss, metrics | _ratio_stats(r, mask)


def _approx_kl(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid tokens of (ratio - 1) - log ratio (k3 estimate of KL(old || new)),
    detached; log_ratio must be clean."""
    lr = log_ratio.detach()
    return masked_mean((torch.exp(lr) - 1.0) - lr, mask)


def _ratio_stats(r: torch.Tensor, mask: torch.Tensor) -> Metrics:
    """policy/ratio_mean, _max, _min of detached ratios r over `mask` (0 each if it is empty)."""
    neg_inf = torch.full((), float("-inf"), dtype=r.dtype, device=r.device)
    any_valid = mask.any()
    ratio_max = torch.where(mask, r, neg_inf).max()
    ratio_min = -torch.where(mask, -r, neg_inf).max()
    return {
        "policy/ratio_mean": masked_mean(r, mask),
        "policy/ratio_max": torch.where(any_valid, ratio_max, 0.0),
        "policy/ratio_min": torch.where(any_valid, ratio_min, 0.0),
    }


def _ratio_inputs(logps, old_logps, advantages, mask, clip_eps: float, clip_eps_high: float):
    """(bool mask, log-probs, log-ratios to the old policy, advantages), each (B, T) and 0 where
    masked; the clip ranges checked."""
    if not (clip_eps >= 0 and clip_eps_high >= 0):
        raise ValueError(f"clip ranges must be >= 0, got {clip_eps} and {clip_eps_high}")
    mask = mask.bool()
    lp = _clean(logps, mask)
    return mask, lp, lp - _clean(old_logps, mask), _clean(advantages, mask)


def gspo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 3e-4,
    clip_eps_high: float = 4e-4,
) -> tuple[torch.Tensor, Metrics]:
    """GSPO, Group Sequence Policy Optimization (Zheng et al. 2025, 2507.18071), per token, to
    minimise. The importance ratio is the sequence's, length-normalised (eq. 7):

        s_i = exp((1 / |y_i|) * sum_t (logps_it - old_logps_it))

    and clipping is of the whole sequence, with the paper's much smaller ranges (3e-4 / 4e-4).
    Per token, in the GSPO-token form (eq. 13), s_it = sg(s_i) * exp(logps_it - sg(logps_it)),
    whose value is s_i and whose gradient is s_i * grad logps_it:

        loss_it = -min(s_it * A_it, clip(s_it, 1 - eps, 1 + eps_high) * A_it)

    With one advantage per sequence (A_it = A_i, as GRPO, RLOO and REINFORCE++ give) and
    reduce_loss "seq_mean" this is GSPO's objective -1/G sum_i min(s_i A_i, clip(s_i) A_i),
    whose gradient where s_i is not clipped is -1/G sum_i A_i s_i mean_t(grad logps_it)
    (eq. 10); a clipped sequence gives 0 on every token. (B, T) x3 -> ((B, T), metrics), 0
    where masked.

    Metrics: `policy/clip_frac` (valid tokens whose sequence takes the clip branch: the paper's
    "fraction of clipped tokens"), `policy/approx_kl` (token-level, as PPO's), and
    `policy/ratio_mean`, `_max`, `_min` of the sequence ratios s_i (rows with a valid token).
    """
    mask, lp, log_ratio, A = _ratio_inputs(
        logps, old_logps, advantages, mask, clip_eps, clip_eps_high
    )
    seq_log_ratio = masked_mean(log_ratio, mask, dim=-1)  # (B,) log s_i; 0 for an empty row
    # value log s_i on every token, gradient grad logps_it (lp - lp.detach() is exactly 0)
    s = torch.exp(lp - lp.detach() + seq_log_ratio.detach().unsqueeze(-1))  # (B, T)
    unclipped = -s * A
    clipped = -torch.clamp(s, 1.0 - clip_eps, 1.0 + clip_eps_high) * A
    loss = _clean(torch.maximum(unclipped, clipped), mask)
    taken = (clipped.detach() > unclipped.detach()).to(s.dtype)
    metrics = {
        "policy/clip_frac": masked_mean(taken, mask),
        "policy/approx_kl": _approx_kl(log_ratio, mask),
    }
    return loss, metrics | _ratio_stats(seq_log_ratio.detach().exp(), mask.any(dim=-1))


def cispo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 1.0,
    clip_eps_high: float = 0.28,
) -> tuple[torch.Tensor, Metrics]:
    """CISPO, clipped importance-sampling-weight REINFORCE (MiniMax-M1, 2506.13585, eq. 4),
    per token, to minimise:

        ratio = exp(logps - old_logps)
        loss  = -sg(clip(ratio, 1 - eps, 1 + eps_high)) * A * logps

    sg is stop-gradient: the weight carries no gradient, so the gradient is
    -clip(ratio) * A * grad logps on *every* token. PPO's clip instead zeroes the gradient of a
    token whose ratio left the range in the direction A favours; inside the range both have
    gradient -ratio * A * grad logps. The paper puts no lower bound on the weight: eps = 1
    (bound 0; weights are positive anyway); 0.28 above is the value Trinity-RFT defaults to
    (the paper tunes only eps_high). (B, T) x3 -> ((B, T), metrics), 0 where masked.

    Metrics: `policy/clip_frac` (valid tokens whose weight was clipped, on either side, whatever
    the sign of A), `policy/approx_kl`, `policy/ratio_mean`, `_max`, `_min`, as PPO's.
    """
    mask, lp, log_ratio, A = _ratio_inputs(
        logps, old_logps, advantages, mask, clip_eps, clip_eps_high
    )
    r = torch.exp(log_ratio).detach()
    weight = torch.clamp(r, 1.0 - clip_eps, 1.0 + clip_eps_high)  # detached: no gradient
    loss = _clean(-weight * A * lp, mask)
    metrics = {
        "policy/clip_frac": masked_mean((weight != r).to(r.dtype), mask),
        "policy/approx_kl": _approx_kl(log_ratio, mask),
    }
    return loss, metrics | _ratio_stats(r, mask)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss (PPO as in OpenAI baselines / TRL), per token:

        0.5 * max((v - R)^2, (clip(v, old - eps, old + eps) - R)^2)

    or 0.5 * (v - R)^2 with clip_eps=None. (B, T) x3 -> ((B, T), metrics), 0 where masked.
    Metric `value/clip_frac`: fraction of valid tokens where the clipped term is strictly larger
    (so taken, with zero gradient when v is outside the clip range).
    """
    mask = mask.bool()
    v, old, R = _clean(values, mask), _clean(old_values, mask), _clean(returns, mask)
    unclipped = (v - R) ** 2
    if clip_eps is None:
        loss, clipped_taken = unclipped, torch.zeros_like(mask)
    else:
        if not clip_eps >= 0:
            raise ValueError(f"clip_eps must be >= 0 or None, got {clip_eps}")
        v_clipped = old + torch.clamp(v - old, -clip_eps, clip_eps)
        clipped = (v_clipped - R) ** 2
        loss, clipped_taken = torch.maximum(unclipped, clipped), clipped > unclipped
    metrics = {"value/clip_frac": masked_mean(clipped_taken.to(loss.dtype), mask)}
    return _clean(0.5 * loss, mask), metrics


# --- reduction and diagnostics ---------------------------------------------------------------


def reduce_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: ReduceMode,
    constant: float | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar over valid tokens:

    - "token_mean": masked sum / number of valid tokens in the batch (DAPO; 0 if none);
    - "seq_mean": mean over sequences of each one's masked token mean (GRPO paper); sequences
      with no valid token are skipped (0 if all are empty);
    - "constant": masked sum / `constant` (Dr. GRPO, e.g. max response length * B), which does
      not depend on the lengths in the batch.
    """
    mask = mask.bool()
    if mode == "token_mean":
        return masked_mean(per_token, mask)
    if mode == "seq_mean":
        per_seq = masked_mean(per_token, mask, dim=-1)  # (B,)
        return masked_mean(per_seq, mask.any(dim=-1))
    if mode == "constant":
        if constant is None or not constant > 0:
            raise ValueError(f"mode 'constant' needs constant > 0, got {constant}")
        return masked_sum(per_token, mask) / constant
    raise ValueError(f"mode must be 'token_mean', 'seq_mean' or 'constant', got {mode!r}")


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of softmax(logits) per position, via log_softmax (stable), in float32 or wider:
    (..., V) -> (...). Logits of -inf (banned tokens) contribute 0, with finite gradients.
    With `mask` (...), masked-out positions give 0 whatever their logits hold."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if mask is not None:
        mask = mask.bool()
        x = _clean(x, mask.unsqueeze(-1))
    logp = torch.log_softmax(x, dim=-1)  # (..., V)
    safe_logp = torch.where(torch.isneginf(logp), torch.zeros_like(logp), logp)
    entropy = -(logp.exp() * safe_logp).sum(dim=-1)  # (...)
    return entropy if mask is None else _clean(entropy, mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] over valid tokens (population variances): 1 for
    perfect values, 0 for the constant mean(returns), negative when worse than that. Returns
    0.0 (not NaN) when Var[returns] == 0 or the mask is empty."""
    mask = mask.bool()
    v = _clean(values.detach().double(), mask)
    R = _clean(returns.detach().double(), mask)
    _, var_r = _masked_var(R, mask)
    _, var_err = _masked_var(_clean(R - v, mask), mask)
    if var_r.item() == 0.0:
        return 0.0
    return 1.0 - (var_err / var_r).item()
