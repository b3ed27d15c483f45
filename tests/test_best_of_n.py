"""Best-of-n: the analytic KL bound by hand, and the selection is the reward argmax."""

import math

import pytest
import torch

from posttrain.generate import SamplingParams
from posttrain.generate.best_of_n import best_index, best_of_k_expectation, best_of_n, kl_bound
from posttrain.models.presets import build_model


def test_kl_bound_by_hand():
    assert kl_bound(1) == 0.0
    assert kl_bound(2) == pytest.approx(math.log(2) - 0.5)  # 0.1931
    assert kl_bound(8) == pytest.approx(math.log(8) - 7 / 8)  # 1.2044
    with pytest.raises(ValueError):
        kl_bound(0)


def test_best_of_n_picks_the_highest_reward(small_tokenizer, tmp_path):
    from posttrain.models.load import save_model
    from posttrain.models.reward import reward_model_from, score

    tok = small_tokenizer
    torch.manual_seed(0)
    lm = build_model("toy-xs", tok, max_position_embeddings=256).eval()
    save_model(lm, tok, tmp_path / "lm")
    rm = reward_model_from(tmp_path / "lm", tok)
    torch.nn.init.normal_(rm.score.weight)
    convs = [
        [{"role": "user", "content": "What is 12 plus 23?"}],
        [{"role": "user", "content": "Hi"}],
    ]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)
    picked = best_of_n(lm, tok, rm, tok, convs, 4, params)
    assert len(picked) == 2
    for conv, b in zip(convs, picked, strict=True):
        assert len(b.rewards) == 4 and b.reward == max(b.rewards)
        again = score(rm, tok, [conv] * 4, [g.text.strip() for g in b.samples])
        assert again == pytest.approx(b.rewards, abs=1e-5)
        assert b.best is b.samples[b.index]


def test_best_of_k_expectation_equals_every_subset_enumerated():
    import itertools
    import random

    rng = random.Random(0)
    for n in (1, 2, 5, 7):
        # ties in the reward on purpose: the first of equals wins, as best_index decides
        rewards = [float(rng.randint(0, 3)) for _ in range(n)]
        values = [rng.random() for _ in range(n)]
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(values[s[best_index([rewards[j] for j in s])]] for s in subsets)
            assert best_of_k_expectation(rewards, values, k) == pytest.approx(brute / len(subsets))
        assert best_of_k_expectation(rewards, values, 1) == pytest.approx(sum(values) / n)
        assert best_of_k_expectation(rewards, values, n) == values[best_index(rewards)]
    with pytest.raises(ValueError, match="k=3"):
        best_of_k_expectation([1.0, 2.0], [0.0, 1.0], 3)
