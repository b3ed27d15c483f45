"""The sample stage: n candidate responses per prompt from a model (step 1 of RLHF).

Prompts come from the toy world (a split, by default `rl`: prompts no other stage trained on)
or from a JSONL file of `{"messages": [...]}` or `{"prompt": "..."}` records. Writes
`<stage>/candidates.jsonl`, one record per prompt:

    {"prompt_id", "family"?, "messages", "responses": [
        {"text", "logprob", "token_logprobs", "n_tokens", "ended", "gold"?}, ...]}

`logprob` is the summed log-probability of the response tokens under the model's raw
distribution (temperature 1, no top-p/top-k), the quantity RL and DPO need; `ended` is whether
the response stopped at end-of-turn/EOS rather than at `max_new_tokens`. For world prompts
`gold` is the checker's score, kept for diagnostics (annotator agreement, gold gap); no training
stage reads it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from posttrain.settings import SettingError, StrictModel, is_set
from posttrain.stages.base import StageContext, StageResult, resolve_input, resolve_model
from posttrain.train import dist
from posttrain.world.task import first_per_family


class Config(StrictModel):
    model: str = Field("sft", description="A stage of this run whose model/ samples, or a HF dir.")
    prompts: str | None = Field(
        None,
        description="JSONL of prompts ({'messages'} ending in a user turn, or {'prompt'}; "
        "optional 'prompt_id'); null: the toy world's prompts.",
    )
    world_stage: str = Field("world", description="Stage holding the world's task files.")
    split: Literal["train", "rl", "eval"] = Field(
        "rl", description="World split to sample prompts from."
    )
    families: list[str] | None = Field(None, description="World families to use (null: all).")
    n_prompts: int | None = Field(
        None, ge=1, description="Prompts per family (world) or in total (file); null: all."
    )
    n: int = Field(4, ge=1, description="Candidates per prompt.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (0: greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (1: off).")
    top_k: int = Field(0, ge=0, description="Top-k filter (0: off).")
    max_new_tokens: int = Field(64, ge=1, description="Most tokens per response.")
    batch_size: int = Field(64, ge=1, description="Sequences decoded together.")
    chunk: int = Field(32, ge=1, description="Prompts per progress step (and per generation call).")

    @model_validator(mode="after")
    def _no_silent_settings(self) -> Config:
        for key in ("top_p", "top_k"):
            if self.temperature == 0 and is_set(self, key):
                raise SettingError(key, "{at}temperature is 0 (greedy decoding), which filters "
                                   "nothing: drop it, or sample with a temperature above 0")  # fmt: skip
        for key in ("split", "families"):
            if self.prompts is not None and is_set(self, key):
                raise SettingError(key, "selects among the toy world's prompts, and {at}prompts "
                                   "names a file: drop it (n_prompts takes the file's first n)")  # fmt: skip
        return self


def inputs(cfg: Config, ctx: StageContext) -> dict[str, Path]:
    found = {"model": resolve_model(cfg.model, ctx)}
    name = f"tasks_{cfg.split}.jsonl"
    found["prompts"] = resolve_input(cfg.prompts, ctx, cfg.world_stage, name)
    return found


def load_prompts(path: Path, limit: int | None = None) -> list[dict]:
    """Prompt records {"prompt_id", "messages"}: see posttrain.data.readers.load_prompts (JSONL,
    Parquet, a datasets folder; errors name the file and line or row)."""
    from posttrain.data.readers import load_prompts as read

    return read(path, limit)


def _select(records: list[dict], cfg: Config, from_world: bool) -> list[dict]:
    if not from_world:
        return records[: cfg.n_prompts] if cfg.n_prompts else records
    if cfg.families:
        unknown = sorted(set(cfg.families) - {r["family"] for r in records})
        if unknown:
            raise ValueError(f"sample.families: unknown families {unknown}")
        records = [r for r in records if r["family"] in cfg.families]
    return first_per_family(records, cfg.n_prompts)


def candidate_record(prompt: dict, gens, task=None) -> dict:
    """One candidates.jsonl record from a prompt record and its generations."""
    from posttrain.world import check

    responses = []
    for g in gens:
        resp = {
            "text": g.text,
            "logprob": round(sum(g.logprobs), 5),
            "token_logprobs": [round(x, 5) for x in g.logprobs],
            "n_tokens": len(g.token_ids),
            "ended": bool(g.finished),
        }
        if task is not None:
            resp["gold"] = check(task, g.text.strip()).score
        responses.append(resp)
    head = {"prompt_id": prompt["prompt_id"]}
    if "family" in prompt:
        head["family"] = prompt["family"]
    return head | {"messages": prompt["messages"], "responses": responses}


def sample_candidates(cfg: Config, ctx: StageContext, paths: dict[str, Path]) -> list[dict]:
    """candidates.jsonl records: cfg.n samples for each selected prompt, with a progress line."""
    from posttrain.generate import SamplingParams, sample_n
    from posttrain.models.load import load_model
    from posttrain.models.tokenizer import load_tokenizer
    from posttrain.world import Task

    from_world = cfg.prompts is None
    prompts = _select(load_prompts(paths["prompts"]), cfg, from_world)
    if not prompts:
        raise ValueError(f"{ctx.name}: no prompts selected from {paths['prompts']}")
    tasks = {}
    for p in prompts:
        if "gold" in p:
            tasks[p["prompt_id"]] = Task(
                p["prompt_id"], p["family"], cfg.split, p["messages"][-1]["content"], "", p["gold"]
            )
    model, tok = load_model(paths["model"], ctx.device), load_tokenizer(paths["model"])
    model.eval()
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        greedy=cfg.temperature == 0,
        batch_size=cfg.batch_size,
        seed=ctx.seed,
    )
    ctx.logger.info(
        f"{ctx.name}: {cfg.n} candidates for each of {len(prompts)} prompts from {cfg.model}"
    )
    chunks = [prompts[i : i + cfg.chunk] for i in range(0, len(prompts), cfg.chunk)]
    # Under torchrun each rank samples every W-th chunk, with that chunk's own seed and prompts,
    # so the candidates are the ones a single process samples; rank 0 collects them in order.
    mine = dist.shard(list(range(len(chunks))))
    steplog = ctx.logger.progress(ctx.name, len(mine), ctx.stage_dir) if dist.is_main() else None
    if steplog is not None:
        steplog.begin(0)
    done: dict[int, list[dict]] = {}
    t0, n_tokens, n_prompts = time.perf_counter(), 0, 0
    try:
        for step, index in enumerate(mine, 1):
            chunk = chunks[index]
            texts = [
                tok.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=False)
                for p in chunk
            ]
            chunk_params = replace(params, seed=params.seed + index + 1)
            done[index] = []
            for p, gens in zip(
                chunk, sample_n(model, tok, texts, cfg.n, chunk_params), strict=True
            ):
                done[index].append(candidate_record(p, gens, tasks.get(p["prompt_id"])))
                n_tokens += sum(len(g.token_ids) for g in gens)
            n_prompts += len(chunk)
            if steplog is not None:
                steplog.log(step, {"sample/prompts": n_prompts * dist.world(),
                                   "sample/tokens_per_s": n_tokens * dist.world()
                                   / (time.perf_counter() - t0)})  # fmt: skip
    finally:
        if steplog is not None:
            steplog.close()
    for part in dist.gather(done):
        done |= part
    return [rec for index in range(len(chunks)) for rec in done[index]]


def run(cfg: Config, ctx: StageContext) -> StageResult:
    from posttrain.io import atomic_write_jsonl

    records = sample_candidates(cfg, ctx, inputs(cfg, ctx))
    if dist.is_main():
        atomic_write_jsonl(ctx.stage_dir / "candidates.jsonl", records)
    return StageResult(
        summarize_candidates(records), {"candidates": f"{ctx.name}/candidates.jsonl"}
    )


def summarize_candidates(records: list[dict]) -> dict:
    """Stage metrics: size, length, no-EOS share, within-prompt diversity, gold mean and best-of-n."""
    from posttrain.eval.metrics import distinct_n

    resps = [r for rec in records for r in rec["responses"]]
    m = {
        "sample/prompts": len(records),
        "sample/candidates": len(resps),
        "sample/mean_tokens": sum(r["n_tokens"] for r in resps) / len(resps),
        "sample/no_eos_frac": sum(not r["ended"] for r in resps) / len(resps),
        "sample/unique_frac": sum(
            len({r["text"] for r in rec["responses"]}) / len(rec["responses"]) for rec in records
        )
        / len(records),  # fmt: skip
        "sample/distinct_2": sum(
            distinct_n([r["text"] for r in rec["responses"]], 2) for rec in records
        )
        / len(records),  # fmt: skip
    }
    scored = [rec for rec in records if all("gold" in r for r in rec["responses"])]
    if scored:
        golds = [[r["gold"] for r in rec["responses"]] for rec in scored]
        m["sample/gold_mean"] = sum(sum(g) / len(g) for g in golds) / len(golds)
        m["sample/gold_best_of_n"] = sum(max(g) for g in golds) / len(golds)
        m["sample/gold_spread_frac"] = sum(max(g) > min(g) for g in golds) / len(golds)
    return m
