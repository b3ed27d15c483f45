"""RL ops checked against hand-derived values and identities.

Notation: ratio = exp(logps - old_logps), A = advantage, eps = clip_eps, logr = ref - logps,
V = value, R = return. Useful facts: e = 2.71828..., exp(x) >= 1 + x with equality only at 0.
"""

import math

import pytest
import torch

from posttrain.ops.rl import (
    cispo_policy_loss,
    entropy_from_logits,
    explained_variance,
    frac_zero_std,
    gae,
    group_advantages,
    gspo_policy_loss,
    kl_estimate,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    reduce_loss,
    rloo_advantages,
    value_loss,
)

E = math.e
F64 = torch.float64


def _t(*rows):
    return torch.tensor(rows, dtype=F64)


def _ones(*shape):
    return torch.ones(*shape, dtype=torch.bool)


# --- KL estimators ---------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    # logr = ref - logps = [1, 0]: k1 = -1 (negative!), k2 = 1/2, k3 = e - 1 - 1 = e - 2.
    # At logr = 0 every estimator is 0.
    logps, ref = _t([0.0, -1.0]), _t([1.0, -1.0])
    assert kl_estimate(logps, ref, "k1").tolist() == [[-1.0, 0.0]]
    assert kl_estimate(logps, ref, "k2").tolist() == [[0.5, 0.0]]
    k3 = kl_estimate(logps, ref, "k3")
    assert math.isclose(k3[0, 0].item(), E - 2, rel_tol=1e-15) and k3[0, 1].item() == 0.0
    with pytest.raises(ValueError, match="kind"):
        kl_estimate(logps, ref, "k4")


@pytest.mark.parametrize(
    "p, q",
    [
        ([0.9, 0.1], [0.5, 0.5]),
        ([0.5, 0.3, 0.2], [0.1, 0.6, 0.3]),
        ([0.25] * 4, [0.7, 0.1, 0.1, 0.1]),
    ],
)
def test_k1_and_k3_are_unbiased_exactly(p, q):
    # One token, outcome i drawn from p: logps = log p_i, ref = log q_i, logr = log(q_i / p_i).
    # E_p[k1] = sum p_i log(p_i / q_i) = KL(p || q) by definition.
    # E_p[k3] = sum p_i (q_i / p_i - 1 - logr_i) = sum q_i - 1 + KL = KL, since sum q_i = 1.
    p_, q_ = torch.tensor([p], dtype=F64), torch.tensor([q], dtype=F64)
    kl = (p_ * (p_.log() - q_.log())).sum().item()
    for kind in ("k1", "k3"):
        expectation = (p_ * kl_estimate(p_.log(), q_.log(), kind)).sum().item()
        assert math.isclose(expectation, kl, rel_tol=1e-12), kind
    # k3 is never below 0 per sample; k1 is, for an outcome q favours.
    assert (kl_estimate(p_.log(), q_.log(), "k3") >= 0).all()
    assert (kl_estimate(p_.log(), q_.log(), "k1") < 0).any()


def test_k2_and_k3_nonnegative_on_a_grid():
    # k3 = exp(x) - 1 - x >= 0 with equality only at x = 0; k2 = x^2 / 2 >= 0. Includes |x| = 30.
    logr = torch.linspace(-30, 30, 601, dtype=F64).unsqueeze(0)  # step 0.1, includes 0
    k3 = kl_estimate(torch.zeros_like(logr), logr, "k3")
    assert (k3 >= 0).all() and torch.isfinite(k3).all()
    assert torch.equal(k3 == 0, logr == 0)
    assert (kl_estimate(torch.zeros_like(logr), logr, "k2") >= 0).all()


def test_k2_close_to_kl_for_close_distributions():
    # With x = logr: E_p[exp(x)] = sum q = 1, so KL = E_p[-x] = E_p[exp(x) - 1 - x]
    #   = E_p[x^2 / 2] + E_p[rem(x)],  rem(x) = sum_{n>=3} x^n / n!,  |rem(x)| <= |x|^3 e^|x| / 6.
    # So |KL - E_p[k2]| <= E_p[|x|^3 e^|x|] / 6: third order in the distance between p and q.
    p = torch.tensor([[0.5, 0.3, 0.2]], dtype=F64)
    q = torch.tensor([[0.49, 0.30, 0.21]], dtype=F64)
    x = q.log() - p.log()
    kl = (p * (p.log() - q.log())).sum().item()
    e_k2 = (p * kl_estimate(p.log(), q.log(), "k2")).sum().item()
    bound = (p * x.abs() ** 3 * x.abs().exp()).sum().item() / 6
    assert abs(kl - e_k2) <= bound
    assert bound < 0.02 * kl  # ~5e-6 against KL ~3.4e-4: k2 within 2% here


# --- GAE -------------------------------------------------------------------------------------

REWARDS = _t([1.0, 2.0, 3.0])
VALUES = _t([0.5, 1.0, 1.5])


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    # Reward-to-go: [1+2+3, 2+3, 3] = [6, 5, 3]; minus V -> [5.5, 4, 1.5]; returns = RTG.
    adv, ret = gae(REWARDS, VALUES, _ones(1, 3), gamma=1.0, lam=1.0)
    assert adv.tolist() == [[5.5, 4.0, 1.5]]
    assert ret.tolist() == [[6.0, 5.0, 3.0]]


def test_gae_lambda_zero_is_one_step_td_error():
    # gamma = 0.9, V after the last token = 0:
    # d0 = 1 + 0.9 * 1.0 - 0.5 = 1.4; d1 = 2 + 0.9 * 1.5 - 1.0 = 2.35; d2 = 3 + 0 - 1.5 = 1.5.
    adv, _ = gae(REWARDS, VALUES, _ones(1, 3), gamma=0.9, lam=0.0)
    torch.testing.assert_close(adv, _t([1.4, 2.35, 1.5]))


def test_gae_by_hand():
    # gamma = 0.9, lam = 0.95, gamma * lam = 0.855; deltas from the test above.
    # A2 = 1.5; A1 = 2.35 + 0.855 * 1.5 = 3.6325; A0 = 1.4 + 0.855 * 3.6325 = 4.5057875.
    # returns = A + V = [5.0057875, 4.6325, 3.0].
    adv, ret = gae(REWARDS, VALUES, _ones(1, 3), gamma=0.9, lam=0.95)
    torch.testing.assert_close(adv, _t([4.5057875, 3.6325, 1.5]))
    torch.testing.assert_close(ret, _t([5.0057875, 4.6325, 3.0]))


def test_gae_terminal_reward_with_zero_values_reaches_every_token():
    # RLHF's usual shape: reward only on the last token, V = 0, gamma = lam = 1 -> A_t = r_T.
    rewards = _t([0.0, 0.0, 0.0, 2.5])
    adv, _ = gae(rewards, torch.zeros_like(rewards), _ones(1, 4), gamma=1.0, lam=1.0)
    assert adv.tolist() == [[2.5, 2.5, 2.5, 2.5]]


def test_gae_right_padded_rows_equal_each_row_alone():
    # Row 1 has two valid tokens: d1 = 5 + 0 - 0.5 = 4.5, d0 = 4 + 0.9 * 0.5 - 2 = 2.45;
    # A1 = 4.5, A0 = 2.45 + 0.855 * 4.5 = 6.2975. Its padding (1e9) must not be bootstrapped.
    pad = 1e9
    rewards = _t([1.0, 2.0, 3.0], [4.0, 5.0, pad])
    values = _t([0.5, 1.0, 1.5], [2.0, 0.5, pad])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    alone0 = gae(REWARDS, VALUES, _ones(1, 3), 0.9, 0.95)
    alone1 = gae(_t([4.0, 5.0]), _t([2.0, 0.5]), _ones(1, 2), 0.9, 0.95)
    torch.testing.assert_close(adv[:1], alone0[0])
    torch.testing.assert_close(ret[:1], alone0[1])
    torch.testing.assert_close(adv[1:, :2], alone1[0])
    torch.testing.assert_close(ret[1:, :2], alone1[1])
    torch.testing.assert_close(alone1[0], _t([6.2975, 4.5]))
    assert adv[1, 2].item() == 0.0 and ret[1, 2].item() == 0.0


# --- PPO policy loss -------------------------------------------------------------------------


def test_ppo_loss_is_minus_mean_advantage_at_ratio_one():
    # logps == old_logps -> ratio 1, inside [0.8, 1.2]: both terms are -A, loss = -A per token,
    # token mean -mean(A) = -(1 - 2 + 3 + 0.5) / 4 = -0.625. d loss / d logps = -ratio * A = -A
    # (both branches carry it; clamp is not saturated), / 4 for the mean.
    torch.manual_seed(0)
    logps = (-torch.rand(1, 4, dtype=F64) * 5).requires_grad_()
    A = _t([1.0, -2.0, 3.0, 0.5])
    loss, metrics = ppo_policy_loss(logps, logps.detach().clone(), A, _ones(1, 4))
    assert torch.equal(loss, -A)
    mean_loss = reduce_loss(loss, _ones(1, 4), "token_mean")
    assert mean_loss.item() == -0.625
    mean_loss.backward()
    assert torch.equal(logps.grad, -A / 4)
    assert metrics["policy/clip_frac"].item() == 0.0
    assert metrics["policy/approx_kl"].item() == 0.0
    for key in ("ratio_mean", "ratio_max", "ratio_min"):
        assert metrics[f"policy/{key}"].item() == 1.0


def test_ppo_loss_clipping_by_hand():
    # eps = 0.2. Tokens (log ratio, A):
    #   ( 1,  2): ratio e.   -e*2 = -5.44 vs -1.2*2 = -2.4 -> max = -2.4 = -1.2 A   (clipped)
    #   ( 1, -2): ratio e.    2e = 5.44  vs  1.2*2 =  2.4 -> max = 2e   = -e A      (unclipped)
    #   (-1,  2): ratio 1/e. -2/e = -0.74 vs -0.8*2 = -1.6 -> max = -2/e            (unclipped)
    #   (-1, -2): ratio 1/e.  2/e = 0.74 vs  0.8*2 =  1.6 -> max = 1.6              (clipped)
    # clip_frac = 2/4. Gradients d/d logps: clipped tokens 0 (clamp saturated), unclipped
    # -ratio * A: 2e and -2/e.
    # ratio_mean = (2e + 2/e) / 4 = cosh(1); approx_kl = mean((r - 1) - log r)
    #   = (2 (e - 2) + 2 (1/e)) / 4 = cosh(1) - 1.
    old = _t([-1.0, -2.0, -1.0, -2.0])
    logps = (old + _t([1.0, 1.0, -1.0, -1.0])).requires_grad_()
    A = _t([2.0, -2.0, 2.0, -2.0])
    loss, m = ppo_policy_loss(logps, old, A, _ones(1, 4), clip_eps=0.2)
    torch.testing.assert_close(loss, _t([-2.4, 2 * E, -2 / E, 1.6]))
    loss.sum().backward()
    torch.testing.assert_close(logps.grad, _t([0.0, 2 * E, -2 / E, 0.0]))
    assert m["policy/clip_frac"].item() == 0.5
    assert m["policy/dual_clip_frac"].item() == 0.0
    assert math.isclose(m["policy/ratio_mean"].item(), math.cosh(1), rel_tol=1e-12)
    assert math.isclose(m["policy/ratio_max"].item(), E, rel_tol=1e-15)
    assert math.isclose(m["policy/ratio_min"].item(), 1 / E, rel_tol=1e-15)
    assert math.isclose(m["policy/approx_kl"].item(), math.cosh(1) - 1, rel_tol=1e-12)
    assert all(not v.requires_grad for v in m.values())


def test_ppo_clip_higher_by_hand():
    # DAPO's clip-higher, eps_low 0.2, eps_high 0.28. Tokens (log ratio, A):
    #   ( 1,  2): ratio e -> clipped at 1.28: -1.28 * 2 = -2.56 (was -2.4 with one eps)
    #   (-1, -2): ratio 1/e -> clipped at 0.8, unchanged: 1.6
    #   (0.2, 2): ratio e^0.2 = 1.2214 < 1.28: unclipped now, -2 e^0.2 (clipped at 1.2 before)
    old = _t([-1.0, -2.0, -1.0])
    logps = old + _t([1.0, -1.0, 0.2])
    A = _t([2.0, -2.0, 2.0])
    loss, m = ppo_policy_loss(logps, old, A, _ones(1, 3), clip_eps=0.2, clip_eps_high=0.28)
    torch.testing.assert_close(loss, _t([-2.56, 1.6, -2 * math.exp(0.2)]))
    assert math.isclose(m["policy/clip_frac"].item(), 2 / 3, rel_tol=1e-12)
    same, _ = ppo_policy_loss(logps, old, A, _ones(1, 3), clip_eps=0.2, clip_eps_high=None)
    torch.testing.assert_close(same, ppo_policy_loss(logps, old, A, _ones(1, 3), clip_eps=0.2)[0])
    torch.testing.assert_close(same, _t([-2.4, 1.6, -2.4]))


def test_ppo_dual_clip_caps_negative_advantages():
    # eps = 0.2, dual_clip c = 3. Tokens (log ratio, A):
    #   (2, -2): -e^2 * -2 = 14.78 vs 2.4 -> 14.78; cap c|A| = 6 < 14.78 -> 6  (dual clipped)
    #   (1, -2): 2e = 5.44 < 6 -> 5.44, untouched
    #   (2,  2): -2e^2 vs -2.4 -> -2.4 (ordinary clip; positive A never dual-clipped)
    # Without dual clip the first token costs 2e^2. The cap is constant in logps: gradient 0.
    old = _t([0.0, 0.0, 0.0])
    logps = _t([2.0, 1.0, 2.0]).requires_grad_()
    A = _t([-2.0, -2.0, 2.0])
    loss, m = ppo_policy_loss(logps, old, A, _ones(1, 3), clip_eps=0.2, dual_clip=3.0)
    torch.testing.assert_close(loss, _t([6.0, 2 * E, -2.4]))
    loss.sum().backward()
    torch.testing.assert_close(logps.grad, _t([0.0, 2 * E, 0.0]))
    assert math.isclose(m["policy/clip_frac"].item(), 1 / 3)
    assert math.isclose(m["policy/dual_clip_frac"].item(), 1 / 3)
    plain, _ = ppo_policy_loss(logps, old, A, _ones(1, 3), clip_eps=0.2)
    torch.testing.assert_close(plain[0, 0], torch.tensor(2 * E**2, dtype=F64))
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_policy_loss(logps, old, A, _ones(1, 3), dual_clip=1.0)


# --- value loss ------------------------------------------------------------------------------


def test_value_loss_clipped_and_unclipped_by_hand():
    # eps = 0.2, old = 0.5 everywhere -> clip range [0.3, 0.7].
    #   v = 1.0, R = 0: (1 - 0)^2 = 1 vs (0.7 - 0)^2 = 0.49 -> 1,    loss 0.5   (unclipped)
    #   v = 1.0, R = 2: (1 - 2)^2 = 1 vs (0.7 - 2)^2 = 1.69 -> 1.69, loss 0.845 (clipped)
    #   v = 0.6, R = 0: inside the range, both 0.36 -> loss 0.18                 (not counted)
    # d/dv: token 0: v - R = 1; token 1: 0 (clamp saturated); token 2: v - R = 0.6.
    values = _t([1.0, 1.0, 0.6]).requires_grad_()
    old, R = _t([0.5, 0.5, 0.5]), _t([0.0, 2.0, 0.0])
    loss, m = value_loss(values, old, R, _ones(1, 3), clip_eps=0.2)
    torch.testing.assert_close(loss, _t([0.5, 0.845, 0.18]))
    loss.sum().backward()
    torch.testing.assert_close(values.grad, _t([1.0, 0.0, 0.6]))
    assert math.isclose(m["value/clip_frac"].item(), 1 / 3)
    # Unclipped: 0.5 (v - R)^2 = [0.5, 0.5, 0.18], clip_frac 0.
    loss, m = value_loss(values, old, R, _ones(1, 3), clip_eps=None)
    torch.testing.assert_close(loss, _t([0.5, 0.5, 0.18]))
    assert m["value/clip_frac"].item() == 0.0


# --- group advantages ------------------------------------------------------------------------


def test_grpo_advantages_by_hand():
    # [1, 0, 0, 1]: mean 0.5, population std 0.5 (our choice; Bessel's would be sqrt(1/3)).
    # Normalised: +-0.5 / (0.5 + 1e-6); Dr. GRPO: +-0.5.
    r = _t([1.0, 0.0, 0.0, 1.0])
    s = 0.5 / (0.5 + 1e-6)
    torch.testing.assert_close(group_advantages(r), _t([s, -s, -s, s]), rtol=1e-15, atol=0)
    assert group_advantages(r, std_normalize=False).tolist() == [[0.5, -0.5, -0.5, 0.5]]


def test_grpo_constant_groups_are_exactly_zero():
    # [0.1] * 3 in float64: the mean is 0.1 + 1.4e-17, so a naive r - mean is not 0 (and
    # divided by a std of 1.4e-17 + eps it stays non-zero). K = 1: population std 0 -> 0.
    r = _t([0.1, 0.1, 0.1], [5.0, 5.0, 5.0], [1.0, 2.0, 4.0])
    assert (r[:1] - r[:1].mean()).ne(0).all()  # the case is a real one
    for normalize in (True, False):
        adv = group_advantages(r, std_normalize=normalize)
        assert torch.equal(adv[:2], torch.zeros(2, 3, dtype=F64))
        assert torch.isfinite(adv).all() and adv[2].ne(0).all()
        assert torch.equal(
            group_advantages(_t([7.0], [0.0]), normalize), torch.zeros(2, 1, dtype=F64)
        )
    assert torch.equal(rloo_advantages(r[:2]), torch.zeros(2, 3, dtype=F64))


def test_grpo_advantages_have_zero_mean_unit_std_per_group():
    torch.manual_seed(0)
    r = torch.randn(5, 8, dtype=F64)
    adv = group_advantages(r, eps=0.0)
    torch.testing.assert_close(adv.mean(-1), torch.zeros(5, dtype=F64))
    torch.testing.assert_close(adv.std(-1, unbiased=False), torch.ones(5, dtype=F64))


def test_frac_zero_std():
    # Groups 2 and 3 are constant -> 2/3.
    r = _t([1.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1], [-3.0, -3.0, -3.0, -3.0])
    assert math.isclose(frac_zero_std(r).item(), 2 / 3, rel_tol=1e-7)


def test_rloo_by_hand_and_identity():
    # K = 3, [1, 2, 6]: 1 - (2 + 6)/2 = -3; 2 - (1 + 6)/2 = -1.5; 6 - (1 + 2)/2 = 4.5.
    assert rloo_advantages(_t([1.0, 2.0, 6.0])).tolist() == [[-3.0, -1.5, 4.5]]
    # K = 4, [1, 0, 0, 1]: 1 - 1/3 = 2/3; 0 - 2/3 = -2/3.
    torch.testing.assert_close(rloo_advantages(_t([1.0, 0.0, 0.0, 1.0])), _t([2, -2, -2, 2]) / 3)
    # r_i - (S - r_i)/(K - 1) = (K r_i - S)/(K - 1) = K/(K - 1) (r_i - mean): sums to 0.
    torch.manual_seed(0)
    r = torch.randn(4, 5, dtype=F64)
    adv = rloo_advantages(r)
    torch.testing.assert_close(adv, 5 / 4 * (r - r.mean(-1, keepdim=True)))
    torch.testing.assert_close(adv.sum(-1), torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match="K >= 2"):
        rloo_advantages(_t([1.0], [2.0]))


@pytest.mark.parametrize("fn", [group_advantages, rloo_advantages])
def test_group_ops_do_not_mix_groups(fn):
    # Group ops take no mask; a NaN or 1e9 in one group must leave the other groups unchanged.
    clean = _t([1.0, 0.0, 0.0, 1.0], [0.5, 2.0, -1.0, 3.0])
    for pad in (float("nan"), 1e9):
        dirty = torch.cat([clean, _t([pad, 1.0, 2.0, 3.0])])
        assert torch.equal(fn(dirty)[:2], fn(clean))


# --- whitening, explained variance -----------------------------------------------------------


def test_whiten_by_hand_and_moments():
    # Valid [1, 3]: mean 2, population var 1 -> (x - 2) / sqrt(1 + 1e-8); padding -> 0.
    x = _t([1.0, 3.0, 1e9])
    mask = torch.tensor([[1, 1, 0]])
    s = 1 / math.sqrt(1 + 1e-8)
    torch.testing.assert_close(masked_whiten(x, mask), _t([-s, s, 0.0]), rtol=1e-15, atol=0)
    # shift_mean=False adds the mean back: [2 - s, 2 + s].
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), _t([2 - s, 2 + s, 0.0]))
    # Random: masked mean 0 and population std 1 (to eps / var); without the shift, mean kept.
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=F64) * 3 + 5
    mask = torch.rand(4, 6) < 0.6
    w = masked_whiten(x, mask)
    assert abs(masked_mean(w, mask).item()) < 1e-12
    assert math.isclose(masked_mean(w**2, mask).item(), 1.0, rel_tol=1e-8)
    kept = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept, torch.where(mask, w + masked_mean(x, mask), 0.0))


def test_explained_variance_by_hand():
    # R = [1, 2, 3] (Var 2/3), V = [1, 2, 2]: R - V = [0, 0, 1], Var = 2/9 -> 1 - 1/3 = 2/3.
    R, mask = _t([1.0, 2.0, 3.0]), _ones(1, 3)
    assert math.isclose(explained_variance(_t([1.0, 2.0, 2.0]), R, mask), 2 / 3, rel_tol=1e-12)
    assert explained_variance(R, R, mask) == 1.0  # perfect values
    assert abs(explained_variance(torch.full_like(R, 2.0), R, mask)) < 1e-12  # V = mean(R)
    # Var[R] == 0 and an empty mask: 0.0 by convention, not NaN.
    assert explained_variance(R, torch.full_like(R, 4.0), mask) == 0.0
    assert explained_variance(R, R, torch.zeros(1, 3, dtype=torch.bool)) == 0.0


# --- reduction and entropy -------------------------------------------------------------------


def test_reduce_loss_modes_by_hand():
    # Rows: [1, 2, 3] (3 valid), [4] (1 valid), [] (empty); padding NaN.
    # token_mean = (1 + 2 + 3 + 4) / 4 = 2.5
    # seq_mean   = mean(2, 4) = 3 (empty row skipped)
    # constant   = 10 / (3 tokens * 3 rows) = 10 / 9
    # seq_mean gradient: 1 / (2 rows * 3 tokens) = 1/6 on row 0, 1 / (2 * 1) = 1/2 on row 1.
    nan = float("nan")
    x = _t([1.0, 2.0, 3.0], [4.0, nan, nan], [nan, nan, nan]).requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert reduce_loss(x, mask, "token_mean").item() == 2.5
    assert reduce_loss(x, mask, "constant", constant=9.0).item() == 10 / 9
    seq = reduce_loss(x, mask, "seq_mean")
    assert seq.item() == 3.0
    seq.backward()
    torch.testing.assert_close(x.grad, _t([1 / 6] * 3, [0.5, 0, 0], [0, 0, 0]))
    empty = torch.zeros(3, 3, dtype=torch.bool)
    for mode in ("token_mean", "seq_mean"):
        assert reduce_loss(x, empty, mode).item() == 0.0
    with pytest.raises(ValueError, match="constant"):
        reduce_loss(x, mask, "constant")
    with pytest.raises(ValueError, match="mode"):
        reduce_loss(x, mask, "sum")


def test_entropy_by_hand():
    # Uniform over V = 8: log 8. logits [0, log 3] -> p = [1/4, 3/4]:
    # H = -(1/4 log 1/4 + 3/4 log 3/4) = log 4 - 3/4 log 3. A -inf logit adds 0: [0, 0, -inf]
    # is uniform over 2 -> log 2, with finite gradients.
    torch.testing.assert_close(
        entropy_from_logits(torch.zeros(2, 3, 8)), torch.full((2, 3), math.log(8))
    )
    h = entropy_from_logits(torch.tensor([0.0, math.log(3.0)], dtype=F64))
    assert math.isclose(h.item(), math.log(4) - 0.75 * math.log(3), rel_tol=1e-12)
    logits = torch.tensor([0.0, 0.0, float("-inf")], dtype=F64, requires_grad=True)
    h = entropy_from_logits(logits)
    assert math.isclose(h.item(), math.log(2), rel_tol=1e-12)
    h.backward()
    assert torch.isfinite(logits.grad).all()
    # bf16 logits are computed in float32.
    assert entropy_from_logits(torch.zeros(3, dtype=torch.bfloat16)).dtype == torch.float32


# --- padding invariance ----------------------------------------------------------------------
# Every masked op is run with its masked positions holding NaN, 1e9 and -inf, and compared with
# the same op on the valid tokens alone: packed into one (1, N) row for ops that treat tokens
# independently or pool them over the batch, row by row for ops with per-sequence structure.
# Values on valid positions, metrics, and gradients must match; padded outputs and padded
# gradients must be exactly 0. Across padding values the results must be bit-identical.

PADS = (float("nan"), 1e9, float("-inf"))
# Right-padded, full, left-padded, a gap in the middle, empty.
MASK = torch.tensor(
    [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0]]
).bool()


def _fill(x, mask, pad):
    m = mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim()))
    return torch.where(m, x, torch.full((), pad, dtype=x.dtype))


def _split(result):
    """Any op's result -> (tuple of tensors, metrics)."""
    if isinstance(result, float):
        return (torch.tensor(result, dtype=F64),), {}
    if isinstance(result, torch.Tensor):
        return (result,), {}
    first, second = result
    return ((first,), second) if isinstance(second, dict) else ((first, second), {})


def _run(fn, inputs, mask, weights):
    """Run fn, backprop a weighted sum of its valid outputs; (outs, metrics, grads)."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    outs, metrics = _split(fn(mask=mask, **leaves))
    objective = 0.0
    for out, w in zip(outs, weights, strict=False):
        if out.shape == mask.shape:
            assert torch.all(out[~mask] == 0)
            objective = objective + (out[mask] * w[mask]).sum()
        else:
            objective = objective + out.sum()
    if isinstance(objective, torch.Tensor) and objective.requires_grad:
        objective.backward()
    grads = {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in leaves.items()}
    return outs, metrics, grads


def _check_padding_invariance(fn, inputs, per_row=False):
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(MASK.shape, generator=g, dtype=F64) for _ in range(2)]
    if per_row:  # concatenate each non-empty row run alone, in x[mask] (row-major) order
        runs = []
        for b in range(MASK.shape[0]):
            if MASK[b].any():
                row = {k: v[b][MASK[b]].unsqueeze(0) for k, v in inputs.items()}
                w = [x[b][MASK[b]].unsqueeze(0) for x in weights]
                runs.append(_run(fn, row, _ones(1, int(MASK[b].sum())), w))
        ref_outs = tuple(torch.cat(o, dim=1) for o in zip(*(r[0] for r in runs), strict=True))
        ref_metrics = {}
        ref_grads = {k: torch.cat([r[2][k] for r in runs], dim=1) for k in inputs}
    else:
        packed = {k: v[MASK].unsqueeze(0) for k, v in inputs.items()}
        n = int(MASK.sum())
        ref_outs, ref_metrics, ref_grads = _run(
            fn, packed, _ones(1, n), [w[MASK].unsqueeze(0) for w in weights]
        )
    first = None
    for pad in PADS:
        padded = {k: _fill(v, MASK, pad) for k, v in inputs.items()}
        outs, metrics, grads = _run(fn, padded, MASK, weights)
        for out, ref in zip(outs, ref_outs, strict=True):
            torch.testing.assert_close(
                out[MASK] if out.shape == MASK.shape else out,
                ref[0] if out.shape == MASK.shape else ref,
            )
        if not per_row:
            assert metrics.keys() == ref_metrics.keys()
            for k in metrics:
                torch.testing.assert_close(metrics[k], ref_metrics[k], msg=k)
        for k, grad in grads.items():
            assert torch.isfinite(grad).all(), (pad, k)
            m = MASK.reshape(MASK.shape + (1,) * (grad.dim() - MASK.dim())).expand_as(grad)
            assert torch.all(grad[~m] == 0), (pad, k)
            torch.testing.assert_close(grad[MASK], ref_grads[k][0])
        result = (outs, metrics, grads)
        if first is None:
            first = result
        else:  # bit-identical whatever the padding holds
            for a, b in zip(first[0], outs, strict=True):
                assert torch.equal(a, b)
            assert all(torch.equal(first[1][k], metrics[k]) for k in metrics)
            assert all(torch.equal(first[2][k], grads[k]) for k in grads)


def _rand(*scale_shift, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(MASK.shape, generator=g, dtype=F64) * s + c for s, c in scale_shift]


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimate_padding_invariance(kind):
    logps, ref = _rand((1.0, -2.0), (1.0, -2.0))
    _check_padding_invariance(
        lambda logps, ref_logps, mask: kl_estimate(logps, ref_logps, kind, mask=mask),
        {"logps": logps, "ref_logps": ref},
    )


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_padding_invariance(shift_mean):
    (values,) = _rand((3.0, 1.0))
    _check_padding_invariance(
        lambda values, mask: masked_whiten(values, mask, shift_mean=shift_mean),
        {"values": values},
    )


def test_gae_padding_invariance():
    rewards, values = _rand((1.0, 0.0), (1.0, 0.5))
    _check_padding_invariance(
        lambda rewards, values, mask: gae(rewards, values, mask, gamma=0.9, lam=0.95),
        {"rewards": rewards, "values": values},
        per_row=True,
    )


@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_ppo_policy_loss_padding_invariance(dual_clip):
    logps, delta, A = _rand((1.0, -2.0), (1.0, 0.0), (1.0, 0.0))
    # Negative advantage where the ratio exp(-delta) exceeds 2, so the cap of 2|A| can bite.
    A = torch.where(delta < -math.log(2), -A.abs(), A)
    inputs = {"logps": logps, "old_logps": logps + delta, "advantages": A}
    _check_padding_invariance(
        lambda mask, **kw: ppo_policy_loss(**kw, mask=mask, clip_eps=0.2, dual_clip=dual_clip),
        inputs,
    )
    # The data exercise both branches (and the cap).
    _, m = ppo_policy_loss(**inputs, mask=MASK, dual_clip=dual_clip)
    assert 0 < m["policy/clip_frac"].item() < 1
    assert (m["policy/dual_clip_frac"].item() > 0) == (dual_clip is not None)


def test_gspo_policy_loss_padding_invariance():
    # Per row (a sequence's ratio is the mean over its own valid tokens), each row's advantage
    # on all of its tokens; small log-ratios so that rows fall either side of the clip range.
    logps, delta, A = _rand((1.0, -2.0), (0.01, 0.0), (1.0, 0.0))
    A = A[:, :1].expand(MASK.shape).clone()
    inputs = {"logps": logps, "old_logps": logps + delta, "advantages": A}
    _check_padding_invariance(
        lambda mask, **kw: gspo_policy_loss(**kw, mask=mask, clip_eps=5e-3, clip_eps_high=5e-3),
        inputs,
        per_row=True,
    )
    _, m = gspo_policy_loss(**inputs, mask=MASK, clip_eps=5e-3, clip_eps_high=5e-3)
    assert 0 < m["policy/clip_frac"].item() < 1


def test_cispo_policy_loss_padding_invariance():
    logps, delta, A = _rand((1.0, -2.0), (1.0, 0.0), (1.0, 0.0))
    inputs = {"logps": logps, "old_logps": logps + delta, "advantages": A}
    _check_padding_invariance(
        lambda mask, **kw: cispo_policy_loss(**kw, mask=mask, clip_eps=0.2, clip_eps_high=0.28),
        inputs,
    )
    _, m = cispo_policy_loss(**inputs, mask=MASK, clip_eps=0.2, clip_eps_high=0.28)
    assert 0 < m["policy/clip_frac"].item() < 1


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_value_loss_padding_invariance(clip_eps):
    values, delta, returns = _rand((1.0, 0.0), (0.3, 0.0), (1.0, 0.0))
    inputs = {"values": values, "old_values": values + delta, "returns": returns}
    _check_padding_invariance(
        lambda mask, **kw: value_loss(**kw, mask=mask, clip_eps=clip_eps), inputs
    )
    if clip_eps is not None:
        assert value_loss(**inputs, mask=MASK)[1]["value/clip_frac"].item() > 0


@pytest.mark.parametrize("mode", ["token_mean", "constant"])
def test_reduce_loss_padding_invariance(mode):
    (x,) = _rand((1.0, 0.0))
    _check_padding_invariance(lambda x, mask: reduce_loss(x, mask, mode, constant=25.0), {"x": x})


def test_reduce_loss_seq_mean_padding_invariance():
    # Reference: the mean of each non-empty row's own token mean, computed row by row.
    (x,) = _rand((1.0, 0.0))
    rows = [x[b][MASK[b]] for b in range(MASK.shape[0]) if MASK[b].any()]
    expected = torch.stack([r.mean() for r in rows]).mean()
    results = []
    for pad in PADS:
        leaf = _fill(x, MASK, pad).requires_grad_()
        out = reduce_loss(leaf, MASK, "seq_mean")
        out.backward()
        torch.testing.assert_close(out, expected)
        assert torch.isfinite(leaf.grad).all() and torch.all(leaf.grad[~MASK] == 0)
        # d/dx = 1 / (rows * len(row)) on valid tokens.
        lens = MASK.sum(-1, keepdim=True).clamp(min=1).to(F64)
        torch.testing.assert_close(leaf.grad, torch.where(MASK, 1 / (len(rows) * lens), 0.0))
        results.append((out, leaf.grad))
    assert all(torch.equal(a, b) for r in results[1:] for a, b in zip(results[0], r, strict=True))


def test_entropy_padding_invariance():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*MASK.shape, 7, generator=g, dtype=F64) * 2
    _check_padding_invariance(
        lambda logits, mask: entropy_from_logits(logits, mask=mask), {"logits": logits}
    )


def test_explained_variance_padding_invariance():
    values, returns = _rand((1.0, 0.0), (1.0, 0.3))
    _check_padding_invariance(
        lambda values, returns, mask: explained_variance(values, returns, mask),
        {"values": values, "returns": returns},
    )
