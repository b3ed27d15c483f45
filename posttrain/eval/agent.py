"""Metrics of tool-using episodes (agent.env.Trajectory): gold success, tool use, failures.

One record per task (`agent_record`): the episode's counts, its final answer and the answer's
gold under world.agent_tasks.check_with_tools (a knowledge question asked with a lookup tool is
scored as a lookup: abstaining is wrong). An episode that ends without an answer (max_turns, a
turn cut at max_new_tokens, or out of context) has the answer "" and scores 0.

The card's figures (`summarize_agent`), each a ratio of sums over the records, so that
eval/intervals.py bootstraps them as it does the toy world's:
- agent/success_rate: mean gold over every task (agent/success/<kind>: over the agent family's
  tasks of one kind: lookup, first_letter, n_letters, sum_letters);
- agent/tool_calls_per_task, agent/tool_use_rate (tasks with at least one call),
  agent/turns_per_task (assistant turns);
- agent/invalid_call_rate: calls that could not run (bad JSON, unknown tool, arguments off the
  schema) over all calls made;
- agent/tool_error_rate: valid calls whose tool failed (an exception, flaky_lookup's outage, a
  time-out) over valid calls made (the valid calls of a turn cut at max_turns count as made and
  not failed, though they never ran);
- agent/no_answer_rate: episodes that ended without an answer;
- agent/<metric> for each metric.summarize gives on the records (agent/gold/<family>,
  agent/gold/mean, agent/knowledge/..., agent/length/mean_tokens: tokens generated over all
  turns, agent/length/truncated_rate: episodes ended by a turn cut at max_new_tokens).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np

PREFIX = "agent/"


def agent_record(task, traj, tools: Iterable[str]) -> dict:
    """One task's record: its gold (with these tools available) and the episode's counts and
    messages. task: a world Task; traj: an agent.env.Trajectory (or any object with its
    fields)."""
    from posttrain.world.agent_tasks import check_with_tools

    tools = list(tools)
    response = traj.final_answer.strip() if traj.finished else ""
    c = check_with_tools(task, response, tools)
    return {
        "prompt_id": task.prompt_id,
        "family": task.family,
        "kind": task.gold.get("kind", task.family),
        "prompt": task.prompt,
        "response": response,
        "score": c.score,
        "components": c.components,
        "n_tokens": int(sum(traj.action_mask)),
        "truncated": traj.stop_reason == "max_new_tokens",
        "finished": traj.finished,
        "stop_reason": traj.stop_reason,
        "turns": traj.turns,
        "n_tool_calls": traj.n_tool_calls,
        "n_invalid_calls": traj.n_invalid_calls,
        "n_tool_errors": traj.n_tool_errors,
        "render_mismatches": traj.render_mismatches,
        "tools": tools,
        "messages": traj.messages,
    }


def agent_columns(records: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metric -> (x, w), each (N,): the metric is sum w x / sum w (eval/intervals.py's form)."""

    def arr(xs) -> np.ndarray:
        return np.array(list(xs), float)

    one = np.ones(len(records))
    calls = arr(r["n_tool_calls"] for r in records)
    invalid = arr(r["n_invalid_calls"] for r in records)
    valid = calls - invalid
    errors = arr(r["n_tool_errors"] for r in records)
    score = arr(r["score"] for r in records)
    col = {
        "agent/success_rate": (score, one),
        "agent/tool_calls_per_task": (calls, one),
        "agent/tool_use_rate": (arr(c > 0 for c in calls), one),
        "agent/turns_per_task": (arr(r["turns"] for r in records), one),
        "agent/invalid_call_rate": (invalid / np.maximum(calls, 1), calls),
        "agent/tool_error_rate": (errors / np.maximum(valid, 1), valid),
        "agent/no_answer_rate": (arr(not r["finished"] for r in records), one),
    }
    kinds = sorted({r["kind"] for r in records if r["family"] == "agent"})
    for k in kinds:
        col[f"agent/success/{k}"] = (score, arr(r["family"] == "agent" and r["kind"] == k
                                                for r in records))  # fmt: skip
    return col


def summarize_agent(records: list[dict]) -> dict:
    """The figures of the module docstring (a rate without any record that counts is left out)."""
    from posttrain.eval.metrics import summarize

    out = {PREFIX + k: v for k, v in summarize(records).items()}
    for k, (x, w) in agent_columns(records).items():
        if w.sum() > 0:
            out[k] = float((w * x).sum() / w.sum())
    return out


def agent_intervals(records: list[dict], ref: list[dict] | None = None) -> tuple[dict, dict]:
    """(metric -> [lo, hi], metric -> [difference, lo, hi] against `ref`'s records on the same
    tasks, paired; {} without ref): 95% bootstrap intervals over the tasks (eval/intervals.py)."""
    from posttrain.eval.intervals import intervals, paired

    cols = agent_columns(records)
    ci = {PREFIX + k: v for k, v in intervals(records).items()} | intervals(records, cols=cols)
    if not ref:
        return ci, {}
    diff = {PREFIX + k: v for k, v in paired(records, ref).items()}
    diff |= paired(records, ref, cols=cols, ref_cols=agent_columns(ref))
    return ci, diff


def transcript(messages: list[dict]) -> str:
    """The episode after the user's request, one line per event, for the report:
    assistant text, "-> name {arguments}" per call, "<- name: result" per tool message."""
    start = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    lines = []
    for m in messages[start:]:
        if m["role"] == "tool":
            lines.append(f"<- {m.get('name', 'tool')}: {m['content']}")
            continue
        if m.get("content"):
            lines.append(str(m["content"]))
        for c in m.get("tool_calls") or []:
            f = c.get("function", c)
            lines.append(f"-> {f.get('name') or '?'} {json.dumps(f.get('arguments'))}")
    return "\n".join(lines)


def agent_samples(records: list[dict], per_family: int) -> list[dict]:
    """The first `per_family` episodes of each family as sample rows of the report (family
    "<family> (with tools)", the response the whole transcript), with their messages."""
    from posttrain.world.task import first_per_family

    return [{"prompt_id": r["prompt_id"], "family": f"{r['family']} (with tools)",
             "prompt": r["prompt"], "response": transcript(r["messages"]), "score": r["score"],
             "n_tokens": r["n_tokens"], "truncated": r["truncated"], "turns": r["turns"],
             "n_tool_calls": r["n_tool_calls"], "stop_reason": r["stop_reason"],
             "messages": r["messages"]}
            for r in first_per_family(records, per_family)]  # fmt: skip
