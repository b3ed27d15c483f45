"""The evaluate stage's agent evaluation (cfg.agent): every chat model's multi-turn tool-use
episodes on the held-out tasks, their agent/* metrics and intervals."""

from __future__ import annotations

from typing import TYPE_CHECKING

from posttrain.train import dist
from posttrain.world.task import first_per_family

if TYPE_CHECKING:
    from posttrain.stages.base import StageContext
    from posttrain.stages.evaluate import Config


AGENT_HEADLINE = ("agent/success_rate", "agent/tool_calls_per_task", "agent/no_answer_rate")


def _agent_setup(cfg: Config, every: list, world) -> tuple[list, list, dict]:
    """(the held-out tasks of cfg.agent.families, the tools, {} for each model's records)."""
    from posttrain.agent import resolve_tools

    held = {t.family for t in every}
    for family in cfg.agent.families:
        if family not in held:
            why = " (set world.agent to make them)" if family == "agent" else ""
            raise ValueError(f"evaluate.agent.families: the world's held-out tasks hold no "
                             f"{family} task{why}")  # fmt: skip
    tasks = first_per_family([t for t in every if t.family in cfg.agent.families],
                             cfg.n_per_family)  # fmt: skip
    return tasks, resolve_tools(cfg.agent.tools, world=world), {}


def _agent_eval(label: str, model, tok, agent_run: tuple, cfg: Config, ctx: StageContext,
                artifacts: dict, samples: dict) -> dict:  # fmt: skip
    """One model's tool-use episodes (rank 0 alone): its agent/* summary; writes
    <label>.agent.jsonl and adds a few episodes to its samples."""
    from posttrain.agent import run_episodes
    from posttrain.eval.agent import agent_record, agent_samples, summarize_agent
    from posttrain.generate import SamplingParams
    from posttrain.io import atomic_write_jsonl

    if not dist.is_main():
        return {}
    tasks, tools, by_label = agent_run
    a = cfg.agent
    ctx.logger.info(f"{ctx.name}: {label} with tools ({', '.join(t.name for t in tools)}), at "
                    f"most {a.max_turns} turns, on {len(tasks)} held-out tasks")  # fmt: skip
    params = SamplingParams(max_new_tokens=a.max_new_tokens, greedy=True,
                            batch_size=cfg.batch_size, seed=ctx.seed)  # fmt: skip
    trajs = run_episodes(model, tok, [t.messages() for t in tasks], tools, params, a.max_turns,
                         a.time_limit_s)  # fmt: skip
    names = [t.name for t in tools]
    records = [agent_record(t, tr, names) for t, tr in zip(tasks, trajs, strict=True)]
    atomic_write_jsonl(ctx.stage_dir / f"{label}.agent.jsonl", records)
    artifacts[f"{label}.agent"] = f"{ctx.name}/{label}.agent.jsonl"
    samples.setdefault(label, []).extend(agent_samples(records, a.samples_per_family))
    by_label[label] = records
    summary = summarize_agent(records)
    ctx.logger.info(f"{ctx.name}: {label} with tools: " + ", ".join(
        f"{k.removeprefix('agent/')} {summary[k]:.3f}" for k in AGENT_HEADLINE if k in summary))  # fmt: skip
    return summary


def _agent_intervals(evals: dict, by_label: dict[str, list[dict]]) -> None:
    """Each model's agent/* intervals into its ci95, and (paired, on the same tasks) its
    differences from the reference model's into vs_<reference>."""
    from posttrain.eval.agent import agent_intervals
    from posttrain.eval.intervals import REFERENCE

    ref = by_label.get(REFERENCE)
    for label, records in by_label.items():
        ci, diff = agent_intervals(records, ref if label != REFERENCE else None)
        ev = evals[label]
        ev.setdefault("ci95", {}).update({k: v for k, v in ci.items() if k in ev})
        if diff:
            vs = ev.setdefault(f"vs_{REFERENCE}", {})
            vs.update({k: v for k, v in diff.items() if k in ev})
            ev[f"vs_{REFERENCE}"] = dict(sorted(vs.items()))
