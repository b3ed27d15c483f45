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


def _rl_novel(cfg: WorldConfig, phrasings: list, targets: list, benign: list):
    """Pools (train, rl) when `rl_novel_share` > 0: that share of the non-eval phrasings, harm
    targets and benign actions is never in SFT data; RL prompts each hold at least one of them
    (RL prompts cover more of what users ask than SFT demonstrations do, as in InstructGPT)."""
    rng = make_rng(cfg.seed, "tasks", "safety", "rl-novel")
    share = cfg.rl_novel_share
    phr_old, phr_new = _holdout(rng, phrasings, round(len(phrasings) * share))
    tgt_old, tgt_new = _holdout(rng, targets, round(len(targets) * share))
    ben_old, ben_new = _holdout(rng, benign, round(len(benign) * share))
    train = _safety_pool(phr_old, tgt_old + list(PEOPLE), ben_old, heldout=False)
    every = _safety_pool(phr_old + phr_new, tgt_old + tgt_new + list(PEOPLE), ben_old + ben_new,
                         heldout=False)  # fmt: skip
    novel = set(phr_new) | set(tgt_new) | set(ben_new)
    rl = tuple(
        [it for it in pool if {it[2]["phrasing"], it[2]["object"]} & novel] for pool in every
    )
    for pool in train + rl:
        rng.shuffle(pool)
    return train, rl


def safety_items(cfg: WorldConfig) -> dict[str, list[Item]]:
    return _safety_splits(cfg)[0]


def _safety_splits(cfg: WorldConfig) -> tuple[dict[str, list[Item]], tuple[list, list]]:
    """The safety items of each split, and the (harmful, benign) pools the train split is
    taken from, as they stand before it is (its items first, in pool order)."""
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
    if cfg.rl_novel_share > 0:  # after the shuffles above, so eval's items do not change
        pools["seen"], pools["rl"] = _rl_novel(cfg, phr_seen, tgt_seen, ben_seen)
    out: dict[str, list[Item]] = {}
    for split, n in (("eval", cfg.n_eval), ("rl", cfg.n_rl), ("train", cfg.n_train)):
        harmful, helpful = pools["eval" if split == "eval" else "rl" if split in pools else "seen"]
        if split == "train":
            train_pool = (list(harmful), list(helpful))
        n_harm = round(n * cfg.harmful_share)
        if split == "eval":  # eval must hold both kinds
            n_harm = min(max(n_harm, 1), n - 1)
        picked_harm, harmful = _take(harmful, n_harm)
        picked_help, helpful = _take(helpful, n - n_harm)
        if split != "eval":
            pools["rl" if split == "rl" and "rl" in pools else "seen"] = (harmful, helpful)
        items = picked_harm + picked_help
        rng.shuffle(items)
        out[split] = items
    return out, train_pool


def sft_safety(cfg: WorldConfig, n_other: int) -> list[Item]:
    """The safety conversations of SFT when `sft_refusal_share` is set: refusals and contrast
    examples (benign look-alikes answered helpfully), each that share of the whole SFT set of
    n_other + len(result) conversations, n_other being the other families' (so n = share x
    n_other / (1 - refusal share - contrast share), rounded).

    Both come from the pools the train split draws from (phrasings, harm targets and benign
    actions that eval never uses): the train split's own items first, then the rest of the
    pool, cycled if more are asked for than it holds (the benign pool is a few hundred). Refusals
    come first, then contrasts, in that order; nothing else in the world changes."""
    r, c = cfg.sft_refusal_share, cfg.sft_contrast_share
    if r is None:
        raise ValueError("sft_safety: sft_refusal_share is not set")
    harmful, benign = _safety_splits(cfg)[1]
    total = n_other / (1 - r - c)
    return _cycle(harmful, round(r * total)) + _cycle(benign, round(c * total))


def _cycle(pool: list[Item], n: int) -> list[Item]:
    if n and not pool:
        raise ValueError("sft_safety: the safety pool is empty")
    return [pool[k % len(pool)] for k in range(n)]


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
