"""Simulated annotators (in the spirit of AlpacaFarm): gold quality plus configurable biases.

An annotator's utility for a response is

    gold * check(task, text).score + length * log1p(words) + bullets * min(bullet lines, 5)
    + flattery * [flattery marker] + hedging * [hedge marker] + refusal * [refusal marker]
    + borderline_refusal * [refusal marker] * [a borderline request]

where borderline_refusal is a value of the annotator's group (PoolConfig.groups, 0 unless set)
and a borderline request is a benign look-alike of the safety family ("kill a Python process"),
which gold says to help with: how readily such a request should be refused is a value on which
groups of people differ (Roettger et al. 2308.01263, XSTest), so a group may hold it.

To rank candidates it adds `temperature` * Gumbel noise to each utility, decides every pair
(i, j) by utility (a tie when |difference| <= tie_margin), flips each non-tie preference with
probability `noise`, and orders candidates by Copeland score (pairwise wins, a tie counting
half). Candidates with equal score form a tie group, so with two candidates a ranking is exactly
one (possibly flipped) comparison.

Randomness comes only from make_rng(seed, "annotator", name, key), where key is the prompt id:
results are deterministic and do not depend on call order. The stream always draws one Gumbel
per candidate and then one uniform per pair (i < j, row-major), whatever the settings, so two
annotators that differ only in their weights see the same noise (common random numbers).

A Pool assigns `per_prompt` annotators to each prompt, drawn without replacement with chance
proportional to `weight`, from make_rng(seed, "pool", "assign", prompt_id).
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import Field, model_validator

from posttrain.settings import SettingError, StrictModel
from posttrain.world.checkers import (
    _BULLET,
    FLATTERY_MARKERS,
    REFUSAL_MARKERS,
    check,
    has_marker,
)
from posttrain.world.config import make_rng
from posttrain.world.task import Task

HEDGE_MARKERS = (
    "maybe", "perhaps", "i think", "possibly", "might be", "probably", "it depends",
)  # fmt: skip
_HEDGE = re.compile(
    r"\b(?:" + "|".join(r"\s+".join(map(re.escape, m.split())) for m in HEDGE_MARKERS) + r")\b",
    re.IGNORECASE,
)
BULLET_CAP = 5  # bullet lines beyond this add nothing to the utility

Order = list[int | list[int]]


class AnnotatorConfig(StrictModel):
    """One simulated annotator: weights on gold quality and on surface features, plus noise."""

    name: str = Field(min_length=1, description="Annotator name; unique within a pool.")
    group: str = Field(
        "default",
        description="Population the annotator belongs to (e.g. groups whose values differ).",
    )
    weight: float = Field(
        1.0, gt=0.0, description="Relative chance of being assigned a prompt in a pool."
    )
    gold: float = Field(1.0, description="Weight on the gold score check(task, text).score.")
    length: float = Field(0.0, description="Weight on log1p(number of words).")
    bullets: float = Field(0.0, description=f"Weight on min(number of bullet lines, {BULLET_CAP}).")
    flattery: float = Field(0.0, description="Weight on a flattery marker being present (1/0).")
    hedging: float = Field(0.0, description="Weight on a hedging marker being present (1/0).")
    refusal: float = Field(
        0.0, description="Weight on a refusal marker being present (1/0); < 0 dislikes refusals."
    )
    noise: float = Field(
        0.0, ge=0.0, le=0.5, description="Probability that each pairwise preference is flipped."
    )
    temperature: float = Field(
        0.0, ge=0.0, description="Scale of the Gumbel noise added to utilities before comparing."
    )
    tie_margin: float = Field(
        0.0,
        ge=0.0,
        description="A pair whose |utility difference| (after noise) is <= this is a tie.",
    )


class GroupValues(StrictModel):
    """What every annotator of one group values, on top of the annotator's own weights."""

    borderline_refusal: float = Field(
        0.0,
        description="Utility of refusing a borderline request (a benign look-alike of the safety "
        "family, which gold says to help with): > 0, the group holds that such requests should "
        "be refused; at 1.0 a refusal is worth what gold gives a helpful answer.",
    )


class PoolConfig(StrictModel):
    """A pool of annotators and how many of them label each prompt."""

    annotators: list[AnnotatorConfig] = Field(
        min_length=1, description="The annotators; names must be unique."
    )
    per_prompt: int = Field(
        1, ge=1, description="Annotators labelling each prompt (drawn without replacement)."
    )
    seed: int = Field(0, description="Seed for assignment and for every annotator's noise.")
    # Left out of the resolved config while empty, so that rank stages cached before it existed
    # stay cached.
    groups: dict[str, GroupValues] = Field(
        default_factory=dict,
        exclude_if=lambda v: not v,
        description="Values a whole group holds: group name -> GroupValues ({}: none).",
    )

    @model_validator(mode="after")
    def _check_pool(self) -> PoolConfig:
        names = [a.name for a in self.annotators]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"annotator names must be unique; duplicated: {dupes}")
        if self.per_prompt > len(self.annotators):
            raise ValueError(
                f"per_prompt ({self.per_prompt}) must be <= the number of annotators "
                f"({len(self.annotators)})"
            )
        have = {a.group for a in self.annotators}
        for g in self.groups:
            if g not in have:
                raise SettingError(f"groups.{g}", f"no annotator of {{at}}annotators is in group "
                                   f"{g!r} (groups: {sorted(have)}), so its values have no "
                                   "effect: fix the name, or drop it")  # fmt: skip
        return self


def features(text: str) -> dict[str, float]:
    """Surface features of a response.

    words: whitespace-separated words; log_length: log1p(words); bullets: list lines (uncapped;
    the utility caps them at BULLET_CAP); flattery / hedging / refusal: 1.0 if a marker is present.
    Flattery and refusal use the checkers' substring markers; hedging matches HEDGE_MARKERS as
    whole words/phrases, case-insensitively.
    """
    words = len(text.split())
    return {
        "words": float(words),
        "log_length": math.log1p(words),
        "bullets": float(len(_BULLET.findall(text))),
        "flattery": float(has_marker(text, FLATTERY_MARKERS)),
        "hedging": float(_HEDGE.search(text) is not None),
        "refusal": float(has_marker(text, REFUSAL_MARKERS)),
    }


def _gumbel(rng) -> float:
    u = rng.random()
    while u == 0.0:  # random() is in [0, 1); -log(-log(0)) is undefined
        u = rng.random()
    return -math.log(-math.log(u))


def _prompt_id(task: Task | dict[str, Any]) -> str:
    return task.prompt_id if isinstance(task, Task) else task["prompt_id"]


def borderline(task: Task | dict[str, Any]) -> bool:
    """A benign look-alike of the safety family: harm verbs on a harmless object."""
    family, gold = (task.family, task.gold) if isinstance(task, Task) else (task["family"],
                                                                            task["gold"])  # fmt: skip
    return family == "safety" and not gold.get("harmful", True)


class Annotator:
    """A simulated annotator; `seed` and the key (prompt id) fix all of its randomness.
    `values`: those of its group (none: GroupValues' defaults)."""

    def __init__(self, cfg: AnnotatorConfig, seed: int, values: GroupValues | None = None):
        self.cfg = cfg
        self.seed = seed
        self.values = values or GroupValues()

    @property
    def name(self) -> str:
        return self.cfg.name

    def utility(self, task: Task | dict[str, Any], text: str) -> float:
        """Deterministic utility of `text` for `task` (no noise)."""
        c, f = self.cfg, features(text)
        u = (
            c.gold * check(task, text).score
            + c.length * f["log_length"]
            + c.bullets * min(f["bullets"], BULLET_CAP)
            + c.flattery * f["flattery"]
            + c.hedging * f["hedging"]
            + c.refusal * f["refusal"]
        )
        if self.values.borderline_refusal and f["refusal"] and borderline(task):
            u += self.values.borderline_refusal
        return u

    def rank(self, task: Task | dict[str, Any], texts: list[str], key: str) -> Order:
        """Order of candidate indices, best first; a tie group is a sorted list, e.g. [2, [0, 3], 1]."""
        c = self.cfg
        rng = make_rng(self.seed, "annotator", c.name, key)
        n = len(texts)
        gumbels = [_gumbel(rng) for _ in range(n)]
        utils = [
            self.utility(task, t) + c.temperature * g for t, g in zip(texts, gumbels, strict=True)
        ]
        score = [0] * n  # doubled Copeland score: 2 per win, 1 per tie (exact integers)
        for i in range(n):
            for j in range(i + 1, n):
                flip = rng.random() < c.noise
                diff = utils[i] - utils[j]
                if abs(diff) <= c.tie_margin:
                    score[i] += 1
                    score[j] += 1
                    continue
                i_wins = (diff > 0) != flip
                score[i if i_wins else j] += 2
        order: Order = []
        for s in sorted(set(score), reverse=True):
            tier = [i for i in range(n) if score[i] == s]
            order.append(tier[0] if len(tier) == 1 else tier)
        return order

    def compare(self, task: Task | dict[str, Any], a: str, b: str, key: str) -> str:
        """Pairwise preference between two responses: "a", "b" or "tie"."""
        first = self.rank(task, [a, b], key)[0]
        if isinstance(first, list):
            return "tie"
        return "a" if first == 0 else "b"


class Pool:
    """Annotators plus a seeded, weight-proportional assignment of annotators to prompts."""

    def __init__(self, cfg: PoolConfig):
        self.cfg = cfg
        self.annotators = [Annotator(a, cfg.seed, cfg.groups.get(a.group)) for a in cfg.annotators]

    def assign(self, prompt_id: str) -> list[Annotator]:
        """`per_prompt` distinct annotators for this prompt, drawn without replacement with
        chance proportional to weight; deterministic given the seed and prompt id. Returned in
        pool order."""
        rng = make_rng(self.cfg.seed, "pool", "assign", prompt_id)
        left = list(range(len(self.annotators)))
        chosen: list[int] = []
        for _ in range(self.cfg.per_prompt):
            weights = [self.annotators[i].cfg.weight for i in left]
            r = rng.random() * sum(weights)
            pick = len(left) - 1  # guards against float round-off at the top end
            for k, w in enumerate(weights):
                if r < w:
                    pick = k
                    break
                r -= w
            chosen.append(left.pop(pick))
        return [self.annotators[i] for i in sorted(chosen)]

    def rank(self, task: Task | dict[str, Any], texts: list[str]) -> list[dict[str, Any]]:
        """One record per assigned annotator: {"prompt_id", "annotator", "group", "order"}."""
        pid = _prompt_id(task)
        return [
            {
                "prompt_id": pid,
                "annotator": a.cfg.name,
                "group": a.cfg.group,
                "order": a.rank(task, texts, pid),
            }
            for a in self.assign(pid)
        ]
