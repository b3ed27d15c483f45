"""Stages: one module each, with `Config` (pydantic), `inputs(cfg, ctx)` and `run(cfg, ctx)`."""

from posttrain.stages import pretrain, world

STAGES = {"world": world, "pretrain": pretrain}
