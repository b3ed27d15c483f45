"""Rewards for online RL: functions from (prompt records, responses) to component dicts.

Every reward returns one dict per response with at least {"reward": float}; other keys are
components worth logging (a verifier's `correct`, a reward model's raw score). Four kinds:
- `ModelReward`: a learned reward model (posttrain.models.reward), the classic RLHF reward;
- `WorldVerifier`: the toy world's gold checker (verifiable rewards, as in GRPO on maths);
- `GSM8KVerifier`: exact match of the last number in a response against the number after
  `####` in a GSM8K reference answer;
- `FunctionReward`: the user's own Python function, named `module:function` (TRL's
  `reward_funcs`), called on each (prompt record, response);
- `JudgeReward`: an LLM judge's single-answer score, scaled to [0, 1] (RLAIF).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Protocol

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


class Reward(Protocol):
    def __call__(self, prompts: list[dict], responses: list[str]) -> list[dict]: ...


def _number(text: str) -> str | None:
    """A number as written ("1,234", "-3.50") normalised: no commas, no trailing zeros."""
    text = text.replace(",", "")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or None


def gsm8k_reference(answer: str) -> str | None:
    """The final answer of a GSM8K reference: the number after the last '####'."""
    if "####" not in answer:
        return None
    found = _NUMBER.findall(answer.rsplit("####", 1)[1])
    return _number(found[0]) if found else None


def last_number(text: str) -> str | None:
    """The last number in a response, normalised like gsm8k_reference."""
    found = _NUMBER.findall(text)
    return _number(found[-1]) if found else None


def load_gsm8k_prompts(path: str | Path, limit: int | None = None) -> list[dict]:
    """GSM8K {"question", "answer"} records (JSONL, Parquet, a datasets folder) as prompt records with the reference number."""
    from posttrain.data.schema import DataError
    from posttrain.data.tables import read_records

    out = []
    for i, (where, rec) in enumerate(read_records(path), 1):
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str):
            raise DataError(f"{where}: a GSM8K record needs a 'question' string")
        ref = gsm8k_reference(rec.get("answer", ""))
        if ref is None:
            raise DataError(f"{where}: 'answer' has no final number after '####'")
        out.append({"prompt_id": f"gsm8k/{i}", "messages": [{"role": "user", "content": rec["question"]}],
                    "reference": ref})  # fmt: skip
    return out[:limit] if limit else out


class GSM8KVerifier:
    """1.0 when the response's last number equals the prompt's `reference`, else 0.0."""

    def __call__(self, prompts: list[dict], responses: list[str]) -> list[dict]:
        out = []
        for p, r in zip(prompts, responses, strict=True):
            if "reference" not in p:
                raise ValueError(
                    f"prompt {p.get('prompt_id')!r} has no 'reference' answer to verify"
                )
            got = last_number(r)
            out.append({"reward": float(got == p["reference"]), "correct": got == p["reference"]})
        return out


class WorldVerifier:
    """The toy world's gold checker: reward = check(task, response).score."""

    def __call__(self, prompts: list[dict], responses: list[str]) -> list[dict]:
        from posttrain.world import check

        out = []
        for p, r in zip(prompts, responses, strict=True):
            if "gold" not in p:
                raise ValueError(f"prompt {p.get('prompt_id')!r} is not a toy-world task (no gold)")
            c = check({"family": p["family"], "gold": p["gold"]}, r)
            out.append({"reward": c.score, "correct": bool(c.components["correct"])})
        return out


class FunctionReward:
    """A Python function named "package.module:function" (importable: on sys.path, e.g. via
    PYTHONPATH), called as fn(prompt_record, response) -> float, or -> a dict with the float
    under "reward" and components to log."""

    def __init__(self, path: str):
        import importlib

        module, sep, name = path.partition(":")
        if not (sep and module and name):
            raise ValueError(f"reward function {path!r}: expected 'module:function'")
        fn = getattr(importlib.import_module(module), name, None)
        if not callable(fn):
            raise ValueError(f"reward function {path!r}: {module} has no function {name!r}")
        self.path, self.fn = path, fn

    def __call__(self, prompts: list[dict], responses: list[str]) -> list[dict]:
        out = []
        for p, r in zip(prompts, responses, strict=True):
            got = self.fn(p, r)
            comps = dict(got) if isinstance(got, dict) else {"reward": got}
            try:
                reward = float(comps["reward"])
            except (KeyError, TypeError, ValueError):
                reward = math.nan
            if not math.isfinite(reward):
                raise ValueError(
                    f"reward function {self.path}: expected a finite float (or a dict with one "
                    f"under 'reward') for prompt {p.get('prompt_id')!r}, got {got!r}"
                )
            out.append(comps | {"reward": reward})
        return out


class JudgeReward:
    """An LLM judge (posttrain.eval.judge) scores each response on its scale; the reward is the
    score scaled to [0, 1], and 0 where the judge's reply holds no readable score (counted in
    the `judge_unreadable` component)."""

    def __init__(self, cfg, cache_dir=None):
        from posttrain.eval.judge import Judge

        self.judge = Judge(cfg, cache_dir)
        self.low, self.high = cfg.scale

    def __call__(self, prompts: list[dict], responses: list[str]) -> list[dict]:
        scores = self.judge.score(
            [(p["messages"], r) for p, r in zip(prompts, responses, strict=True)]
        )
        out = []
        for s in scores:
            scaled = 0.0 if s is None else (s - self.low) / (self.high - self.low)
            out.append({"reward": scaled, "judge_score": float(self.low if s is None else s),
                        "judge_unreadable": float(s is None)})  # fmt: skip
        return out


class ModelReward:
    """A learned reward model's score of the prompt and response."""

    def __init__(self, path: str | Path, device="cpu", batch_size: int = 32):
        from posttrain.models.reward import reward_model_from
        from posttrain.models.tokenizer import load_tokenizer

        self.tok = load_tokenizer(path)
        self.model = reward_model_from(path, self.tok, device).eval().requires_grad_(False)
        self.batch_size = batch_size

    def __call__(self, prompts: list[dict], responses: list[str]) -> list[dict]:
        from posttrain.models.reward import score

        scores = score(
            self.model, self.tok, [p["messages"] for p in prompts], responses, self.batch_size
        )
        return [{"reward": s, "rm_score": s} for s in scores]

    def score_tokens(self, seqs: list) -> list[dict]:
        """Scores of the policy's own token sequences (prompt + response as sampled, stop token
        included), for plain prompts, where no chat template frames the text; the tokenizers
        must be the same (checked by the caller)."""
        from posttrain.models.reward import score_sequences

        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        scores = score_sequences(self.model, seqs, pad, self.batch_size)
        return [{"reward": s, "rm_score": s} for s in scores]


def gold_scores(prompts: list[dict], responses: list[str]) -> list[float] | None:
    """Toy-world gold of each response, for diagnostics (None unless every prompt has gold)."""
    if not prompts or not all("gold" in p for p in prompts):
        return None
    return [r["reward"] for r in WorldVerifier()(prompts, responses)]
