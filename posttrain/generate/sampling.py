"""Sampling parameters and the per-step choice of the next token (pure tensor functions).

The raw log-prob of the chosen token is always taken from the model's *unmodified* distribution
(temperature 1, no top-k/top-p): that is the number a later forward pass over prompt + response
reproduces, which is what SFT on samples, PPO's old_logps and calibration diagnostics need.
Temperature, top-k and top-p only change *which* token is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """How to decode. Validated on construction; a bad value raises ValueError naming the field."""

    max_new_tokens: int = 64  # most tokens generated per prompt, the stop token included
    temperature: float = 1.0  # divides the logits before sampling; 0 means greedy
    top_p: float = (
        1.0  # nucleus sampling (Holtzman et al. 2019): keep the smallest set with mass >= top_p
    )
    top_k: int = 0  # keep only the k most likely tokens; 0: off
    greedy: bool = False  # argmax decoding; same as temperature 0
    seed: int = 0  # seeds the sampling generator: same inputs + seed give identical outputs
    stop_token_ids: list[int] | None = None  # None: end_of_turn_ids(tokenizer); []: never stop
    batch_size: int = 32  # prompts decoded together (sorted by length to reduce padding)
    # Under torchrun: each rank decodes every W-th batch and all get every result (greedy only:
    # sampled outputs depend on the order the batches draw from the one generator).
    shared: bool = False
    # auto: generate/static.py (pre-allocated KV cache, our own pass over the layers) where it
    # reproduces the model (Llama, Mistral, Qwen2, Qwen3), else the model's forward with a
    # DynamicCache; hf: always the latter (for comparison).
    engine: str = "auto"

    def __post_init__(self):
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature >= 0, "must be >= 0 (0 means greedy)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 means off)"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("shared", not self.shared or self.is_greedy, "needs greedy decoding"),
            ("engine", self.engine in ("auto", "hf"), "must be 'auto' or 'hf'"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} {why}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf. (B, V) -> (B, V); k=0: no-op."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their mass reaches p. (B, V) -> (B, V).

    A token is dropped when the mass of the tokens strictly more likely than it already reaches p,
    so the top token is always kept (even for tiny p). p=1 is a no-op: skipping it avoids dropping
    tail tokens whose cumulative sum rounds to 1.0 in float32.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V) mass of better tokens
    drop_sorted = mass_before >= p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocab order
    return logits.masked_fill(drop, float("-inf"))


def sample_rows(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw from each row of probs (B, V) by inverting its CDF with one uniform per row.

    The same distribution as torch.multinomial(probs, 1), which on CPU draws an exponential for
    every entry (B x V random numbers: 15% of a small model's decoding step): a token is the
    first whose cumulative mass exceeds u x the row's total, so a token of zero mass, whose
    cumulative mass equals its predecessor's, is never the first to exceed it.
    """
    cdf = probs.cumsum(-1)  # (B, V)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)  # (B, 1)
    tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)  # (B,)
    tokens = tokens.clamp(max=probs.shape[-1] - 1)  # u x total rounded up to the total
    zero = probs.gather(-1, tokens[:, None]).squeeze(-1) <= 0  # only through that rounding
    return torch.where(zero, probs.argmax(-1), tokens)


def choose_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token of each row and its raw log-prob.

    logits: (B, V) for the last position, any float dtype.
    Returns (tokens (B,) long, logps (B,) float32) where logps = log p(token) at temperature 1.
    """
    raw_logps = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    if params.is_greedy:
        tokens = raw_logps.argmax(dim=-1)  # (B,)
    else:
        scaled = logits.float() / params.temperature
        scaled = filter_top_p(filter_top_k(scaled, params.top_k), params.top_p)
        probs = torch.softmax(scaled, dim=-1)  # (B, V), zero outside the kept set
        tokens = sample_rows(probs, generator)  # (B,)
    logps = raw_logps.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B,)
    return tokens, logps
