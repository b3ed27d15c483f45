"""The world stage: materialise the toy world (corpus, task splits) and train its tokenizer."""

from __future__ import annotations

import time

from pydantic import Field

from posttrain.stages.base import StageContext, StageResult
from posttrain.world import WorldConfig


class Config(WorldConfig):
    """The world's settings (WorldConfig) plus its tokenizer's."""

    vocab_size: int = Field(
        1024, ge=300, le=65536, description="BPE vocabulary size of the toy tokenizer."
    )
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")


def inputs(cfg: Config, ctx: StageContext) -> dict:
    return {}  # everything comes from the (fingerprinted) world config


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from posttrain.models.tokenizer import save_tokenizer, train_tokenizer

    t0 = time.perf_counter()
    world = ctx.world()  # built from this stage's config (the pipeline's first world stage)
    files = world.write(ctx.stage_dir)
    ctx.logger.info(f"{ctx.name}: wrote {len(files)} files in {time.perf_counter() - t0:.1f}s")
    t1 = time.perf_counter()
    tok = train_tokenizer(world.texts(), vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency)
    save_tokenizer(tok, ctx.stage_dir / "tokenizer")
    ctx.logger.info(
        f"{ctx.name}: trained a {len(tok)}-token tokenizer in {time.perf_counter() - t1:.1f}s"
    )
    corpus = _add_chat_docs(world, tok, files["corpus_train"])
    n_tokens = sum(len(ids) for ids in tok(corpus, add_special_tokens=False)["input_ids"])
    metrics = {
        "world/entities": len(world.entities),
        "world/known_entities": sum(e.known for e in world.entities),
        "world/corpus_docs": len(corpus),
        "world/corpus_chat_docs": world.cfg.chat_docs,
        "world/corpus_chars": sum(map(len, corpus)),
        "world/corpus_tokens": n_tokens,
        "world/vocab_size": len(tok),
    }
    for split in ("train", "rl", "eval"):
        metrics[f"world/tasks_{split}"] = len(world.tasks(split))
    artifacts = {k: ctx.relative(v) for k, v in files.items()} | {
        "tokenizer": f"{ctx.name}/tokenizer"
    }
    return StageResult(metrics, artifacts)


def _add_chat_docs(world, tok, corpus_file) -> list[str]:
    """Render the world's chat conversations with the tokenizer's chat template and mix them
    into the training corpus (a seeded shuffle); the held-out corpus stays plain text."""
    import random

    from posttrain.io import atomic_write_jsonl

    docs = list(world.corpus("train"))
    docs += [tok.apply_chat_template(c, tokenize=False) for c in world.chat_conversations()]
    random.Random(world.cfg.seed).shuffle(docs)
    atomic_write_jsonl(corpus_file, ({"text": d} for d in docs))
    return docs
