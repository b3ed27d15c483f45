"""Fictional entities, their facts, and the knowledge tasks about them.

Known entities' facts are stated in the corpus; each fact of the entity at Zipf rank r is stated
max(mention_min, round(mention_max / r^s)) times (`Entity.mentions`), cycling through phrasings
so every known fact appears in at least two. Unknown entities never appear in any corpus text;
the right answer about them is to abstain.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

from posttrain.world.config import WorldConfig, make_rng
from posttrain.world.lexicon import (
    ATTRIBUTE_VALUES,
    ATTRIBUTES,
    FACT_TEMPLATES,
    NAME_SYLLABLES,
    QUESTION_TEMPLATES,
    article,
)

ABSTAIN_REFERENCE = "I don't know."


@dataclass(frozen=True)
class Entity:
    """A fictional person: `mentions` = times each of its facts is stated in the train corpus."""

    name: str
    attributes: dict[str, str]
    known: bool
    mentions: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_names(rng: random.Random, n: int, reserved: set[str]) -> list[str]:
    """`n` unique capitalised names of 2-3 syllables, none in `reserved` (lowercase words)."""
    names: list[str] = []
    seen = set(reserved)
    while len(names) < n:
        k = 2 if rng.random() < 0.7 else 3
        name = "".join(rng.choice(NAME_SYLLABLES) for _ in range(k))
        if name not in seen:
            seen.add(name)
            names.append(name.capitalize())
    return names


def make_entities(cfg: WorldConfig, reserved: set[str]) -> list[Entity]:
    """The world's entities: the first round(n * known_fraction) (in a seeded order) are known."""
    rng = make_rng(cfg.seed, "entities")
    names = make_names(rng, cfg.n_entities, reserved)
    n_known = round(cfg.n_entities * cfg.known_fraction)
    ranks = list(range(1, n_known + 1))
    rng.shuffle(ranks)  # Zipf rank of each known entity, unrelated to its name
    entities = []
    for i, name in enumerate(names):
        attributes = {a: rng.choice(values) for a, values in ATTRIBUTE_VALUES.items()}
        mentions = 0
        if i < n_known:
            zipf = cfg.mention_max / ranks[i] ** cfg.zipf_exponent
            mentions = max(cfg.mention_min, round(zipf))
        entities.append(Entity(name, attributes, i < n_known, mentions))
    return entities


def fact_sentence(entity: Entity, attribute: str, template: int) -> str:
    value = entity.attributes[attribute]
    fmt = FACT_TEMPLATES[attribute][template]
    return fmt.format(n=entity.name, v=value, a=article(value))


def fact_sentences(entities: list[Entity], rng: random.Random) -> list[str]:
    """Every statement of every known fact, `mentions` times each, in a shuffled order.

    The first mentions of a fact use distinct phrasings (so >= 2 phrasings per fact).
    """
    out = []
    for e in entities:
        if not e.known:
            continue
        for attribute in ATTRIBUTES:
            n_templates = len(FACT_TEMPLATES[attribute])
            order = rng.sample(range(n_templates), n_templates)
            for m in range(e.mentions):
                template = order[m] if m < n_templates else rng.randrange(n_templates)
                out.append(fact_sentence(e, attribute, template))
    rng.shuffle(out)
    return out


def question(entity: Entity, attribute: str) -> str:
    return QUESTION_TEMPLATES[attribute].format(n=entity.name)


def _item(entity: Entity, attribute: str) -> tuple[str, str, dict[str, Any]]:
    gold = {
        "entity": entity.name,
        "attribute": attribute,
        "answer": entity.attributes[attribute],
        "known": entity.known,
        "mentions": entity.mentions,
    }
    reference = entity.attributes[attribute] if entity.known else ABSTAIN_REFERENCE
    return question(entity, attribute), reference, gold


def knowledge_items(cfg: WorldConfig, entities: list[Entity]) -> dict[str, list[tuple]]:
    """(prompt, reference, gold) per split.

    Known facts are split at the (entity, attribute) level: an eval fact is never asked in
    train or rl. Unknown entities are split at the entity level, so the model must learn to
    abstain on unfamiliar names rather than memorise which names to abstain on.
    """
    rng = make_rng(cfg.seed, "tasks", "knowledge")
    known_facts = [(e, a) for e in entities if e.known for a in ATTRIBUTES]
    unknown = [e for e in entities if not e.known]
    rng.shuffle(known_facts)
    rng.shuffle(unknown)
    counts = {"eval": cfg.n_eval, "rl": cfg.n_rl, "train": cfg.n_train}
    out: dict[str, list[tuple]] = {}
    for split, n in counts.items():
        n_unknown = round(n * cfg.unknown_share)
        if split == "eval":  # eval must hold both kinds
            n_unknown = min(max(n_unknown, 1), n - 1)
        picked_known, known_facts = known_facts[: n - n_unknown], known_facts[n - n_unknown :]
        n_entities = -(-n_unknown // len(ATTRIBUTES))  # ceil
        group, unknown = unknown[:n_entities], unknown[n_entities:]
        picked_unknown = [(e, a) for e in group for a in ATTRIBUTES][:n_unknown]
        items = [_item(e, a) for e, a in picked_known + picked_unknown]
        rng.shuffle(items)
        out[split] = items
    return out
