"""Distillation data: a teacher answers the user's prompts (Alpaca / Vicuna style SFT data).

With `n` > 1 and a scorer, this is rejection sampling (best-of-n): the teacher samples n
answers per prompt and a scorer picks what to keep:
- `judge`: an LLM judge's single-answer score (posttrain.eval.judge);
- `reward_model`: a posttrain reward model directory (a `reward` stage's model);
- `verifier`: `world` (the toy world's gold checker; prompts must be world tasks with gold) or
  `gsm8k` (prompts with a `reference` number).
`keep: best` writes each prompt's highest-scoring answer (ties: the first sampled), `all`
every answer that passes `min_score` (every answer when no scorer is given), `passing` the
first answer that passes `min_score` (a verifier's pass is a score of 1). Output: a chat JSONL
the `sft` stage reads (the prompt's messages plus the answer), and `<out>.lineage.json` with
the teacher, the scorer, the counts and the resolved settings. Logit distillation, where the
student matches the teacher's full distribution, is `sft.distill`.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from posttrain.eval.judge import JudgeConfig
from posttrain.generate.client import ClientConfig, make_client
from posttrain.generate.requests import ChatRequest
from posttrain.settings import SettingError, StrictModel, is_set


class AnswersConfig(StrictModel):
    teacher: ClientConfig = Field(description="The model that answers.")
    prompts: str = Field(
        description="Prompts: chat records ({messages}) or {prompt} records, any readable format."
    )
    n: int = Field(1, ge=1, description="Answers sampled per prompt.")
    temperature: float = Field(0.7, ge=0, le=2, description="The teacher's sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="The teacher's nucleus sampling.")
    max_tokens: int = Field(256, ge=1, description="Most tokens of an answer.")
    judge: JudgeConfig | None = Field(None, description="Score answers with an LLM judge.")
    reward_model: str | None = Field(None, description="Score answers with this reward model.")
    verifier: Literal["world", "gsm8k"] | None = Field(
        None, description="Score answers 1/0 with a verifier."
    )
    keep: Literal["best", "all", "passing"] = Field(
        "best", description="best: each prompt's top answer; all: every passing answer; "
        "passing: each prompt's first passing answer."
    )  # fmt: skip
    min_score: float | None = Field(
        None, description="Answers scoring below this are dropped (a verifier's: 1)."
    )
    drop_truncated: bool = Field(True, description="Drop answers cut off by max_tokens.")
    limit: int | None = Field(None, ge=1, description="Only the first N prompts.")
    seed: int = Field(0, description="Seeds the teacher's sampling (per prompt: seed + index).")

    @model_validator(mode="after")
    def _scorer(self) -> AnswersConfig:
        given = [k for k in ("judge", "reward_model", "verifier") if getattr(self, k) is not None]
        if len(given) > 1:
            raise SettingError(given[1], f"{{at}}goes with {{at}}{given[0]}: give one scorer")
        if not given:
            if is_set(self, "min_score"):
                raise SettingError(
                    "min_score", "{at}needs a scorer (judge, reward_model, verifier)"
                )
            if self.keep == "best" and self.n > 1:
                raise SettingError("n", "{at}> 1 with no scorer: keep: best needs a scorer to "
                                   "pick the best of n (judge, reward_model, verifier), or set "
                                   "{at}keep: all")  # fmt: skip
            if self.keep == "passing":
                raise SettingError("keep", "{at}passing needs a scorer")
        if self.verifier is not None and is_set(self, "min_score"):
            raise SettingError("min_score", "{at}is 1 for a verifier (pass/fail): drop it")
        return self

    @property
    def scorer(self) -> str | None:
        for k in ("judge", "reward_model", "verifier"):
            if getattr(self, k) is not None:
                return k
        return None


def _scores(cfg: AnswersConfig, prompts: list[dict], texts: list[str], cache_dir) -> list:
    """One score per (prompt, text); None where a judge's reply held no score."""
    if cfg.judge is not None:
        from posttrain.eval.judge import Judge

        return Judge(cfg.judge, cache_dir).score(
            [(p["messages"], t) for p, t in zip(prompts, texts, strict=True)]
        )
    if cfg.reward_model is not None:
        from posttrain.rl.rewards import ModelReward

        return [r["reward"] for r in ModelReward(cfg.reward_model)(prompts, texts)]
    if cfg.verifier is not None:
        from posttrain.rl.rewards import GSM8KVerifier, WorldVerifier

        verify = WorldVerifier() if cfg.verifier == "world" else GSM8KVerifier()
        return [float(r["correct"]) for r in verify(prompts, texts)]
    return [None] * len(texts)


def generate_answers(cfg: AnswersConfig, out: str | Path, cache_dir: Path | None = None,
                     log=print) -> dict:  # fmt: skip
    """Write `out` (chat JSONL) and `<out>.lineage.json`; return the counts."""
    from posttrain.data.readers import load_prompts
    from posttrain.io import atomic_write_json, atomic_write_jsonl
    from posttrain.synth.self_instruct import lineage_path

    t0 = time.perf_counter()
    prompts = load_prompts(cfg.prompts, cfg.limit)
    teacher = make_client(cfg.teacher, cache_dir=cache_dir)
    reqs = [
        ChatRequest(messages=p["messages"], n=cfg.n, temperature=cfg.temperature,
                    top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=cfg.seed + i)
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    log(f"answers: {len(reqs)} prompts x {cfg.n} from {teacher.name}")
    responses = teacher.chat(reqs)
    flat = [(i, c) for i, r in enumerate(responses) for c in r.choices]
    dropped: Counter = Counter()
    usable = []
    for i, c in flat:
        if not c.text.strip():
            dropped["empty"] += 1
        elif cfg.drop_truncated and c.finish_reason == "length":
            dropped["truncated"] += 1
        else:
            usable.append((i, c.text.strip()))
    scores = _scores(cfg, [prompts[i] for i, _ in usable], [t for _, t in usable], cache_dir)
    threshold = 1.0 if cfg.verifier is not None else cfg.min_score
    per_prompt: dict[int, list] = {}
    for (i, text), s in zip(usable, scores, strict=True):
        if cfg.scorer is not None and s is None:
            dropped["unscored"] += 1
        elif threshold is not None and s < threshold:
            dropped["below_min_score"] += 1
        else:
            per_prompt.setdefault(i, []).append((text, s))
    records = []
    for i, p in enumerate(prompts):
        cands = per_prompt.get(i, [])
        if not cands:
            continue
        if cfg.keep == "best" and cfg.scorer is not None:
            top = max(range(len(cands)), key=lambda j: cands[j][1])  # first of equal maxima
            cands = [cands[top]]
        elif cfg.keep in ("best", "passing"):
            cands = cands[:1]
        for text, s in cands:
            rec = {"prompt_id": p["prompt_id"],
                   "messages": [*p["messages"], {"role": "assistant", "content": text}]}  # fmt: skip
            if s is not None:
                rec["score"] = s
            records.append(rec)
    counts = {
        "prompts": len(prompts),
        "answers_sampled": len(flat),
        "dropped": dict(dropped),
        "prompts_answered": len({r["prompt_id"] for r in records}),
        "examples_written": len(records),
        "mean_kept_score": (
            sum(r["score"] for r in records) / len(records)
            if records and cfg.scorer is not None else None
        ),
        "seconds": round(time.perf_counter() - t0, 2),
    }  # fmt: skip
    lineage = {
        "method": "distillation: teacher answers" + (f", {cfg.scorer} picks" if cfg.scorer else ""),
        "teacher": teacher.name,
        "scorer": cfg.scorer,
        "counts": counts,
        "client": teacher.stats,
        "config": cfg.model_dump(mode="json"),
    }
    atomic_write_jsonl(out, records)
    atomic_write_json(lineage_path(out), lineage)
    return counts
