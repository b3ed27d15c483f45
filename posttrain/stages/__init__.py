"""Stages: one module each, with `Config` (pydantic), `inputs(cfg, ctx)` and `run(cfg, ctx)`."""

from posttrain.stages import (
    best_of_n,
    dpo,
    evaluate,
    kto,
    pretrain,
    rank,
    reward,
    rl,
    sample,
    self_instruct,
    sft,
    world,
)

STAGES = {
    "world": world,
    "pretrain": pretrain,
    "sft": sft,
    "evaluate": evaluate,
    "sample": sample,
    "rank": rank,
    "reward": reward,
    "dpo": dpo,
    "kto": kto,
    "best_of_n": best_of_n,
    "ppo": rl.PPO,
    "grpo": rl.GRPO,
    "rloo": rl.RLOO,
    "online_dpo": rl.ONLINE_DPO,
    "self_instruct": self_instruct,
}
