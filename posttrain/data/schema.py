"""The chat-example record every stage exchanges, and its validation.

A chat example is `{"messages": [...], "tools"?: [...], "id"?: str}`. Each message is
`{"role": "system"|"user"|"assistant"|"tool", "content": str}`; an assistant message may carry
`"tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict | str}}]`
(its content may then be "" or absent, normalised to ""); a tool message may carry
`"tool_call_id"` and `"name"`. Keys outside this contract are dropped by `validate_example`.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A bad record; the message starts with 'FILE:LINE: ' (or 'FILE:record N: ')."""


def validate_example(rec: Any, where: str) -> dict:
    """Return a normalised copy of a chat example; raise DataError(f"{where}: ...") if it is bad.

    Checks: a dict with a non-empty "messages" list; every message a dict with a known role and
    string content (None/absent only for an assistant turn with tool_calls); no empty assistant
    response without tool_calls; at least one assistant turn; well-formed tool_calls (a function
    name); a system message only in first position.
    """
    if not isinstance(rec, dict):
        raise DataError(f"{where}: record is not an object (got {type(rec).__name__})")
    raw = rec.get("messages")
    if not isinstance(raw, list) or not raw:
        raise DataError(f'{where}: missing or empty "messages"')
    messages = [_validate_message(m, i, where) for i, m in enumerate(raw)]
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn")
    out: dict = {"messages": messages}
    if rec.get("tools") is not None:
        if not isinstance(rec["tools"], list):
            raise DataError(f'{where}: "tools" must be a list (got {type(rec["tools"]).__name__})')
        out["tools"] = rec["tools"]
    if rec.get("id") is not None:
        out["id"] = str(rec["id"])
    return out


def validate_prompt(raw: Any, where: str) -> list[dict]:
    """A prompt's messages (a conversation waiting for the assistant): the checks of
    validate_example, but it must end with a user turn instead of containing an assistant one."""
    if not isinstance(raw, list) or not raw:
        raise DataError(f'{where}: missing or empty "messages"')
    messages = [_validate_message(m, i, where) for i, m in enumerate(raw)]
    if messages[-1]["role"] != "user":
        raise DataError(f"{where}: a prompt must end with a user turn, not {messages[-1]['role']}")
    return messages


def _validate_message(msg: Any, i: int, where: str) -> dict:
    at = f"{where}: message {i}"
    if not isinstance(msg, dict):
        raise DataError(f"{at}: not an object (got {type(msg).__name__})")
    role = msg.get("role")
    if role not in ROLES:
        raise DataError(f"{at}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if role == "system" and i != 0:
        raise DataError(f"{at}: system message must come first")
    tool_calls = msg.get("tool_calls") or None  # an empty list means no calls
    if tool_calls is not None and role != "assistant":
        raise DataError(f"{at}: tool_calls on a {role} message (only assistant turns call tools)")
    content = msg.get("content")
    if content is None and tool_calls is not None:
        content = ""
    if not isinstance(content, str):
        raise DataError(f"{at}: content is not a string (got {type(content).__name__})")
    if role == "assistant" and not content.strip() and tool_calls is None:
        raise DataError(f"{at}: empty response (assistant content is empty and has no tool_calls)")
    out = {"role": role, "content": content}
    if tool_calls is not None:
        out["tool_calls"] = _validate_tool_calls(tool_calls, at)
    # reasoning fields reach the chat template, which decides whether to render them (Qwen3's
    # reasoning_content, gpt-oss's thinking); tool turns keep what matches a result to its call
    keys = {"assistant": ("reasoning_content", "thinking", "reasoning"),
            "tool": ("tool_call_id", "name")}.get(role, ())  # fmt: skip
    for key in keys:
        if msg.get(key) is not None:
            if not isinstance(msg[key], str):
                raise DataError(f"{at}: {key} must be a string")
            out[key] = msg[key]
    return out


def _validate_tool_calls(calls: Any, at: str) -> list[dict]:
    if not isinstance(calls, list):
        raise DataError(f"{at}: tool_calls must be a list (got {type(calls).__name__})")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise DataError(f"{at}: tool_calls[{j}] has no function name")
        args = fn.get("arguments", {})
        if not isinstance(args, dict | str):
            raise DataError(f"{at}: tool_calls[{j}] arguments must be a dict or a JSON string")
        norm = {"type": "function", "function": {"name": name, "arguments": args}}
        if isinstance(call.get("id"), str):
            norm["id"] = call["id"]  # OpenAI's call id, matched by a tool turn's tool_call_id
        out.append(norm)
    return out
