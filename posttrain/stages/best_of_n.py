"""The best_of_n stage: n samples per prompt, scored by a reward model; the best one is kept.

Writes `<stage>/best.jsonl`, one chat example per prompt ({"prompt_id", "messages" with the
chosen reply appended, "reward", "rewards", "index", "gold"?}), usable as SFT data (rejection
sampling / expert iteration), and reports the reward and (toy world) gold of the best sample
against the mean sample, with the analytic KL bound log n - (n - 1) / n.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from posttrain.stages import sample
from posttrain.stages.base import StageContext, StageResult, resolve_model


class Config(sample.Config):
    reward_model: str = Field("reward", description="Stage or HF dir of the reward model.")


def inputs(cfg: Config, ctx: StageContext) -> dict[str, Path]:
    return sample.inputs(cfg, ctx) | {"reward_model": resolve_model(cfg.reward_model, ctx)}


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from posttrain.generate.best_of_n import best_index, kl_bound
    from posttrain.io import atomic_write_jsonl
    from posttrain.models.reward import reward_model_from, score
    from posttrain.models.tokenizer import load_tokenizer

    paths = inputs(cfg, ctx)
    records = sample.sample_candidates(cfg, ctx, paths)
    rm_tok = load_tokenizer(paths["reward_model"])
    rm = reward_model_from(paths["reward_model"], rm_tok, ctx.device)
    ctx.logger.info(f"{ctx.name}: scoring {sum(len(r['responses']) for r in records)} samples")
    convs = [rec["messages"] for rec in records for _ in rec["responses"]]
    rewards = score(
        rm, rm_tok, convs, [r["text"].strip() for rec in records for r in rec["responses"]]
    )
    best, at = [], 0
    for rec in records:
        rs = rewards[at : at + len(rec["responses"])]
        at += len(rs)
        k = best_index(rs)
        reply = {"role": "assistant", "content": rec["responses"][k]["text"].strip()}
        row = {"prompt_id": rec["prompt_id"], "messages": [*rec["messages"], reply],
               "reward": rs[k], "rewards": rs, "index": k}  # fmt: skip
        if "gold" in rec["responses"][k]:
            row["gold"] = rec["responses"][k]["gold"]
            row["gold_mean"] = sum(r["gold"] for r in rec["responses"]) / len(rs)
        best.append(row)
    atomic_write_jsonl(ctx.stage_dir / "best.jsonl", best)
    m = {
        "bon/n": cfg.n,
        "bon/prompts": len(best),
        "bon/reward_best": sum(b["reward"] for b in best) / len(best),
        "bon/reward_mean": sum(rewards) / len(rewards),
        "kl/best_of_n_bound": kl_bound(cfg.n),
    }
    if all("gold" in b for b in best):
        m["bon/gold_best"] = sum(b["gold"] for b in best) / len(best)
        m["bon/gold_mean"] = sum(b["gold_mean"] for b in best) / len(best)
    return StageResult(m, {"best": f"{ctx.name}/best.jsonl"})
