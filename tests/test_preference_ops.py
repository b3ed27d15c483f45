"""Preference losses checked against hand-derived values and identities.

Notation: pi = policy log-prob, r = reference log-prob (summed over the response),
rho = (pi_c - r_c) - (pi_r - r_r), h = beta * rho. Useful facts:
sigmoid(log 3) = 3/4, sigmoid(-log 3) = 1/4, d/dh[-log sigmoid(h)] = -sigmoid(-h).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.ops.preference import (
    DPO_LOSSES,
    bradley_terry_loss,
    dpo_loss,
    kl_from_logps,
    plackett_luce_loss,
    sequence_logps,
    sequence_mean_logps,
)

LOG3 = math.log(3.0)


def _pairs(*rows, grad=False):
    """(pi_c, pi_r, r_c, r_r) as 1-D float tensors from per-pair tuples."""
    cols = torch.tensor(rows, dtype=torch.float64).T
    return [c.clone().requires_grad_(grad) for c in cols]


# --- sequence log-probs and KL ---------------------------------------------------------------


@pytest.mark.parametrize("pad", [float("nan"), 1e9, float("inf")])
def test_sequence_logps_ignore_padding_value_and_gradient(pad):
    # Row 0: -1 - 2 = -3 (sum), mean -1.5. Row 1: one token -4. Row 2: empty -> sum 0, mean 0.
    logps = torch.tensor([[-1.0, -2.0, pad], [-4.0, pad, pad], [pad, pad, pad]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert sequence_logps(logps, mask).tolist() == [-3.0, -4.0, 0.0]
    assert sequence_mean_logps(logps, mask).tolist() == [-1.5, -4.0, 0.0]
    sequence_logps(logps, mask).sum().backward()
    # d sum / d logp is 1 on response tokens and exactly 0 (not NaN) on padding.
    assert torch.isfinite(logps.grad).all()
    assert torch.equal(logps.grad, mask.float())


@pytest.mark.parametrize("pad", [float("nan"), 1e9])
def test_kl_from_logps_by_hand_and_padding(pad):
    # k1 = sum over response of (pi - ref) = (-1 - -2) + (-3 - -1) = 1 - 2 = -1; padding ignored
    # even where both hold 1e9 (1e9 - 1e9 = 0 would hide a bug, so ref pads differ).
    policy = torch.tensor([[-1.0, -3.0, pad]], requires_grad=True)
    ref = torch.tensor([[-2.0, -1.0, -pad]])
    mask = torch.tensor([[1, 1, 0]])
    kl = kl_from_logps(policy, ref, mask)
    assert kl.tolist() == [-1.0]
    kl.sum().backward()
    assert torch.isfinite(policy.grad).all()
    assert policy.grad.tolist() == [[1.0, 1.0, 0.0]]


def test_kl_is_zero_when_policy_equals_ref():
    torch.manual_seed(0)
    logps = -torch.rand(3, 5) * 10
    assert torch.equal(kl_from_logps(logps, logps, torch.ones(3, 5)), torch.zeros(3))


# --- DPO sigmoid -----------------------------------------------------------------------------


def test_dpo_is_log2_when_policy_equals_reference():
    # pi = r for both responses -> rho = 0 -> h = 0 -> -log sigmoid(0) = log 2, for any logps
    # (including large ones) and any beta.
    torch.manual_seed(0)
    chosen, rejected = -torch.rand(6) * 1e3, -torch.rand(6) * 1e3
    for beta in (0.01, 0.1, 5.0):
        loss, metrics = dpo_loss("sigmoid", chosen, rejected, chosen, rejected, beta)
        assert torch.allclose(loss, torch.full((6,), math.log(2.0)))
        # All rewards are 0: ties, and a tie is not counted as "chosen ranked higher".
        assert metrics["rewards/accuracy"].item() == 0.0
        assert metrics["rewards/margin"].item() == 0.0


def test_dpo_value_and_exact_gradient_by_hand():
    # beta = 0.5, pi_c - r_c = 2 log 3, pi_r - r_r = 0 -> h = log 3.
    # loss = -log sigmoid(log 3) = -log(3/4) = log(4/3).
    # d loss / d pi_c = -beta * sigmoid(-h) = -0.5 * 1/4 = -0.125; d / d pi_r = +0.125;
    # d / d r_c = +0.125; d / d r_r = -0.125.
    pc, pr, rc, rr = _pairs((2 * LOG3 - 1.0, -2.0, -1.0, -2.0), grad=True)
    loss, _ = dpo_loss("sigmoid", pc, pr, rc, rr, beta=0.5)
    assert math.isclose(loss.item(), math.log(4 / 3), rel_tol=1e-12)
    loss.sum().backward()
    # Signs: a gradient *descent* step raises pi_c and lowers pi_r.
    assert pc.grad.item() < 0 < pr.grad.item()
    assert math.isclose(pc.grad.item(), -0.125, rel_tol=1e-12)
    assert math.isclose(pr.grad.item(), 0.125, rel_tol=1e-12)
    assert math.isclose(rc.grad.item(), 0.125, rel_tol=1e-12)
    assert math.isclose(rr.grad.item(), -0.125, rel_tol=1e-12)


def test_dpo_gradient_sign_at_random_points():
    torch.manual_seed(1)
    pc, pr, rc, rr = (-torch.rand(8, dtype=torch.float64) * 20 for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    loss, _ = dpo_loss("sigmoid", pc, pr, rc, rr, beta=0.1)
    loss.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_dpo_is_stable_for_huge_margins():
    # h = -1000: log(sigmoid(h)) would be log(0) = -inf; logsigmoid gives -1000 exactly enough.
    pc, pr, rc, rr = _pairs((-1000.0, 0.0, 0.0, 0.0), grad=True)
    loss, _ = dpo_loss("sigmoid", pc, pr, rc, rr, beta=1.0)
    assert math.isclose(loss.item(), 1000.0, rel_tol=1e-12)
    loss.sum().backward()
    assert math.isclose(pc.grad.item(), -1.0, rel_tol=1e-12)  # -sigmoid(1000) = -1


def test_label_smoothing_half_is_symmetric_with_zero_gradient_at_zero():
    # eps = 0.5: loss(h) = -0.5 log sigmoid(h) - 0.5 log sigmoid(-h), even in h.
    # Gradient at h = 0: 0.5 * (-sigmoid(0)) + 0.5 * sigmoid(0) = 0 exactly.
    for rho in (0.3, 2.0, 7.5):
        plus, _ = dpo_loss("sigmoid", *_pairs((rho, 0.0, 0.0, 0.0)), 0.7, label_smoothing=0.5)
        minus, _ = dpo_loss("sigmoid", *_pairs((-rho, 0.0, 0.0, 0.0)), 0.7, label_smoothing=0.5)
        assert math.isclose(plus.item(), minus.item(), rel_tol=1e-12)
    pc, pr, rc, rr = _pairs((-3.0, -5.0, -3.0, -5.0), grad=True)
    loss, _ = dpo_loss("sigmoid", pc, pr, rc, rr, 0.7, label_smoothing=0.5)
    loss.sum().backward()
    assert pc.grad.item() == 0.0 and pr.grad.item() == 0.0


def test_label_smoothing_by_hand_and_zero_is_plain_dpo():
    # h = log 3 (beta 1, rho log 3), eps = 0.25:
    # -0.75 log(3/4) - 0.25 log(1/4) = 0.75 log(4/3) + 0.25 log 4.
    pairs = _pairs((LOG3, 0.0, 0.0, 0.0))
    loss, _ = dpo_loss("sigmoid", *pairs, 1.0, label_smoothing=0.25)
    assert math.isclose(loss.item(), 0.75 * math.log(4 / 3) + 0.25 * math.log(4.0))
    torch.manual_seed(2)
    pc, pr, rc, rr = (-torch.rand(5) * 10 for _ in range(4))
    smoothed, _ = dpo_loss("sigmoid", pc, pr, rc, rr, 0.1, label_smoothing=0.0)
    plain, _ = dpo_loss("sigmoid", pc, pr, rc, rr, 0.1)
    assert torch.equal(smoothed, plain)


def test_label_smoothing_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss("sigmoid", *_pairs((0.0, 0.0, 0.0, 0.0)), 0.1, label_smoothing=0.6)


# --- IPO -------------------------------------------------------------------------------------


def test_ipo_minimised_at_half_inverse_beta():
    # beta = 0.25 -> target rho = 1/(2 * 0.25) = 2. At rho = 2: loss 0, d/d pi_c = 2(rho-2) = 0.
    pc, pr, rc, rr = _pairs((-1.0, -4.0, -2.0, -3.0), grad=True)  # rho = 1 - (-1) = 2
    loss, _ = dpo_loss("ipo", pc, pr, rc, rr, beta=0.25)
    assert loss.item() == 0.0
    loss.sum().backward()
    assert pc.grad.item() == 0.0 and pr.grad.item() == 0.0
    # Over a grid of rho the smallest loss is at rho = 2.
    rhos = torch.linspace(-3, 7, 101, dtype=torch.float64)  # step 0.1, includes 2.0
    zeros = torch.zeros_like(rhos)
    grid, _ = dpo_loss("ipo", rhos, zeros, zeros, zeros, beta=0.25)
    assert math.isclose(rhos[grid.argmin()].item(), 2.0, abs_tol=1e-9)


def test_ipo_value_and_gradient_elsewhere():
    # beta = 0.25, rho = 5: (5 - 2)^2 = 9; d/d pi_c = 2 * 3 = 6, d/d pi_r = -6.
    pc, pr, rc, rr = _pairs((5.0, 0.0, 0.0, 0.0), grad=True)
    loss, metrics = dpo_loss("ipo", pc, pr, rc, rr, beta=0.25)
    assert loss.item() == 9.0
    loss.sum().backward()
    assert pc.grad.item() == 6.0 and pr.grad.item() == -6.0
    # Rewards are still beta * log-ratio: 0.25 * 5 = 1.25.
    assert metrics["rewards/chosen"].item() == 1.25


# --- hinge -----------------------------------------------------------------------------------


def test_hinge_values_and_gradients():
    # beta = 0.5. rho = 4 -> h = 2 >= 1: loss 0, grad 0. rho = 2 -> h = 1: loss 0.
    # rho = 1 -> h = 0.5: loss 0.5, d/d pi_c = -beta = -0.5. rho = -2 -> h = -1: loss 2.
    pc, pr, rc, rr = _pairs(
        (4.0, 0.0, 0.0, 0.0),
        (2.0, 0.0, 0.0, 0.0),
        (1.0, 0.0, 0.0, 0.0),
        (-2.0, 0.0, 0.0, 0.0),
        grad=True,
    )
    loss, _ = dpo_loss("hinge", pc, pr, rc, rr, beta=0.5)
    assert loss.tolist() == [0.0, 0.0, 0.5, 2.0]
    loss.sum().backward()
    assert pc.grad[0].item() == 0.0
    assert pc.grad[2:].tolist() == [-0.5, -0.5]
    assert pr.grad[2:].tolist() == [0.5, 0.5]


# --- SimPO -----------------------------------------------------------------------------------


def test_simpo_hand_value():
    # beta = 2, gamma = 1, mean logps pi_c = -1, pi_r = -1 - (1 + log 3)/2:
    # beta (pi_c - pi_r) - gamma = (1 + log 3) - 1 = log 3 -> loss = log(4/3).
    # Rewards are beta * pi: chosen -2, rejected -2 - (1 + log 3); margin 1 + log 3 (no gamma).
    pc = torch.tensor([-1.0], dtype=torch.float64)
    pr = torch.tensor([-1.0 - (1 + LOG3) / 2], dtype=torch.float64)
    loss, metrics = dpo_loss("simpo", pc, pr, None, None, beta=2.0, gamma=1.0)
    assert math.isclose(loss.item(), math.log(4 / 3), rel_tol=1e-12)
    assert math.isclose(metrics["rewards/chosen"].item(), -2.0)
    assert math.isclose(metrics["rewards/margin"].item(), 1 + LOG3, rel_tol=1e-12)
    assert metrics["rewards/accuracy"].item() == 1.0
    assert "logps/chosen" not in metrics  # reference-free: no ref-based logps metrics


def test_simpo_gamma_is_not_scaled_by_beta():
    # If beta * (pi_c - pi_r) == gamma the logit is 0 and the loss log 2, whatever beta is
    # (gamma is an absolute reward margin, as in the SimPO paper's eq. 6).
    for beta in (0.5, 2.0, 10.0):
        pc, pr = torch.tensor([0.0]), torch.tensor([-0.5 / beta])
        loss, _ = dpo_loss("simpo", pc, pr, None, None, beta=beta, gamma=0.5)
        assert math.isclose(loss.item(), math.log(2.0), rel_tol=1e-6)


def test_simpo_ignores_reference():
    torch.manual_seed(3)
    pc, pr = -torch.rand(4), -torch.rand(4)
    base, _ = dpo_loss("simpo", pc, pr, None, None, beta=2.0)
    with_ref, _ = dpo_loss("simpo", pc, pr, -torch.rand(4) * 50, -torch.rand(4) * 50, beta=2.0)
    assert torch.equal(base, with_ref)


# --- ORPO ------------------------------------------------------------------------------------


def test_orpo_hand_value_and_gradient():
    # pi_c = log 1/2 -> odds 1; pi_r = log 1/4 -> odds 1/3; log odds ratio log 3, so the ratio
    # term is -log sigmoid(log 3) = log 4/3 and the loss NLL + beta * that = log 2 + 0.1 log 4/3.
    pc = torch.tensor([math.log(0.5)], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([math.log(0.25)], dtype=torch.float64, requires_grad=True)
    loss, m = dpo_loss("orpo", pc, pr, None, None, beta=0.1)
    assert math.isclose(loss.item(), math.log(2) + 0.1 * math.log(4 / 3), rel_tol=1e-12)
    assert math.isclose(m["orpo/log_odds_ratio"].item(), LOG3, rel_tol=1e-12)
    assert math.isclose(m["orpo/nll"].item(), math.log(2), rel_tol=1e-12)
    loss.sum().backward()
    # d/dpi log odds(pi) = 1 / (1 - e^pi); d/dx -log sigmoid(x) = -(1 - sigmoid(x)) = -1/4 here:
    # dL/dpc = -1 + 0.1 * (-1/4) * 2 = -1.05; dL/dpr = 0.1 * (1/4) * 1/(1 - 1/4) = 1/30.
    assert math.isclose(pc.grad.item(), -1.05, rel_tol=1e-12)
    assert math.isclose(pr.grad.item(), 1 / 30, rel_tol=1e-12)


def test_orpo_equal_responses_and_extremes():
    pc = torch.tensor([-0.7, -1e-12, -80.0, -1e-12])
    pr = torch.tensor([-0.7, -1e-12, -90.0, -80.0])
    loss, m = dpo_loss("orpo", pc, pr, None, None, beta=0.5)
    assert torch.isfinite(loss).all()
    # equal responses: log odds ratio 0, ratio term log 2
    assert math.isclose(loss[0].item(), 0.7 + 0.5 * math.log(2), rel_tol=1e-6)
    assert math.isclose(loss[1].item(), 0.5 * math.log(2), abs_tol=1e-6)  # capped: no inf - inf
    # both improbable: odds ~ p, the log odds ratio ~ pi_c - pi_r = 10
    assert math.isclose(
        loss[2].item(), 80.0 - 0.5 * F.logsigmoid(torch.tensor(10.0)).item(), rel_tol=1e-6
    )


# --- metrics and dispatch --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge"])
def test_reward_metrics_by_hand(name):
    # beta = 0.5; chosen log-ratios [1, 0] -> rewards [0.5, 0]; rejected [0, 2] -> [0, 1].
    # rewards/chosen 0.25, rewards/rejected 0.5, margins [0.5, -1] -> mean -0.25,
    # accuracy 1/2; logps/chosen mean(-1, -2) = -1.5, logps/rejected mean(-3, -1) = -2.
    pc, pr, rc, rr = _pairs((-1.0, -3.0, -2.0, -3.0), (-2.0, -1.0, -2.0, -3.0), grad=True)
    _, m = dpo_loss(name, pc, pr, rc, rr, beta=0.5)
    expected = {
        "rewards/chosen": 0.25,
        "rewards/rejected": 0.5,
        "rewards/margin": -0.25,
        "rewards/accuracy": 0.5,
        "logps/chosen": -1.5,
        "logps/rejected": -2.0,
    }
    assert set(m) == set(expected)
    for key, value in expected.items():
        assert m[key].dim() == 0 and not m[key].requires_grad, key
        assert math.isclose(m[key].item(), value), key


def test_unknown_loss_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown preference loss 'dpo'") as err:
        dpo_loss("dpo", *_pairs((0.0, 0.0, 0.0, 0.0)), 0.1)
    for name in DPO_LOSSES:
        assert repr(name) in str(err.value)


def test_bad_keyword_beta_and_missing_ref_are_errors():
    pairs = _pairs((0.0, 0.0, 0.0, 0.0))
    with pytest.raises(TypeError, match="gamma"):
        dpo_loss("ipo", *pairs, 0.1, gamma=1.0)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss("ipo", *pairs, 0.0)
    with pytest.raises(ValueError, match="ref_chosen"):
        dpo_loss("sigmoid", pairs[0], pairs[1], None, None, 0.1)


# --- reward-model losses ---------------------------------------------------------------------


def test_bradley_terry_equals_bce_on_difference():
    torch.manual_seed(4)
    rc, rr, m = torch.randn(7) * 5, torch.randn(7) * 5, torch.rand(7)
    loss, _ = bradley_terry_loss(rc, rr)
    bce = F.binary_cross_entropy_with_logits(rc - rr, torch.ones(7), reduction="none")
    assert torch.allclose(loss, bce, atol=1e-6)
    loss_m, _ = bradley_terry_loss(rc, rr, margin=m)
    bce_m = F.binary_cross_entropy_with_logits(rc - rr - m, torch.ones(7), reduction="none")
    assert torch.allclose(loss_m, bce_m, atol=1e-6)


def test_bradley_terry_hand_value_and_metrics():
    # rc - rr = [log 3, -1]: loss[0] = -log sigmoid(log 3) = log(4/3). With a scalar margin
    # m = log 3, pair 0 has logit 0 -> log 2. Metrics ignore m: margin mean (log 3 - 1)/2,
    # accuracy 1/2 (pair 1 is ranked wrong).
    rc, rr = torch.tensor([LOG3, 0.0]), torch.tensor([0.0, 1.0])
    loss, metrics = bradley_terry_loss(rc, rr)
    assert math.isclose(loss[0].item(), math.log(4 / 3), rel_tol=1e-6)
    loss_m, metrics_m = bradley_terry_loss(rc, rr, margin=LOG3)
    assert math.isclose(loss_m[0].item(), math.log(2.0), rel_tol=1e-6)
    for m in (metrics, metrics_m):
        assert math.isclose(m["rewards/margin"].item(), (LOG3 - 1) / 2, rel_tol=1e-6)
        assert m["rewards/accuracy"].item() == 0.5


def test_plackett_luce_two_items_is_bradley_terry():
    # K = 2: [-r_0 + lse(r_0, r_1)] + [-r_1 + r_1] = -log sigmoid(r_0 - r_1).
    torch.manual_seed(5)
    rewards = torch.randn(6, 2, dtype=torch.float64) * 3
    best_first = torch.tensor([[0, 1], [1, 0]] * 3)
    winner = rewards.gather(1, best_first[:, :1]).squeeze(1)
    loser = rewards.gather(1, best_first[:, 1:]).squeeze(1)
    bt, _ = bradley_terry_loss(winner, loser)
    assert torch.allclose(plackett_luce_loss(rewards, best_first), bt)


def test_plackett_luce_three_items_by_hand():
    # exp(r) = [1, 2, 3] (sum 6).
    # order [2, 1, 0]: P = 3/6 * 2/3 * 1/1 = 1/3 -> NLL log 3.
    # order [0, 1, 2]: P = 1/6 * 2/5 * 3/3 = 1/15 -> NLL log 15.
    rewards = torch.log(torch.tensor([[1.0, 2.0, 3.0]] * 2, dtype=torch.float64))
    order = torch.tensor([[2, 1, 0], [0, 1, 2]])
    loss = plackett_luce_loss(rewards, order)
    assert torch.allclose(loss, torch.log(torch.tensor([3.0, 15.0], dtype=torch.float64)))


@pytest.mark.parametrize("pad", [float("nan"), 1e9])
def test_plackett_luce_padding_changes_nothing(pad):
    # Row 0: the 3-item ranking above (NLL log 3), padded to K = 4 with candidate 3, placed
    # in the middle of `order`. Row 1: two valid candidates (= Bradley-Terry), two padded at
    # the tail of `order`, so its last two pools are empty (logsumexp of all -inf) - the
    # gradient must still be finite.
    log = math.log
    rewards = torch.tensor(
        [[log(1.0), log(2.0), log(3.0), pad], [pad, 0.5, pad, -1.0]],
        dtype=torch.float64,
        requires_grad=True,
    )
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 1]])
    order = torch.tensor([[2, 3, 1, 0], [3, 1, 0, 2]])  # row 1: -1.0 ranked above 0.5
    loss = plackett_luce_loss(rewards, order, mask)
    expected_bt = -F.logsigmoid(torch.tensor(-1.0 - 0.5, dtype=torch.float64)).item()
    assert math.isclose(loss[0].item(), log(3.0), rel_tol=1e-12)
    assert math.isclose(loss[1].item(), expected_bt, rel_tol=1e-12)
    loss.sum().backward()
    assert torch.isfinite(rewards.grad).all()
    assert rewards.grad[0, 3].item() == 0.0 and rewards.grad[1, 0].item() == 0.0
