"""The world's SFT safety mix (sft_refusal_share, sft_contrast_share): counts by hand, the eval
set byte for byte the same across a sweep, and every existing world unchanged while off."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.config import build_pipeline
from posttrain.settings import ConfigError
from posttrain.world import World, WorldConfig, check
from posttrain.world.requests_lexicon import REFUSAL_REFERENCE

NEW_KEYS = {"sft_refusal_share", "sft_contrast_share"}
# quick sizes: n_train 12 per family, so the four other families give 48 SFT conversations
SMALL = {"corpus_docs": 60, "heldout_docs": 20, "n_train": 12, "n_rl": 8, "n_eval": 6,
         "chat_docs": 10, "mention_min": 2, "rl_novel_share": 0.3}  # fmt: skip


def _safety(world: World) -> list[dict]:
    return [e for e in world.sft_examples() if e["prompt_id"].startswith("safety/")]


def test_off_by_default_and_left_out_of_the_resolved_config():
    assert not NEW_KEYS & set(WorldConfig().model_dump())
    assert not NEW_KEYS & set(WorldConfig(**SMALL).model_dump(mode="json"))
    # the world stage's resolved section (its cache key) and the pipeline's world fingerprint
    pipe = build_pipeline({"stages": ["world"], "world": dict(SMALL)}, "p.yaml")
    assert not NEW_KEYS & set(pipe.resolved()["world"])
    assert not NEW_KEYS & set(pipe.world_config().model_dump(mode="json"))
    # set, they are part of it (a different world, a different cache key)
    on = WorldConfig(sft_refusal_share=0.1, sft_contrast_share=0.05).model_dump(mode="json")
    assert on["sft_refusal_share"] == 0.1 and on["sft_contrast_share"] == 0.05


def test_settings_off_write_the_same_files_as_settings_absent(tmp_path: Path):
    absent = World(WorldConfig(**SMALL)).write(tmp_path / "absent")
    off = World(WorldConfig(**SMALL, sft_refusal_share=None, sft_contrast_share=0.0))
    off_files = off.write(tmp_path / "off")
    for name, path in absent.items():
        assert path.read_bytes() == off_files[name].read_bytes(), name


def test_a_sweep_changes_sft_data_only(tmp_path: Path):
    files = {r: World(WorldConfig(**SMALL, sft_refusal_share=r, sft_contrast_share=c))
             .write(tmp_path / f"r{r}") for r, c in ((0.05, 0.0), (0.4, 0.2))}  # fmt: skip
    base = World(WorldConfig(**SMALL)).write(tmp_path / "base")
    a, b = files[0.05], files[0.4]
    for name in base:
        if name == "sft_train":
            assert a[name].read_bytes() != b[name].read_bytes()
            continue
        # tasks_eval above all: the eval set is byte-identical across the sweep (and with the
        # world without the settings); so are the corpus and the tokenizer's texts
        assert a[name].read_bytes() == b[name].read_bytes() == base[name].read_bytes(), name


@pytest.mark.parametrize("novel", [0.0, 0.3])  # rl prompts from SFT's pools, or their own
def test_counts_by_hand_and_where_they_come_from(novel: float):
    # 48 other conversations; r = 0.25, c = 0.25: total 48 / 0.5 = 96, so 24 refusals and 24
    # contrast examples; the other families' conversations are the ones of the plain world
    small = SMALL | {"rl_novel_share": novel}
    world = World(WorldConfig(**small, sft_refusal_share=0.25, sft_contrast_share=0.25))
    plain = [e for e in World(WorldConfig(**small)).sft_examples()
             if not e["prompt_id"].startswith("safety/")]  # fmt: skip
    ex = world.sft_examples()
    assert ex[: len(plain)] == plain and len(ex) == 96
    safety = ex[len(plain) :]
    refusals = [e for e in safety if e["messages"][-1]["content"] == REFUSAL_REFERENCE]
    assert len(refusals) == 24 and safety[:24] == refusals  # refusals first, then contrasts
    # every prompt comes from the train side: none is an eval or rl prompt
    held = {t.prompt for s in ("eval", "rl") for t in world.tasks(s, "safety")}
    assert not {e["messages"][0]["content"] for e in safety} & held
    # the train split's own safety tasks come first (and keep their ids); each reply is gold
    train = {t.prompt: t for t in world.tasks("train", "safety")}
    assert sum(e["prompt_id"].startswith("safety/train/") for e in safety) == 12
    for e in safety:
        prompt, reply = (m["content"] for m in e["messages"])
        if prompt in train:
            t = train[prompt]
            assert e["prompt_id"] == t.prompt_id and reply == t.reference
            assert check(t, reply).score == 1.0
        else:
            assert e["prompt_id"].startswith("safety/sft/")
    # contrast answers are helpful (no refusal marker) and differ from each other
    contrast = [e["messages"][-1]["content"] for e in safety[24:]]
    assert REFUSAL_REFERENCE not in contrast and len(set(contrast)) > 1


def test_share_zero_means_no_safety_conversation_and_a_small_pool_cycles():
    assert _safety(World(WorldConfig(**SMALL, sft_refusal_share=0.0))) == []
    # 0.9 x 48 / 0.05 = 864 contrast examples from a benign pool of a few hundred: it cycles
    ex = _safety(World(WorldConfig(**SMALL, sft_refusal_share=0.05, sft_contrast_share=0.9)))
    contrast = ex[48:]
    assert len(ex) == 48 + 864 and len(contrast) == 864
    pool = len({e["messages"][0]["content"] for e in contrast})
    assert pool < 864 and contrast[pool] == contrast[0]


def test_bad_mixes_are_errors_naming_the_key():
    with pytest.raises(ConfigError, match=r"config key 'world\.sft_contrast_share':.*"
                       r"world\.sft_refusal_share"):  # fmt: skip
        build_pipeline({"stages": ["world"], "world": {"sft_contrast_share": 0.1}}, "p.yaml")
    with pytest.raises(ValueError, match="must be < 1"):
        WorldConfig(sft_refusal_share=0.6, sft_contrast_share=0.4)
    with pytest.raises(ValueError, match="sft_refusal_share"):
        WorldConfig(sft_refusal_share=1.0)
