"""The self_instruct stage: a teacher model writes SFT data from seed tasks (Wang et al. 2212.10560).

The teacher (a stage of this run or a model directory) answers the new instructions; the
proposer (by default the teacher) writes them: in `completion` mode a base model continues a
list of tasks, as GPT-3 did in the paper; in `chat` mode a chat model is asked for a new task.
With `serve: true` (the default) each model is served by `posttrain serve` on the loopback and
reached through its OpenAI-compatible API, exactly as a hosted teacher would be; `serve: false`
loads them in this process. Seeds default to the world's SFT conversations (their first user
turns). Writes `<stage>/sft_train.jsonl` (chat records: an `sft` stage reads it with
`data: {path: <this stage>/sft_train.jsonl}`) and `sft_train.jsonl.lineage.json`; every reply is
cached in `<stage>/cache/`, so a rerun after an interruption asks nothing twice.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from pydantic import Field

from posttrain.settings import StrictModel
from posttrain.stages.base import StageContext, StageResult, resolve_input, resolve_model
from posttrain.synth.self_instruct import SelfInstructSettings


class Config(StrictModel):
    teacher: str = Field(
        "sft", description="Stage or HF dir of the chat model that answers the instructions."
    )
    proposer: str | None = Field(
        None,
        description="Stage or HF dir of the model that writes instructions (completion mode: a "
        "base model, like the paper's GPT-3); null: the teacher.",
    )
    serve: bool = Field(
        True,
        description="Reach the models through `posttrain serve` on the loopback (their "
        "OpenAI-compatible API); false: load them in this process.",
    )
    seeds: str | None = Field(
        None, description="Seed tasks file; null: the world's SFT conversations."
    )
    world_stage: str = Field("world", description="Stage holding sft_train.jsonl (the seeds).")
    generate: SelfInstructSettings = Field(
        default_factory=SelfInstructSettings,
        description="How instructions are asked for, filtered and answered.",
    )


def inputs(cfg: Config, ctx: StageContext) -> dict[str, Path]:
    found = {
        "teacher": resolve_model(cfg.teacher, ctx),
        "seeds": resolve_input(cfg.seeds, ctx, cfg.world_stage, "sft_train.jsonl"),
    }
    if cfg.proposer is not None:
        found["proposer"] = resolve_model(cfg.proposer, ctx)
    return found


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from posttrain.synth.self_instruct import SelfInstructConfig, generate
    from posttrain.synth.serving import served

    paths = inputs(cfg, ctx)
    device = str(ctx.device)
    models = {"teacher": paths["teacher"], "proposer": paths.get("proposer", paths["teacher"])}
    with contextlib.ExitStack() as stack:
        clients = {}
        for role in ("teacher", "proposer"):
            if role == "proposer" and "proposer" not in paths:
                clients[role] = clients["teacher"]
            elif cfg.serve:
                log = ctx.stage_dir / f"serve_{role}.log"
                url = stack.enter_context(served(models[role], role, log, device))
                ctx.logger.info(f"{ctx.name}: {role} {models[role]} served at {url}")
                clients[role] = {"url": url, "model": role, "timeout_s": 600}
            else:
                clients[role] = {"path": str(models[role]), "device": device}
        full = SelfInstructConfig.model_validate(
            cfg.generate.model_dump()
            | {
                "teacher": clients["proposer"],
                "answerer": clients["teacher"],
                "seeds": str(paths["seeds"]),
            }  # fmt: skip
        )
        out = ctx.stage_dir / "sft_train.jsonl"
        counts = generate(full, out, ctx.stage_dir / "cache", log=ctx.logger.info)
    metrics = {f"self_instruct/{k}": v for k, v in counts.items() if isinstance(v, int | float)}
    for group in ("instructions_dropped", "answers_dropped"):
        metrics |= {f"self_instruct/{group}/{k}": v for k, v in counts[group].items()}
    return StageResult(metrics, {"sft_train": f"{ctx.name}/sft_train.jsonl"})
