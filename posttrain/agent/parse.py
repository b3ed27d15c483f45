"""Parse an assistant's generated text into its content and tool calls.

The format is the one the chat template renders (models/tokenizer.py, as Qwen2.5 and Hermes):
zero or more blocks

    <tool_call>
    {"name": "lookup", "arguments": {"person": "Ebopli", "attribute": "town"}}
    </tool_call>

anywhere in the turn; the text outside the blocks is the content. A block that cannot be run
(unclosed, bad JSON, no name or arguments, an unknown tool, arguments that do not fit the
schema) is still a call, marked invalid with the reason: the environment answers it with an
"error: <reason>" tool message, as a real agent loop would, instead of crashing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from posttrain.agent.tools import Tool, validate_arguments

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.S)


@dataclass(frozen=True)
class ToolCall:
    name: str  # "" when the block named none
    arguments: Any  # the parsed arguments; the block's raw text when it did not parse
    error: str | None = None  # why the call cannot run; None: valid

    @property
    def valid(self) -> bool:
        return self.error is None

    def message(self) -> dict:
        """The call as an entry of an assistant message's `tool_calls` (the chat format)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ParsedTurn:
    content: str  # the text outside the blocks, each piece stripped, joined by newlines
    tool_calls: list[ToolCall]


def parse_call(raw: str, tools: Mapping[str, Tool]) -> ToolCall:
    """One block's inner text -> a ToolCall (invalid, with the reason, if it cannot run)."""
    raw = raw.strip()
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return ToolCall("", raw, f"tool call is not valid JSON ({e})")
    if not isinstance(obj, dict):
        return ToolCall("", raw, "tool call must be a JSON object with name and arguments")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ToolCall("", obj.get("arguments", raw), 'tool call has no "name"')
    if "arguments" not in obj:
        return ToolCall(name, {}, f'tool call to {name} has no "arguments"')
    arguments = obj["arguments"]
    if isinstance(arguments, str):  # OpenAI's form: the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            return ToolCall(name, obj["arguments"], f"arguments of {name} are not JSON ({e})")
    if name not in tools:
        known = ", ".join(tools) or "none"
        return ToolCall(name, arguments, f"unknown tool {name!r} (available: {known})")
    return ToolCall(name, arguments, validate_arguments(tools[name], arguments))


def parse_turn(text: str, tools: Mapping[str, Tool] | Iterable[Tool]) -> ParsedTurn:
    """Split an assistant turn's text into content and calls, in the order they appear."""
    if not isinstance(tools, Mapping):
        tools = {t.name: t for t in tools}
    pieces, calls, at = [], [], 0
    for m in _BLOCK.finditer(text):
        pieces.append(text[at : m.start()])
        calls.append(parse_call(m.group(1), tools))
        at = m.end()
    rest = text[at:]
    if OPEN in rest:  # a block the model never closed (it stopped, or ran out of tokens)
        head, _, tail = rest.partition(OPEN)
        pieces.append(head)
        calls.append(ToolCall("", tail.strip(), f"unclosed {OPEN} block (no {CLOSE})"))
    else:
        pieces.append(rest)
    content = "\n".join(p.strip() for p in pieces if p.strip())
    return ParsedTurn(content, calls)
