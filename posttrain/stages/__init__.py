"""Stages: one module each, with `Config` (pydantic), `inputs(cfg, ctx)` and `run(cfg, ctx)`."""

from posttrain.stages import evaluate, pretrain, rank, sample, sft, world

STAGES = {
    "world": world,
    "pretrain": pretrain,
    "sft": sft,
    "evaluate": evaluate,
    "sample": sample,
    "rank": rank,
}
