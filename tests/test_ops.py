import math

import torch

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
