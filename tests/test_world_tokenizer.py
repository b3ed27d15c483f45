"""The toy tokenizer, trained on the toy world, round-trips every text the world produces."""

from posttrain.models.tokenizer import train_tokenizer
from posttrain.world import World, WorldConfig


def test_tokenizer_round_trips_every_toy_world_text():
    world = World(WorldConfig(corpus_docs=300, heldout_docs=50, n_train=60, n_rl=30, n_eval=20))
    texts = list(world.texts())
    assert len(texts) > 500
    tok = train_tokenizer(texts, vocab_size=1024)
    encoded = tok(texts, add_special_tokens=False)["input_ids"]
    bad = [t for t, ids in zip(texts, encoded, strict=True) if tok.decode(ids) != t]
    assert not bad, f"{len(bad)} texts do not round-trip, e.g. {bad[0]!r}"
    # chat renderings of the SFT examples (with tool calls) round-trip too
    for ex in world.sft_examples()[::7]:
        text = tok.apply_chat_template(ex["messages"], tools=ex.get("tools"), tokenize=False)
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
