import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.ops.lm import IGNORE_INDEX, lm_loss_sum, token_logps
from posttrain.ops.reduce import masked_mean, masked_sum


def test_masked_sum_ignores_nan_and_huge_padding():
    values = torch.tensor([[1.0, 2.0, float("nan")], [3.0, 1e9, float("inf")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_sum(values, mask).item() == 6.0
    assert masked_mean(values, mask).item() == 2.0
    assert masked_sum(values, mask, dim=1).tolist() == [3.0, 3.0]


def test_masked_mean_of_empty_mask_is_zero():
    assert masked_mean(torch.ones(3), torch.zeros(3)).item() == 0.0


def test_lm_loss_uniform_logits_is_log_vocab():
    # Uniform logits over V=8: every target costs log 8; 5 targets, one ignored position.
    logits = torch.zeros(1, 6, 8)
    labels = torch.tensor([[1, 2, 3, 4, 5, IGNORE_INDEX]])
    loss, n = lm_loss_sum(logits, labels)
    assert n.item() == 5
    assert math.isclose(loss.item(), 5 * math.log(8), rel_tol=1e-6)


def test_token_logps_by_hand():
    # logits [0, log 3] -> p = [1/4, 3/4]; target 1 -> log 3/4; ignored position -> 0.
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0]]])
    labels = torch.tensor([[1, IGNORE_INDEX]])
    out = token_logps(logits, labels)
    assert torch.allclose(out, torch.tensor([[math.log(0.75), 0.0]]))


def test_lm_loss_matches_token_logps_sum():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = IGNORE_INDEX
    loss, _ = lm_loss_sum(logits, labels)
    assert torch.allclose(loss, -token_logps(logits, labels).sum(), atol=1e-5)


def test_distillation_loss_by_hand():
    import math

    from posttrain.ops.lm import distill_loss_sum

    # student uniform over 2 tokens, teacher p = (3/4, 1/4), target token 0
    student = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    target = torch.tensor([0])
    loss, m = distill_loss_sum(student, teacher, target, alpha=0.5)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert m["kd/ce"].item() == pytest.approx(math.log(2))
    assert m["kd/kl"].item() == pytest.approx(kl)
    assert loss.item() == pytest.approx(0.5 * math.log(2) + 0.5 * kl)
    loss.backward()
    # (1 - a)(p_s - onehot) + a (p_s - p_t) = .5 (-.5, .5) + .5 (-.25, .25)
    assert student.grad[0].tolist() == pytest.approx([-0.375, 0.375])
    # temperature 2: both softmaxes at T, the KL scaled by T^2
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    kl2 = p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))
    _, m2 = distill_loss_sum(student, teacher, target, alpha=1.0, temperature=2.0)
    assert m2["kd/kl"].item() == pytest.approx(4 * kl2)
    # alpha 0 is plain cross-entropy; a student equal to its teacher has no KL
    ce, _ = distill_loss_sum(teacher, teacher, target, alpha=0.0)
    assert ce.item() == pytest.approx(F.cross_entropy(teacher, target, reduction="sum").item())
    assert distill_loss_sum(teacher, teacher, target)[1]["kd/kl"].item() == pytest.approx(
        0.0, abs=1e-12
    )
    with pytest.raises(ValueError, match="same vocabulary"):
        distill_loss_sum(torch.zeros(1, 3), torch.zeros(1, 2), target)
