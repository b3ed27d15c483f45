"""Task and Check: the records that flow from the world to every stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

FAMILIES = ("arithmetic", "string", "knowledge", "safety", "open")
SPLITS = ("train", "rl", "eval")


@dataclass(frozen=True)
class Task:
    """One prompt with its gold truth.

    `reference` is an ideal assistant reply (it scores 1 under `check`); `gold` holds what the
    checker needs (answer, known, harmful, topic, ...) and is JSON-serialisable.
    """

    prompt_id: str
    family: str
    split: str
    prompt: str
    reference: str
    gold: dict[str, Any] = field(default_factory=dict)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_id": self.prompt_id,
            "family": self.family,
            "split": self.split,
            "prompt": self.prompt,
            "reference": self.reference,
            "gold": dict(self.gold),
            "messages": self.messages(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Task:
        prompt = d.get("prompt")
        if prompt is None:  # a bare chat record: the prompt is the first user message
            prompt = next(m["content"] for m in d["messages"] if m["role"] == "user")
        return cls(
            prompt_id=d["prompt_id"],
            family=d["family"],
            split=d.get("split", ""),
            prompt=prompt,
            reference=d.get("reference", ""),
            gold=dict(d.get("gold", {})),
        )


class Check(NamedTuple):
    """A checker's verdict: `score` in [0, 1] and the components it was computed from."""

    score: float
    components: dict[str, float | bool]


def first_per_family(items: list, n: int | None) -> list:
    """The first n items of each family (all when n is None), in order. Items are Tasks or
    records with a "family" key (one without counts under family "")."""
    seen: dict[str, int] = {}
    out = []
    for it in items:
        fam = it.get("family", "") if isinstance(it, dict) else it.family
        seen[fam] = seen.get(fam, 0) + 1
        if n is None or seen[fam] <= n:
            out.append(it)
    return out
