"""Safety and open requests: (prompt, reference, gold) per split.

Safety: eval uses phrasings, harm targets and benign actions that train and rl never see
(`gold["heldout"]`), so memorising training prompts is not enough. Open: every prompt is
on-topic-answerable; style (length, bullets, flattery) carries no gold value.
"""

from __future__ import annotations

import random
from typing import Any

from posttrain.world.config import WorldConfig, make_rng
from posttrain.world.lexicon import PEOPLE
from posttrain.world.requests_lexicon import (
    BENIGN,
    HARM_TARGETS,
    HARM_VERBS,
    HELDOUT,
    OPEN_PHRASINGS,
    OPEN_TOPICS,
    PHRASINGS,
    REFUSAL_REFERENCE,
)

Item = tuple[str, str, dict[str, Any]]


def _holdout(rng: random.Random, items: tuple[str, ...] | list[str], k: int) -> tuple[list, list]:
    """Split `items` into (kept for train/rl, held out for eval) with `k` held out."""
    order = list(items)
    rng.shuffle(order)
    return order[k:], order[:k]


def _safety_pool(phrasings: list[str], targets: list[str], benign: list[str], heldout: bool):
    harmful: list[Item] = []
    for p in phrasings:
        for verb in HARM_VERBS:
            for target in targets:
                gold = {"harmful": True, "phrasing": p, "object": target, "verb": verb}
                harmful.append((p.format(x=f"{verb} {target}"), REFUSAL_REFERENCE, gold))
    helpful: list[Item] = []
    for p in phrasings:
        for action in benign:
            gold = {"harmful": False, "phrasing": p, "object": action, "verb": action.split()[0]}
            helpful.append((p.format(x=action), BENIGN[action], gold))
    for _, _, gold in harmful + helpful:
        gold["heldout"] = heldout
    return harmful, helpful


def _take(pool: list[Item], n: int) -> tuple[list[Item], list[Item]]:
    return pool[:n], pool[n:]


def safety_items(cfg: WorldConfig) -> dict[str, list[Item]]:
    rng = make_rng(cfg.seed, "tasks", "safety")
    phr_seen, phr_held = _holdout(rng, PHRASINGS, HELDOUT["phrasings"])
    tgt_seen, tgt_held = _holdout(rng, HARM_TARGETS, HELDOUT["targets"])
    ben_seen, ben_held = _holdout(rng, tuple(BENIGN), HELDOUT["benign"])
    # train and rl threaten the seen targets and the corpus's other everyday people too: with 40+
    # different victims the rule to learn is "a harm verb on a person", not a list of 12 names
    pools = {
        "eval": _safety_pool(phr_held, tgt_held, ben_held, heldout=True),
        "seen": _safety_pool(phr_seen, tgt_seen + list(PEOPLE), ben_seen, heldout=False),
    }
    for harmful, helpful in pools.values():
        rng.shuffle(harmful)
        rng.shuffle(helpful)
    out: dict[str, list[Item]] = {}
    for split, n in (("eval", cfg.n_eval), ("rl", cfg.n_rl), ("train", cfg.n_train)):
        harmful, helpful = pools["eval" if split == "eval" else "seen"]
        n_harm = round(n * cfg.harmful_share)
        if split == "eval":  # eval must hold both kinds
            n_harm = min(max(n_harm, 1), n - 1)
        picked_harm, harmful = _take(harmful, n_harm)
        picked_help, helpful = _take(helpful, n - n_harm)
        if split != "eval":
            pools["seen"] = (harmful, helpful)
        items = picked_harm + picked_help
        rng.shuffle(items)
        out[split] = items
    return out


def open_items(cfg: WorldConfig) -> dict[str, list[Item]]:
    rng = make_rng(cfg.seed, "tasks", "open")
    pool: list[Item] = []
    for topic, (keyword, reference) in OPEN_TOPICS.items():
        for p in OPEN_PHRASINGS:
            pool.append((p.format(t=topic), reference, {"topic": topic, "keyword": keyword}))
    rng.shuffle(pool)
    return allocate(pool, cfg)


def allocate(pool: list, cfg: WorldConfig) -> dict[str, list]:
    """Slice a shuffled pool into eval, rl, train (in that order, so eval is never starved)."""
    out = {}
    for split, n in (("eval", cfg.n_eval), ("rl", cfg.n_rl), ("train", cfg.n_train)):
        out[split], pool = pool[:n], pool[n:]
    return out
