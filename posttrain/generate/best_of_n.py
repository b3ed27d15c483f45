"""Best-of-n: sample n responses, score them with a reward model, keep the best.

The simplest use of a reward model, and a strong baseline for RL: its KL from the sampling
policy is at most log n - (n - 1) / n (Stiennon et al. 2020; Beirami et al. 2024 show it is
an upper bound), so n fixes how far it can move from the policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from posttrain.generate.decode import Generation


def kl_bound(n: int) -> float:
    """The analytic KL(best-of-n || policy) bound log n - (n - 1) / n; 0 at n = 1."""
    if n < 1:
        raise ValueError(f"best-of-n: n={n} must be >= 1")
    return math.log(n) - (n - 1) / n


def best_index(rewards: list[float]) -> int:
    """Index of the highest reward; the first of equals."""
    return max(range(len(rewards)), key=lambda j: (rewards[j], -j))


def best_of_k_expectation(rewards: list[float], values: list[float], k: int) -> float:
    """E[value of the best-of-k] for k of these n samples drawn without replacement, exactly.

    The best of a subset is its highest reward (the first of equals, as best_index). Ranked by
    that order from the bottom (i = 1..n), sample i wins a k-subset iff the subset holds it and
    k - 1 of the i - 1 below it: probability C(i-1, k-1) / C(n, k) (Gao et al. 2023, eq. 6).
    """
    n = len(rewards)
    if len(values) != n or not 1 <= k <= n:
        raise ValueError(f"best-of-k: k={k} with {n} rewards and {len(values)} values")
    order = sorted(range(n), key=lambda j: (rewards[j], -j))  # worst first
    total = math.comb(n, k)
    return sum(math.comb(i, k - 1) * values[j] for i, j in enumerate(order)) / total


@dataclass
class BestOfN:
    best: Generation
    index: int  # which of the n samples won
    rewards: list[float]  # reward of every sample, in sample order
    samples: list[Generation]

    @property
    def reward(self) -> float:
        return self.rewards[self.index]


def best_of_n(policy, tokenizer, reward_model, rm_tokenizer, conversations: list[list[dict]],
              n: int, params) -> list[BestOfN]:  # fmt: skip
    """For each conversation (ending with a user turn): n samples, their rewards, the best (the
    first of equals)."""
    from posttrain.generate.decode import sample_n
    from posttrain.models.reward import score

    prompts = [
        tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
        for m in conversations
    ]
    groups = sample_n(policy, tokenizer, prompts, n, params)
    flat_convs = [c for c in conversations for _ in range(n)]
    rewards = score(
        reward_model, rm_tokenizer, flat_convs, [g.text.strip() for grp in groups for g in grp]
    )
    out = []
    for i, grp in enumerate(groups):
        rs = rewards[i * n : (i + 1) * n]
        k = best_index(rs)
        out.append(BestOfN(grp[k], k, rs, grp))
    return out
