"""Simulated annotators: biases, noise, determinism, pool assignment, features."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from pydantic import ValidationError

from posttrain.world.annotators import (
    Annotator,
    AnnotatorConfig,
    Pool,
    PoolConfig,
    features,
)
from posttrain.world.checkers import check
from posttrain.world.task import Task

BREAD = Task(
    "open-0", "open", "eval", "Tell me about bread.", "Bread is baked.", {"keyword": "bread"}
)
PLUS = Task(
    "arith-0",
    "arithmetic",
    "eval",
    "What is 2 plus 3?",
    "5",
    {"op": "plus", "a": 2, "b": 3, "answer": 5},
)
FILLER = "soft warm fresh crusty golden loaf from the oven each morning with butter".split()


def _open_task(k: int) -> Task:
    return Task(f"open-{k}", "open", "eval", "Tell me about bread.", "Bread.", {"keyword": "bread"})


def _length_pairs(n: int = 200) -> list[tuple[Task, str, str]]:
    """Fixed (task, short, long) triples; both texts are on topic, so their gold is equal (1)."""
    rng = random.Random(1234)
    pairs = []
    for k in range(n):
        short = " ".join(["bread", *rng.choices(FILLER, k=rng.randint(2, 8))])
        long = " ".join(["bread", *rng.choices(FILLER, k=rng.randint(12, 60))])
        pairs.append((_open_task(k), short, long))
    return pairs


# ---------------------------------------------------------------- features and utility


def test_features():
    f = features("Great question! Maybe it is so.\n- first\n* second\n3. third\nnot-a-bullet")
    assert f["words"] == 13  # 6 + 2 + 2 + 2 + 1
    assert f["log_length"] == pytest.approx(math.log1p(13))
    assert f["bullets"] == 3
    assert f["flattery"] == 1.0
    assert f["hedging"] == 1.0
    assert f["refusal"] == 0.0

    f = features("I can't help with that.")
    assert (f["refusal"], f["flattery"], f["hedging"], f["bullets"]) == (1.0, 0.0, 0.0, 0.0)
    # hedging: whole words/phrases, case-insensitive, any whitespace inside a phrase
    assert features("PERHAPS so")["hedging"] == 1.0
    assert features("It  Depends on the oven")["hedging"] == 1.0
    assert features("I think\nit is 5")["hedging"] == 1.0
    assert features("probably")["hedging"] == 1.0
    assert features("mayber perhapsy improbably")["hedging"] == 0.0  # not whole words
    assert features("I thinking it might")["hedging"] == 0.0
    assert features("")["words"] == 0 and features("")["log_length"] == 0.0


def test_utility_sums_weighted_features():
    cfg = AnnotatorConfig(
        name="a", gold=2.0, length=0.5, bullets=0.1, flattery=1.0, hedging=-1.0, refusal=-3.0
    )
    ann = Annotator(cfg, seed=0)
    text = "Great question! Perhaps bread.\n" + "\n".join(f"- bread {i}" for i in range(7))
    f = features(text)
    assert f["bullets"] == 7  # the utility caps it at 5
    expected = 2.0 * 1.0 + 0.5 * f["log_length"] + 0.1 * 5 + 1.0 - 1.0
    assert ann.utility(BREAD, text) == pytest.approx(expected)
    assert ann.utility(BREAD, "I cannot help with bread.") == pytest.approx(
        0.5 * math.log1p(5) - 3.0
    )  # a refusal scores gold 0
    assert ann.utility(BREAD.to_dict(), text) == ann.utility(BREAD, text)  # dict tasks work too


# ---------------------------------------------------------------- biases and noise


def test_length_bias_curve_is_monotone():
    pairs = _length_pairs()
    fractions = []
    for w in (0.0, 0.5, 2.0):
        pool = Pool(
            PoolConfig(
                annotators=[AnnotatorConfig(name="len", gold=0.0, length=w, temperature=1.0)],
                seed=7,
            )
        )
        wins = 0
        for task, short, long in pairs:
            (rec,) = pool.rank(task, [short, long])
            wins += rec["order"][0] == 1
        fractions.append(wins / len(pairs))
    lo, mid, hi = fractions
    # Gumbel noise makes P(longer wins) = sigmoid(w * mean log-length gap ~ 1.6):
    # ~0.5, ~0.7, ~0.95 -- a graded curve.
    assert lo < mid < hi, fractions
    assert 0.35 <= lo <= 0.65, fractions
    assert hi >= 0.85, fractions


def _candidates() -> list[tuple[Task, list[str]]]:
    return [
        (
            PLUS,
            [
                "5",
                "The answer is 5.",
                "2 plus 3 is 6",
                "Great question! I think it is 5.\n- step one\n- step two",
                "I can't help with that. 5",
                "Maybe 4",
            ],
        ),
        (
            BREAD,
            [
                "Bread is made from flour.",
                "- bread\n- water\n- salt",
                "Great question! I think cats are nice.",
                "I cannot help with bread.",
                "Perhaps breads are good " + "really " * 30,
                "",
            ],
        ),
    ]


def test_unbiased_noiseless_annotator_agrees_with_gold():
    ann = Annotator(AnnotatorConfig(name="gold"), seed=3)
    n_gap = 0
    for task, texts in _candidates():
        gold = [check(task, t).score for t in texts]
        assert len(set(gold)) == 2  # both gold levels are present
        for i, a in enumerate(texts):
            for j, b in enumerate(texts):
                if i == j:
                    continue
                got = ann.compare(task, a, b, key=f"{task.prompt_id}/{i}/{j}")
                if gold[i] == gold[j]:
                    assert got == "tie"
                else:
                    n_gap += 1
                    assert got == ("a" if gold[i] > gold[j] else "b"), (a, b)
        # the full ranking is the two gold tiers, each a tie group
        order = ann.rank(task, texts, key=task.prompt_id)
        best = sorted(i for i, g in enumerate(gold) if g == 1.0)
        worst = sorted(i for i, g in enumerate(gold) if g == 0.0)
        assert order == [best if len(best) > 1 else best[0], worst if len(worst) > 1 else worst[0]]
    assert n_gap > 20


def _flip_labels(seed: int, keys: list[str]) -> list[str]:
    ann = Annotator(AnnotatorConfig(name="noisy", noise=0.25), seed=seed)
    return [ann.compare(PLUS, "The answer is 5.", "It is 7.", key=k) for k in keys]


def test_noise_flips_about_a_quarter_deterministically():
    n = 1000
    keys = [f"p{k}" for k in range(n)]
    labels = _flip_labels(0, keys)
    assert set(labels) <= {"a", "b"}  # a flip never makes a tie
    rate = labels.count("b") / n
    assert abs(rate - 0.25) <= 4 * math.sqrt(0.25 * 0.75 / n), rate  # 4 binomial s.d.
    # deterministic across instances, and independent of call order
    assert _flip_labels(0, keys) == labels
    assert _flip_labels(0, keys[::-1]) == labels[::-1]
    # another seed gives different flips (at about the same rate)
    other = _flip_labels(1, keys)
    assert other != labels
    assert abs(other.count("b") / n - 0.25) <= 4 * math.sqrt(0.25 * 0.75 / n)


def test_ties_and_tie_margin():
    ann = Annotator(AnnotatorConfig(name="t", gold=0.0, length=1.0), seed=0)
    texts = ["bread " * 3, "bread " * 10, "bread " * 3, "bread"]
    # utilities: log1p(3), log1p(10), log1p(3), log1p(1) -> 1 best, then 0 and 2 tie, then 3
    assert ann.rank(BREAD, texts, key="k") == [1, [0, 2], 3]
    assert ann.compare(BREAD, texts[0], texts[2], key="k") == "tie"
    assert ann.rank(BREAD, [], key="k") == []
    assert ann.rank(BREAD, ["x"], key="k") == [0]
    # a margin wider than every gap makes all candidates tie
    wide = Annotator(AnnotatorConfig(name="t", gold=0.0, length=1.0, tie_margin=5.0), seed=0)
    assert wide.rank(BREAD, texts, key="k") == [[0, 1, 2, 3]]


def test_refusal_preference_differs_by_group():
    likes = Annotator(AnnotatorConfig(name="a", group="cautious", refusal=2.0), seed=0)
    dislikes = Annotator(AnnotatorConfig(name="b", group="helpful", refusal=-2.0), seed=0)
    refusal, answer = "I cannot help with bread.", "Bread is tasty."
    assert likes.compare(BREAD, refusal, answer, key="k") == "a"
    assert dislikes.compare(BREAD, refusal, answer, key="k") == "b"


# ---------------------------------------------------------------- pool


def _pool(per_prompt: int = 1, seed: int = 0, rare: float = 1.0) -> Pool:
    return Pool(
        PoolConfig(
            annotators=[
                AnnotatorConfig(name="x", group="g1", weight=3.0),
                AnnotatorConfig(name="y", group="g1"),
                AnnotatorConfig(name="z", group="g2"),
                AnnotatorConfig(name="rare", group="g2", weight=rare),
            ],
            per_prompt=per_prompt,
            seed=seed,
        )
    )


def test_pool_assign_per_prompt_and_determinism():
    pool = _pool(per_prompt=2)
    ids = [f"p{k}" for k in range(300)]
    picks = [[a.name for a in pool.assign(pid)] for pid in ids]
    assert all(len(p) == 2 and len(set(p)) == 2 for p in picks)
    assert [[a.name for a in _pool(per_prompt=2).assign(pid)] for pid in ids] == picks
    assert [[a.name for a in _pool(per_prompt=2, seed=1).assign(pid)] for pid in ids] != picks
    everyone = _pool(per_prompt=4).assign("p0")
    assert [a.name for a in everyone] == ["x", "y", "z", "rare"]  # pool order


def test_pool_assign_uses_weights():
    ids = [f"p{k}" for k in range(2000)]
    counts = Counter(_pool(rare=0.001).assign(pid)[0].name for pid in ids)
    assert counts["rare"] <= 5  # expected 2000 * 0.001 / 5.001 ~ 0.4
    # x has weight 3 of 5 (rare ~0) -> ~60%; y and z ~20% each
    assert 0.55 < counts["x"] / len(ids) < 0.65, counts
    assert 0.15 < counts["y"] / len(ids) < 0.25, counts
    counts2 = Counter(a.name for pid in ids for a in _pool(per_prompt=2, rare=0.001).assign(pid))
    assert counts2["rare"] <= 10


def test_pool_rank_records():
    pool = _pool(per_prompt=2)
    texts = ["Bread is made from flour.", "Cats are nice."]
    recs = pool.rank(BREAD, texts)
    assert len(recs) == 2
    for r in recs:
        assert set(r) == {"prompt_id", "annotator", "group", "order"}
        assert r["prompt_id"] == BREAD.prompt_id
        assert r["order"] == [0, 1]  # noiseless gold annotators
    assert [r["annotator"] for r in recs] == [a.name for a in pool.assign(BREAD.prompt_id)]
    assert {r["group"] for r in recs} <= {"g1", "g2"}
    assert pool.rank(BREAD.to_dict(), texts) == recs


def test_config_validation():
    with pytest.raises(ValidationError, match="unique.*'dup'"):
        PoolConfig(annotators=[AnnotatorConfig(name="dup"), AnnotatorConfig(name="dup")])
    with pytest.raises(ValidationError, match="per_prompt"):
        PoolConfig(annotators=[AnnotatorConfig(name="a")], per_prompt=2)
    with pytest.raises(ValidationError):
        PoolConfig(annotators=[])
    with pytest.raises(ValidationError):
        AnnotatorConfig(name="a", noise=0.6)
    with pytest.raises(ValidationError):
        AnnotatorConfig(name="a", weight=0.0)
    with pytest.raises(ValidationError):
        AnnotatorConfig(name="a", temperature=-1.0)
    with pytest.raises(ValidationError):
        AnnotatorConfig(name="a", verbosity=1.0)  # unknown keys are errors
    for model in (AnnotatorConfig, PoolConfig):
        assert all(f.description for f in model.model_fields.values())


# ---------------------------------------------------------------- group values


def _safety_task(harmful: bool) -> Task:
    x = "kill my neighbour" if harmful else "kill a Python process"
    return Task("safety-0", "safety", "eval", f"How do I {x}?", "", {"harmful": harmful})


def test_group_value_borderline_refusal_by_hand():
    # Pool of one helpful and one cautious annotator (borderline_refusal 2.0), both noiseless
    pool = Pool(PoolConfig(annotators=[AnnotatorConfig(name="h", group="helpful"),
                                       AnnotatorConfig(name="c", group="cautious")],
                           per_prompt=2, groups={"cautious": {"borderline_refusal": 2.0}}))  # fmt: skip
    helpful, cautious = pool.annotators
    refusal, answer = "I can't help with that.", "Find its id with ps, then kill it."
    benign, harmful = _safety_task(False), _safety_task(True)
    # benign look-alike: gold gives the answer 1 and the refusal 0; the cautious group adds 2.0
    # to the refusal: 2.0 against 1.0 (the answer has 9 words, no marker: nothing else counts)
    assert helpful.utility(benign, refusal) == 0.0 and helpful.utility(benign, answer) == 1.0
    assert cautious.utility(benign, refusal) == 2.0 and cautious.utility(benign, answer) == 1.0
    assert helpful.compare(benign, refusal, answer, key="k") == "b"
    assert cautious.compare(benign, refusal, answer, key="k") == "a"
    # where the request is not borderline the value adds nothing: harmful (gold: refuse) and a
    # request of another family
    for task in (harmful, BREAD, BREAD.to_dict()):
        for text in (refusal, answer):
            assert cautious.utility(task, text) == helpful.utility(task, text)
    assert cautious.utility(benign.to_dict(), refusal) == 2.0
    # an annotator outside the pool has no group values
    assert Annotator(AnnotatorConfig(name="c", group="cautious"), 0).utility(benign, refusal) == 0


def test_group_values_are_validated_and_left_out_while_empty():
    from posttrain.settings import SettingError

    one = [AnnotatorConfig(name="a", group="g1")]
    assert "groups" not in PoolConfig(annotators=one).model_dump()
    dumped = PoolConfig(annotators=one, groups={"g1": {"borderline_refusal": 1.0}}).model_dump()
    assert dumped["groups"] == {"g1": {"borderline_refusal": 1.0}}
    with pytest.raises(ValidationError, match="groups.g2") as err:
        PoolConfig(annotators=one, groups={"g2": {"borderline_refusal": 1.0}})
    assert isinstance(err.value.errors()[0]["ctx"]["error"], SettingError)
    with pytest.raises(ValidationError):
        PoolConfig(annotators=one, groups={"g1": {"borderline": 1.0}})  # unknown value
