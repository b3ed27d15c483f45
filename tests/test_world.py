"""The toy world: determinism, split hygiene, corpus contents and atomic writing."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from posttrain.world import FAMILIES, SPLITS, Task, World, WorldConfig
from posttrain.world import world as world_module
from posttrain.world.lexicon import ATTRIBUTES, FACT_TEMPLATES
from posttrain.world.requests_lexicon import BENIGN, HARM_TARGETS, HARM_VERBS, REFUSAL_REFERENCE


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@pytest.fixture(scope="module")
def corpus_text(world: World) -> str:
    return "\n".join(world.corpus("train") + world.corpus("heldout"))


def _small(**kw) -> WorldConfig:
    return WorldConfig(corpus_docs=200, heldout_docs=20, **kw)


# --- config -------------------------------------------------------------------------------


def test_config_rejects_unknown_key():
    with pytest.raises(ValidationError, match="n_entitys"):
        WorldConfig(n_entitys=300)


@pytest.mark.parametrize(
    "bad",
    [{"n_entities": 199}, {"known_fraction": 1.0}, {"mention_min": 5, "mention_max": 4}],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValidationError):
        WorldConfig(**bad)


# --- determinism --------------------------------------------------------------------------


def test_same_config_gives_byte_identical_files(tmp_path: Path):
    a = World(_small(seed=3)).write(tmp_path / "a")
    b = World(_small(seed=3)).write(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name


def test_different_seed_differs():
    a, b = World(_small(seed=0)), World(_small(seed=1))
    assert a.corpus("train") != b.corpus("train")
    assert [t.prompt for t in a.tasks("eval")] != [t.prompt for t in b.tasks("eval")]
    assert [e.name for e in a.entities] != [e.name for e in b.entities]


# --- entities -----------------------------------------------------------------------------


def test_entities(world: World):
    ents = world.entities
    assert len(ents) == 240 and len({e.name for e in ents}) == 240
    assert all(len(e.attributes) >= 3 for e in ents)
    known = [e for e in ents if e.known]
    assert len(known) == 120  # known_fraction 0.5
    # Zipf: the head entity's facts are stated mention_max times, the tail ones mention_min times
    assert max(e.mentions for e in known) == 200
    assert min(e.mentions for e in known) == 4  # WorldConfig.mention_min
    assert all(e.mentions == 0 for e in ents if not e.known)


# --- tasks and splits ---------------------------------------------------------------------


def test_default_counts_per_family(world: World):
    for split, n in (("train", 400), ("rl", 200), ("eval", 100)):
        for family in FAMILIES:
            assert len(world.tasks(split, family)) == n, (split, family)


def test_counts_are_capped_by_unique_prompts():
    w = World(WorldConfig(corpus_docs=50, heldout_docs=5, n_train=5000, n_rl=0, n_eval=400))
    # safety eval holds 5 phrasings x 10 benign actions = 50 benign prompts; 200 wanted
    assert len([t for t in w.tasks("eval", "safety") if not t.gold["harmful"]]) == 50
    assert len(w.tasks("train", "arithmetic")) == 5000


def test_splits_never_share_a_prompt(world: World):
    prompts = [t.prompt for s in SPLITS for t in world.tasks(s)]
    ids = [t.prompt_id for s in SPLITS for t in world.tasks(s)]
    assert len(prompts) == len(set(prompts))
    assert len(ids) == len(set(ids))
    assert world.tasks("eval", "arithmetic")[17].prompt_id == "arithmetic/eval/00017"


def test_safety_eval_uses_heldout_phrasings_and_objects(world: World):
    seen = world.tasks("train", "safety") + world.tasks("rl", "safety")
    evals = world.tasks("eval", "safety")
    for key in ("phrasing", "object"):
        assert {t.gold[key] for t in evals}.isdisjoint({t.gold[key] for t in seen}), key
    assert all(t.gold["heldout"] for t in evals) and not any(t.gold["heldout"] for t in seen)
    assert {t.gold["harmful"] for t in evals} == {True, False}
    # eval threatens only held-out harm targets; train/rl also the corpus's everyday people
    from posttrain.world.lexicon import PEOPLE

    harmed = lambda ts: {t.gold["object"] for t in ts if t.gold["harmful"]}  # noqa: E731
    assert harmed(evals) <= set(HARM_TARGETS)
    assert harmed(seen) & set(PEOPLE) and harmed(seen) & set(HARM_TARGETS)


def test_rl_novel_share_gives_rl_safety_prompts_sft_never_saw_and_keeps_eval():
    from posttrain.world.requests import safety_items

    base, novel = safety_items(WorldConfig()), safety_items(WorldConfig(rl_novel_share=0.3))
    assert novel["eval"] == base["eval"]  # the held-out eval set does not move
    parts = lambda items: {g[k] for _, _, g in items for k in ("phrasing", "object")}  # noqa: E731
    sft_saw = parts(novel["train"])
    # every RL prompt holds a phrasing or object that SFT data never has, none of eval's
    assert all({g["phrasing"], g["object"]} - sft_saw for _, _, g in novel["rl"])
    assert parts(novel["rl"]).isdisjoint(parts(novel["eval"]))
    assert {g["harmful"] for _, _, g in novel["rl"]} == {True, False}
    # 0.3 of 15 non-eval phrasings (4), of 12 targets (4) and of 30 benign actions (9)
    assert len(parts(base["train"] + base["rl"]) - sft_saw) == 4 + 4 + 9
    with pytest.raises(ValueError, match="rl_novel_share"):
        WorldConfig(rl_novel_share=1.0)


def test_knowledge_eval_has_known_and_unknown(world: World):
    evals = world.tasks("eval", "knowledge")
    assert {t.gold["known"] for t in evals} == {True, False}
    # unknown entities are split by entity: eval ones are never asked about in train or rl
    seen = {t.gold["entity"] for s in ("train", "rl") for t in world.tasks(s, "knowledge")}
    assert {t.gold["entity"] for t in evals if not t.gold["known"]}.isdisjoint(seen)
    # known facts are split by (entity, attribute)
    fact = lambda t: (t.gold["entity"], t.gold["attribute"])  # noqa: E731
    seen_facts = {fact(t) for s in ("train", "rl") for t in world.tasks(s, "knowledge")}
    assert {fact(t) for t in evals}.isdisjoint(seen_facts)


def test_task_roundtrip_and_sft(world: World):
    for t in world.tasks("eval")[::37]:
        d = json.loads(json.dumps(t.to_dict()))
        assert Task.from_dict(d) == t
        assert d["messages"] == [{"role": "user", "content": t.prompt}]
    sft = world.sft_examples()
    assert len(sft) == len(world.tasks("train"))
    plain = [(ex, t) for ex, t in zip(sft, world.tasks("train"), strict=True) if "tools" not in ex]
    assert all(
        ex["messages"][1] == {"role": "assistant", "content": t.reference} for ex, t in plain
    )
    tool_use = [ex for ex in sft if "tools" in ex]
    assert tool_use and all(ex["prompt_id"].startswith("arithmetic/") for ex in tool_use)
    roles = [m["role"] for m in tool_use[0]["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant"]
    call = tool_use[0]["messages"][1]["tool_calls"][0]["function"]
    assert (
        call["name"] == "calculator"
        and tool_use[0]["messages"][2]["content"] == tool_use[0]["messages"][3]["content"]
    )


def test_few_shot_prompt(world: World):
    task = world.tasks("eval", "arithmetic")[0]
    prompt = world.few_shot_prompt(task, k=3)
    assert prompt.endswith(f"Q: {task.prompt}\nA:")
    lines = prompt.split("\n")
    assert len(lines) == 2 * 3 + 2
    train = {t.prompt: t.reference for t in world.tasks("train", "arithmetic")}
    for q, a in zip(lines[0:6:2], lines[1:6:2], strict=True):
        assert train[q.removeprefix("Q: ")] == a.removeprefix("A: ")
    assert prompt == world.few_shot_prompt(task, k=3)  # deterministic


# --- corpus -------------------------------------------------------------------------------


def test_default_corpus_size(world: World):
    mb = sum(len(d) for d in world.corpus("train")) / 1e6
    assert 1.5 <= mb <= 3.0
    assert set(world.corpus("train")).isdisjoint(world.corpus("heldout"))
    assert len(world.corpus("heldout")) > 0


def test_unknown_names_never_in_any_corpus(world: World, corpus_text: str):
    unknown = [e.name for e in world.entities if not e.known]
    pattern = re.compile(r"\b(?:" + "|".join(unknown) + r")\b", re.IGNORECASE)
    assert pattern.search(corpus_text) is None


def test_known_facts_stated_mentions_times_in_two_phrasings(world: World):
    sentences = Counter(
        s for doc in world.corpus("train") for s in re.split(r"(?<=\.)\s+", doc.replace("\n", " "))
    )
    for e in (e for e in world.entities if e.known):
        for attribute in ATTRIBUTES:
            value = e.attributes[attribute]
            art = "an" if value[0] in "aeiou" else "a"
            forms = [f.format(n=e.name, v=value, a=art) for f in FACT_TEMPLATES[attribute]]
            counts = [sentences[f] for f in forms]
            assert sum(counts) == e.mentions, (e.name, attribute)
            assert sum(c > 0 for c in counts) >= 2, (e.name, attribute)


def test_no_eval_instance_or_prompt_in_corpus(world: World, corpus_text: str):
    for t in world.tasks("eval", "arithmetic"):
        g = t.gold
        assert re.search(rf"(?<!\d){g['a']} {g['op']} {g['b']}(?!\d)", corpus_text) is None, (
            t.prompt
        )
    statements = {  # every corpus phrasing of a string instance (skills.STRING_STATEMENTS)
        "reverse": ("The word {w} reversed is ", "Spelled backwards, {w} is "),
        "first_letter": ("The first letter of {w} is ", "The word {w} starts with "),
        "sort": ("Sorted, {w} becomes ", "In order, {w} is "),
    }
    for t in world.tasks("eval", "string"):
        for form in statements[t.gold["op"]]:
            assert form.format(w=t.gold["arg"]) not in corpus_text, t.prompt
    for t in world.tasks("eval"):
        if t.family == "knowledge" and t.gold["known"]:
            continue  # known facts are stated in the corpus, question form included
        assert t.prompt not in corpus_text, t.prompt
    known = [t for t in world.tasks("eval", "knowledge") if t.gold["known"]]
    assert sum(f"Q: {t.prompt}\nA: {t.reference}" in corpus_text for t in known) > len(known) / 2


def test_no_safety_content_in_corpus(corpus_text: str):
    lowered = corpus_text.lower()
    assert REFUSAL_REFERENCE.lower() not in lowered
    for action in BENIGN:
        assert action.lower() not in lowered
    from posttrain.world.lexicon import PEOPLE

    for verb in HARM_VERBS:
        for target in HARM_TARGETS + PEOPLE:
            assert f"{verb} {target}" not in lowered


def test_corpus_shows_harm_targets_as_people_and_benign_objects_as_things(world: World):
    """What lets a model tell "shoot a child" from "shoot a short film" on held-out targets: the
    corpus has seen every target in people sentences and every benign object in thing sentences
    (and never beside a harm verb: test_no_safety_content_in_corpus)."""
    from posttrain.world.corpus import _cap
    from posttrain.world.lexicon import PEOPLE_TEMPLATES, THING_TEMPLATES, THINGS

    def contexts(templates, cap):
        # each template's text around its main slot, e.g. ("", " smiled and waved at")
        return [
            t.split("{" + cap + "}")[1].split("{")[0] for t in templates if "{" + cap + "}" in t
        ]

    text = "\n".join(world.corpus("train"))
    person_tails = contexts(PEOPLE_TEMPLATES, "Pc")
    thing_tails = contexts(THING_TEMPLATES, "Oc")
    for target in HARM_TARGETS:
        cap = _cap(target)
        assert any(cap + tail in text for tail in person_tails), target
        assert not any(cap + tail in text for tail in thing_tails), target
    for thing in THINGS:
        cap = _cap(thing)
        assert any(cap + tail in text for tail in thing_tails), thing
        assert not any(cap + tail in text for tail in person_tails), thing


def test_corpus_has_few_shot_format(world: World):
    pattern = r"^Q: What is \d+ plus \d+\?\nA: ones: \d plus \d is \d+; tens: .*; so \d+$"
    assert any(re.search(pattern, d, re.M) for d in world.corpus())


def test_texts_are_ascii(world: World):
    texts = list(world.texts())
    assert all(t.isascii() for t in texts)
    assert set(world.corpus("train")) <= set(texts)


# --- writing ------------------------------------------------------------------------------


def test_write_produces_files(tmp_path: Path):
    w = World(_small())
    paths = w.write(tmp_path)
    expected = {"corpus_train", "corpus_heldout", "tasks_train", "tasks_rl", "tasks_eval"}
    assert expected | {"sft_train", "entities"} == set(paths)
    rows = [json.loads(line) for line in paths["tasks_eval"].read_text().splitlines()]
    assert [Task.from_dict(r) for r in rows] == w.tasks("eval")
    docs = [json.loads(line)["text"] for line in paths["corpus_train"].read_text().splitlines()]
    assert docs == w.corpus("train")
    assert len(paths["entities"].read_text().splitlines()) == 240


def test_killed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch):
    w = World(_small())
    calls = {"n": 0}
    real = world_module.atomic_write_jsonl

    def killed_midway(path, records):
        def stream():
            for record in records:
                calls["n"] += 1
                if calls["n"] == 10:  # midway through the first file
                    raise KeyboardInterrupt("killed")
                yield record

        return real(path, stream())

    monkeypatch.setattr(world_module, "atomic_write_jsonl", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        w.write(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither corpus_train.jsonl nor its temp file

    monkeypatch.setattr(world_module, "atomic_write_jsonl", real)
    old = w.write(tmp_path)["corpus_train"].read_bytes()
    calls["n"] = 0
    monkeypatch.setattr(world_module, "atomic_write_jsonl", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        w.write(tmp_path)
    assert (tmp_path / "corpus_train.jsonl").read_bytes() == old  # the old file is intact
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
