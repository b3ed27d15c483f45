"""The pre-training corpus: documents of facts, arithmetic, string operations, Q/A and prose.

Q/A lines use the exact few-shot format ("Q: What is 23 plus 45?\nA: 68"), so a base model
can answer by continuation. The sources handed in here already exclude every eval instance,
every unknown entity and all safety content; World checks nothing else is needed.

Prose mixes town filler with sentences about everyday people (the safety family's harm targets
among them: "The mail carrier told my aunt a funny story.") and about things (the objects of
the benign look-alikes: "My notes on a shell script filled two pages."), never beside a harm
verb. A web corpus teaches a model what a child or a shell script is long before any safety
tuning; without it, telling "shoot a child" from "shoot a short film" on held-out targets is
guesswork for the model (toy SFT violations 0.22-0.56 without it; with it, and with harmful
training prompts about 44 different people, 0.00 on world seeds 0 and 1).
"""

from __future__ import annotations

import random
from typing import NamedTuple

from posttrain.world.knowledge import Entity, fact_sentence, fact_sentences
from posttrain.world.lexicon import (
    ATTRIBUTES,
    COLOURS,
    FACT_TEMPLATES,
    OCCUPATIONS,
    PEOPLE,
    PEOPLE_TEMPLATES,
    PETS,
    PROSE_TEMPLATES,
    PROSE_WORDS,
    THING_TEMPLATES,
    THINGS,
    TOWNS,
    article,
)
from posttrain.world.requests_lexicon import HARM_TARGETS
from posttrain.world.skills import arith_statement, string_statement

ALL_PEOPLE = PEOPLE + HARM_TARGETS

# Share of documents of each kind; "facts" takes the remainder so it always gets >= 1 doc.
DOC_MIX = {"arithmetic": 0.2, "string": 0.2, "qa": 0.15, "prose": 0.1}
PEOPLE_SHARE = 0.4  # of prose sentences, those about people
THINGS_SHARE = 0.3  # and those about things


class CorpusSources(NamedTuple):
    """What the corpus may draw on (all already free of eval instances and unknown names)."""

    entities: list[Entity]  # known entities only
    arith: list[tuple]  # (op, a, b) instances
    strings: list[tuple]  # (op, arg) instances
    qa: dict[str, list[tuple[str, str]]]  # family -> (question, answer) pairs (arith, string)
    knowledge_qa: list[tuple[str, str, int]]  # (question, answer, mentions) of known facts
    qa_weights: list[float]  # how often each knowledge_qa item is drawn (WorldConfig.qa_weighting)


def qa_line(question: str, answer: str) -> str:
    """The Q/A continuation format shared by the corpus and World.few_shot_prompt."""
    return f"Q: {question}\nA: {answer}"


def _cap(phrase: str) -> str:
    return phrase[0].upper() + phrase[1:]


def people_sentence(rng: random.Random) -> str:
    """A sentence about everyday people (see lexicon.PEOPLE)."""
    p, p2 = rng.sample(ALL_PEOPLE, 2)
    return rng.choice(PEOPLE_TEMPLATES).format(
        P=p, Pc=_cap(p), P2=p2, T=rng.choice(TOWNS), pet=rng.choice(PETS)
    )


def thing_sentence(rng: random.Random) -> str:
    """A sentence about a thing (see lexicon.THINGS)."""
    o = rng.choice(THINGS)
    return rng.choice(THING_TEMPLATES).format(O=o, Oc=_cap(o), T=rng.choice(TOWNS))


def prose_sentence(rng: random.Random) -> str:
    u = rng.random()
    if u < PEOPLE_SHARE:
        return people_sentence(rng)
    if u < PEOPLE_SHARE + THINGS_SHARE:
        return thing_sentence(rng)
    town, town2 = rng.sample(TOWNS, 2)
    pet, colour = rng.choice(PETS), rng.choice(COLOURS)
    words = {k: rng.choice(v) for k, v in PROSE_WORDS.items()}
    return rng.choice(PROSE_TEMPLATES).format(
        T=town, T2=town2, job=rng.choice(OCCUPATIONS), pet=pet, pa=article(pet),
        PA=article(pet).capitalize(), colour=colour, Colour=colour.capitalize(), **words,
    )  # fmt: skip


def _paragraphs(rng: random.Random, sentences: list[str]) -> str:
    """Join sentences into lines of 1-4 sentences each."""
    lines, i = [], 0
    while i < len(sentences):
        k = rng.randint(1, 4)
        lines.append(" ".join(sentences[i : i + k]))
        i += k
    return "\n".join(lines)


def _facts_doc(rng: random.Random, facts: list[str]) -> str:
    sentences = list(facts) + [prose_sentence(rng) for _ in range(rng.randint(1, 4))]
    rng.shuffle(sentences)
    return _paragraphs(rng, sentences)


def _skill_doc(rng: random.Random, src: CorpusSources, kind: str) -> str:
    pool, render = (
        (src.arith, arith_statement) if kind == "arithmetic" else (src.strings, string_statement)
    )
    lines = []
    for _ in range(rng.randint(8, 30)):
        if rng.random() < 0.5:
            lines.append(render(rng, rng.choice(pool)))
        else:  # a Q/A pair of the same kind
            q, a = rng.choice(src.qa[kind])
            lines.append(qa_line(q, a))
    return "\n".join(lines)


def _qa_doc(rng: random.Random, src: CorpusSources) -> str:
    pairs = []
    weights = src.qa_weights
    for _ in range(rng.randint(6, 16)):
        kind = rng.choice(("arithmetic", "string", "knowledge"))
        if kind == "knowledge" and src.knowledge_qa:
            q, a, _ = rng.choices(src.knowledge_qa, weights=weights)[0]
        else:
            q, a = rng.choice(src.qa["arithmetic" if kind == "knowledge" else kind])
        pairs.append(qa_line(q, a))
    return "\n".join(pairs)


def _prose_doc(rng: random.Random) -> str:
    return _paragraphs(rng, [prose_sentence(rng) for _ in range(rng.randint(6, 20))])


def sampled_facts(rng: random.Random, entities: list[Entity], n: int) -> list[str]:
    """`n` fact statements drawn in proportion to each entity's mentions (held-out corpus)."""
    weights = [e.mentions for e in entities]
    out = []
    for e in rng.choices(entities, weights=weights, k=n):
        attribute = rng.choice(ATTRIBUTES)
        out.append(fact_sentence(e, attribute, rng.randrange(len(FACT_TEMPLATES[attribute]))))
    return out


def exact_facts(rng: random.Random, entities: list[Entity]) -> list[str]:
    """Every known fact stated exactly `mentions` times (train corpus)."""
    return fact_sentences(entities, rng)


def build_corpus(
    rng: random.Random, src: CorpusSources, n_docs: int, facts: list[str]
) -> list[str]:
    """`n_docs` documents; the fact statements `facts` are spread over the "facts" documents."""
    kinds = [k for k, share in DOC_MIX.items() for _ in range(int(n_docs * share))]
    n_facts_docs = n_docs - len(kinds)
    kinds += ["facts"] * n_facts_docs
    rng.shuffle(kinds)
    # cut the fact statements into n_facts_docs chunks of varying size
    cuts = sorted(rng.randrange(len(facts) + 1) for _ in range(n_facts_docs - 1))
    chunks = [facts[i:j] for i, j in zip([0, *cuts], [*cuts, len(facts)], strict=True)]
    docs = []
    for kind in kinds:
        if kind == "facts":
            docs.append(_facts_doc(rng, chunks.pop()))
        elif kind == "qa":
            docs.append(_qa_doc(rng, src))
        elif kind == "prose":
            docs.append(_prose_doc(rng))
        else:
            docs.append(_skill_doc(rng, src, kind))
    return docs
