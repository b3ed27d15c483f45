"""Tool-using agents: tools, parsing of tool calls, and batched multi-turn episodes for RL.

from posttrain.agent import resolve_tools, run_episodes
tools = resolve_tools(["lookup", "calculator", "my_pkg.tools:search"], world=world)
trajs = run_episodes(model, tok, conversations, tools, SamplingParams(), max_turns=4)
"""

from posttrain.agent.env import Trajectory, run_episodes
from posttrain.agent.parse import ParsedTurn, ToolCall, parse_turn
from posttrain.agent.tools import (
    Tool,
    ToolResult,
    call,
    load_tool,
    resolve_tools,
    toy_tools,
    validate_arguments,
)

__all__ = [
    "ParsedTurn",
    "Tool",
    "ToolCall",
    "ToolResult",
    "Trajectory",
    "call",
    "load_tool",
    "parse_turn",
    "resolve_tools",
    "run_episodes",
    "toy_tools",
    "validate_arguments",
]
