"""Multi-turn rollouts with tools, laid out as the RL stages' (S, L) response matrices.

An episode (`posttrain.agent.run_episodes`: each turn of every open episode decoded in one
batch, then the calls run, time-limited) becomes one `TokenizedExample`:

    input_ids  = trajectory.token_ids     prompt | turn 1 | tool turns + header | turn 2 ...
    loss_mask  = trajectory.action_mask      0   |   1    |          0          |   1

so its labels are IGNORE_INDEX everywhere but on the tokens the policy generated (each turn's
stop token included). The prompt, the tool results and the template's tokens between turns are
context: every forward sees them, and no log-prob, KL, entropy, value or loss is ever read
there. Row i of a rollout's (S, L) matrices then holds episode i's action tokens left-aligned,
all its turns one after the other (L_i = its number of action tokens), which is exactly the
row-major order in which `token_logps` returns the labelled positions: every loss, KL,
advantage and reduction of the single-turn stages applies unchanged. For PPO this means values
are read where each action token is predicted and GAE runs over the action tokens in order,
stepping over the tool turns (as verl's and OpenRLHF's agent loops do): the value after a
call's last token is the value before the next turn's first, which has seen the tool's result.

A forward over `token_ids` reproduces the sampler's log-probs at the action tokens (the
environment's invariant, checked in tests/test_agent_env.py and tests/test_rl_tools.py), so the
trainer's on-policy shortcuts (the update's own forward as the old log-probs, the fused forward,
packing) hold for these sequences as they are.
"""

from __future__ import annotations

import torch

from posttrain.data.chat import TokenizedExample
from posttrain.rl.rollout import Rollout, response_mask

# Per-episode counts of a Trajectory, kept on the Rollout (`episodes`) for penalties and metrics.
COUNTS = ("turns", "n_tool_calls", "n_invalid_calls", "n_tool_errors", "render_mismatches")


def trajectory_example(traj) -> TokenizedExample:
    """An episode as a training sequence: all its tokens, the loss mask on its action tokens."""
    return TokenizedExample(list(traj.token_ids), list(traj.action_mask))


def tool_rollout(policy, tok, prompts: list[dict], k: int, params, tools: list,
                 max_turns: int, time_limit_s: float) -> Rollout:  # fmt: skip
    """k episodes for each prompt record ({"messages", ...}) with `tools`, as a Rollout (no
    scores yet): texts are the final answers, `finished` is "ended with an answer" (not at
    max_turns, at a turn cut by max_new_tokens or at the model's context length).

    run_episodes decodes turn t with seed params.seed + t; the RL stages' step seeds are
    consecutive, so turn 1 of one step would reuse the random stream of turn 0 of the next:
    the seed is spread to params.seed * max_turns first."""
    import dataclasses

    from posttrain.agent import run_episodes

    params = dataclasses.replace(params, seed=params.seed * max_turns)
    recs = [p for p in prompts for _ in range(k)]
    trajs = run_episodes(policy, tok, [list(p["messages"]) for p in recs], tools, params,
                         max_turns, time_limit_s)  # fmt: skip
    for p, t in zip(recs, trajs, strict=True):
        if not any(t.action_mask):  # only when the prompt alone leaves no room for a turn
            raise ValueError(
                f"prompt {p.get('prompt_id')!r} has {t.prompt_len} tokens with its tools; with "
                f"rollout.max_new_tokens={params.max_new_tokens} that is more than the model's "
                "context: lower rollout.max_new_tokens or shorten the prompts"
            )
    ro = Rollout(
        recs,
        torch.arange(len(prompts)).repeat_interleave(k),
        [trajectory_example(t) for t in trajs],
        [t.final_answer.strip() for t in trajs],
        torch.tensor([t.finished for t in trajs]),
        response_mask([sum(t.action_mask) for t in trajs]),
    )
    ro.episodes = [{c: getattr(t, c) for c in COUNTS} for t in trajs]
    return ro


def tool_penalties(episodes: list[dict], per_call: float, per_invalid: float) -> torch.Tensor:
    """(S,) subtracted from each episode's score: per_call for every call it made (valid or
    not, those of a last turn that was not run included), plus per_invalid for every call
    that could not run (bad JSON, unknown tool, arguments outside the schema)."""
    return torch.tensor(
        [per_call * e["n_tool_calls"] + per_invalid * e["n_invalid_calls"] for e in episodes],
        dtype=torch.float,
    )


def tool_metrics(episodes: list[dict], all_sum=lambda xs: xs) -> dict[str, float]:
    """rollout/turns, rollout/tool_calls and rollout/render_mismatches per episode;
    rollout/invalid_call_rate and rollout/tool_error_rate per call (0 without calls). Counts go
    through `all_sum` (dist.all_sum under torchrun) so that every rank logs the global value."""
    sums = all_sum([float(len(episodes))] + [float(sum(e[c] for e in episodes)) for c in COUNTS])
    n, turns, calls, invalid, errors, mismatches = sums
    n, per_call = max(n, 1.0), max(calls, 1.0)
    return {
        "rollout/turns": turns / n,
        "rollout/tool_calls": calls / n,
        "rollout/invalid_call_rate": invalid / per_call,
        "rollout/tool_error_rate": errors / per_call,
        "rollout/render_mismatches": mismatches / n,
    }
