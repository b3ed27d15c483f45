"""Readers of real chat-data formats, each converting to the chat-example record of `schema.py`.

Formats: OpenAI/HF "messages" JSONL, Alpaca (and self-instruct seed tasks), ShareGPT, OASST
message trees, Anthropic HH transcripts; each from JSONL, a JSON list, Parquet or a `datasets`
save_to_disk folder (`tables.py` reads them all). A reader yields `(where, example)` with `where`
= "FILE:LINE" (JSONL, 1-based line), "FILE:record N" (a whole-file JSON list, 1-based) or
"FILE:row N" (Parquet / Arrow, 1-based); every error it raises is a `DataError` whose message
starts with that `where`. `load_chat_data` picks
a reader, validates every example and either stops at the first bad record or skips and counts.
Files are read as bytes and decoded line by line, so bytes that are not UTF-8 are an error naming
the file, the line and the byte offset (a JSONL line's error can be skipped like any other).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from posttrain.data.schema import DataError, validate_example, validate_prompt
from posttrain.data.tables import check_data_path, read_records
from posttrain.data.tables import iter_records as _records  # curate and benchmarks use it too

Converter = Callable[..., list[dict]]  # (raw record, where, **options) -> raw examples


def _iter_converted(
    path: Path, convert: Converter, counts: dict | None = None
) -> Iterator[tuple[str, dict | DataError]]:
    """(where, raw example | DataError): a bad record becomes an item, so a caller may skip it."""
    for where, raw in _records(path):
        if counts is not None:
            counts["records"] += 1
        if isinstance(raw, DataError):
            yield where, raw
            continue
        try:
            examples = convert(raw, where)
        except DataError as e:
            yield where, e
            continue
        for ex in examples:
            yield where, ex


def _strict(path: str | Path, convert: Converter) -> Iterator[tuple[str, dict]]:
    for where, item in _iter_converted(Path(path), convert):
        if isinstance(item, DataError):
            raise item
        yield where, item


def _need_dict(rec: Any, where: str) -> dict:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: record is not an object (got {type(rec).__name__})")
    return rec


def _with_meta(rec: dict, messages: list, **extra) -> dict:
    out = {"messages": messages, **extra}
    for key in ("tools", "id"):
        if rec.get(key) is not None and key not in out:
            out[key] = rec[key]
    return out


def _convert_messages(rec: Any, where: str) -> list[dict]:
    rec = _need_dict(rec, where)
    for key in ("messages", "conversations", "conversation"):
        if key in rec:
            msgs = rec[key]
            if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) and "from" in msgs[0]:
                raise DataError(f'{where}: "{key}" uses from/value turns: read it as sharegpt')
            return [_with_meta(rec, msgs)]
    raise DataError(f'{where}: missing "messages" (keys: {", ".join(sorted(rec)) or "none"})')


def read_messages_jsonl(path: str | Path) -> Iterator[tuple[str, dict]]:
    """OpenAI/HF chat JSONL: {"messages": [{"role", "content", ...}], "tools"?, "id"?} per line.

    "conversations" / "conversation" keys holding role/content turns are accepted too.
    """
    return _strict(path, _convert_messages)


def _alpaca_pair(instruction: Any, inp: Any, output: Any, where: str) -> list[dict]:
    if not isinstance(instruction, str):
        raise DataError(f'{where}: "instruction" is missing or not a string')
    if inp is not None and not isinstance(inp, str):
        raise DataError(f'{where}: "input" is not a string')
    if not isinstance(output, str):
        raise DataError(f'{where}: "output" is missing or not a string')
    user = instruction + ("\n\n" + inp if inp and inp.strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _convert_alpaca(rec: Any, where: str) -> list[dict]:
    rec = _need_dict(rec, where)
    if "instances" in rec:  # self-instruct seed task: one example per (input, output) instance
        instances = rec["instances"]
        if not isinstance(instances, list) or not instances:
            raise DataError(f'{where}: "instances" must be a non-empty list')
        out = []
        for k, inst in enumerate(instances):
            inst = _need_dict(inst, f"{where}: instance {k}")
            task_id, instruction = rec.get("id"), rec.get("instruction")
            msgs = _alpaca_pair(instruction, inst.get("input"), inst.get("output"), where)
            ex_id = task_id if len(instances) == 1 or task_id is None else f"{task_id}#{k}"
            out.append(_with_meta(rec, msgs, **({"id": ex_id} if ex_id is not None else {})))
        return out
    if "output" not in rec:
        raise DataError(f'{where}: missing "output" (keys: {", ".join(sorted(rec))})')
    msgs = _alpaca_pair(rec.get("instruction"), rec.get("input"), rec["output"], where)
    return [_with_meta(rec, msgs)]


def read_alpaca(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Alpaca {"instruction", "input", "output"} (JSON list or JSONL) -> [user, assistant].

    The user turn is the instruction, plus "\\n\\n" + input when the input is not blank; there is
    no system turn. Self-instruct seed tasks ({"instruction", "instances": [{"input", "output"}]})
    give one example per instance.
    """
    return _strict(path, _convert_alpaca)


SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",  # a tool's result (LLaMA-Factory's name for it)
    "function_call": "assistant",  # the assistant's call, its value JSON {"name", "arguments"}
}


def _sharegpt_turn(turn: Any, where: str, k: int) -> dict:
    if not isinstance(turn, dict):
        raise DataError(f"{where}: turn {k} is not an object")
    source, value = turn.get("from"), turn.get("value")
    if source not in SHAREGPT_ROLES:
        known = ", ".join(SHAREGPT_ROLES)
        raise DataError(f'{where}: turn {k}: unknown "from" {source!r} (expected one of {known})')
    if source != "function_call":
        return {"role": SHAREGPT_ROLES[source], "content": value}
    try:
        calls = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: turn {k}: function_call value is not JSON: {e.msg}") from None
    calls = calls if isinstance(calls, list) else [calls]
    fns = [{"type": "function", "function": c} for c in calls]
    return {"role": "assistant", "content": "", "tool_calls": fns}


def _convert_sharegpt(rec: Any, where: str) -> list[dict]:
    rec = _need_dict(rec, where)
    turns = rec.get("conversations", rec.get("conversation"))
    if not isinstance(turns, list):
        raise DataError(f'{where}: missing "conversations" list (keys: {", ".join(sorted(rec))})')
    messages = [_sharegpt_turn(t, where, k) for k, t in enumerate(turns)]
    if isinstance(rec.get("system"), str) and rec["system"].strip():
        messages.insert(0, {"role": "system", "content": rec["system"]})
    tools = rec.get("tools")  # LLaMA-Factory stores the tool schemas as a JSON string
    if isinstance(tools, str) and tools.strip():
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f'{where}: "tools" is not JSON: {e.msg}') from None
    return [_with_meta(rec, messages, **({"tools": tools} if tools else {}))]


def read_sharegpt(path: str | Path) -> Iterator[tuple[str, dict]]:
    """ShareGPT {"conversations": [{"from", "value"}]} (JSON list or JSONL).

    from: human/user -> user, gpt/assistant -> assistant, system, tool/observation -> tool,
    function_call -> an assistant turn with tool_calls. Any other "from" is a DataError naming it.
    """
    return _strict(path, _convert_sharegpt)


def _usable(msg: dict) -> bool:
    return not msg.get("deleted", False) and msg.get("review_result", True) is not False


def _best_reply(prompter: dict) -> dict | None:
    """The lowest-`rank` usable assistant reply; without any rank, the first usable one."""
    cands = [
        r for r in prompter.get("replies") or [] if r.get("role") == "assistant" and _usable(r)
    ]
    ranked = [r for r in cands if isinstance(r.get("rank"), int)]
    if ranked:
        return min(ranked, key=lambda r: r["rank"])  # min keeps the first of a tie
    return cands[0] if cands else None


def _oasst_paths(prompter: dict) -> list[list[dict]]:
    """Every conversation starting at this prompter message, as a list of tree nodes."""
    best = _best_reply(prompter)
    if best is None:
        return []  # an unanswered prompt ends no conversation
    tails = [
        path
        for child in best.get("replies") or []
        if child.get("role") == "prompter" and _usable(child)
        for path in _oasst_paths(child)
    ]
    return [[prompter, best, *tail] for tail in tails] or [[prompter, best]]


OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


def oasst_root(rec: Any, where: str) -> dict:
    """The root (prompter) message of one OASST tree record; DataError if it is not one."""
    rec = _need_dict(rec, where)
    root = rec.get("prompt")
    if not isinstance(root, dict) or root.get("role") != "prompter":
        raise DataError(f'{where}: "prompt" is not a prompter message (not an OASST tree?)')
    return root


def _convert_oasst(rec: Any, where: str) -> list[dict]:
    root = oasst_root(rec, where)
    if not _usable(root):
        return []
    out = []
    for path in _oasst_paths(root):
        msgs = [{"role": OASST_ROLES[m["role"]], "content": m.get("text")} for m in path]
        out.append({"messages": msgs, "id": path[-1].get("message_id")})
    return out


def read_oasst_trees(path: str | Path) -> Iterator[tuple[str, dict]]:
    """OASST message trees (one {"message_tree_id", "prompt": {..., "replies": [...]}} per line).

    Flattening rule: at each assistant level keep only the best reply (lowest `rank`; replies
    without a rank come after ranked ones, and if none is ranked the first is taken), skipping
    deleted messages and those with review_result false; at each prompter level follow every
    usable prompter reply. A prompter message with no usable assistant reply is dropped, so every
    conversation ends with an assistant turn: one conversation per leaf of this pruned tree.
    Roles: prompter -> user, assistant -> assistant. Each example's id is its last message_id.
    """
    return _strict(path, _convert_oasst)


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_transcript(text: Any, where: str, merge_repeats: bool = False) -> list[dict]:
    """Split "\\n\\nHuman: ...\\n\\nAssistant: ..." into messages (contents stripped).

    Only a marker preceded by a blank line starts a turn; "Human:" inside a turn stays text.
    DataError if the transcript does not start with "\\n\\nHuman:" or one speaker has two turns
    in a row. A trailing empty Assistant turn is kept (content ""), for prompt extraction.
    With `merge_repeats`, a marker repeating the current speaker starts no turn: it and the text
    after it stay, verbatim, in that speaker's turn (a sampled reply that ran on past a turn).
    """
    if not isinstance(text, str):
        raise DataError(f"{where}: HH transcript is not a string (got {type(text).__name__})")
    if not text.startswith("\n\nHuman:"):
        raise DataError(f"{where}: HH transcript does not start with '\\n\\nHuman:': {text[:40]!r}")
    parts = _HH_TURN.split(text)  # ["", "Human", " text", "Assistant", " text", ...]
    turns: list[list[str]] = []  # [role, raw body]
    for k, (speaker, body) in enumerate(zip(parts[1::2], parts[2::2], strict=True)):
        role = "user" if speaker == "Human" else "assistant"
        if turns and turns[-1][0] == role:
            if not merge_repeats:
                raise DataError(
                    f"{where}: HH transcript has two {speaker} turns in a row (turn {k})"
                )
            turns[-1][1] += f"\n\n{speaker}:{body}"
            continue
        turns.append([role, body])
    return [{"role": role, "content": body.strip()} for role, body in turns]


def _convert_hh(rec: Any, where: str, field: str = "chosen") -> list[dict]:
    rec = _need_dict(rec, where)
    if field not in rec:
        raise DataError(f"{where}: missing field {field!r} (keys: {', '.join(sorted(rec))})")
    messages = parse_hh_transcript(rec[field], where)
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: HH transcript ends with a Human turn")
    return [{"messages": messages}]


def read_hh(path: str | Path, field: str = "chosen") -> Iterator[tuple[str, dict]]:
    """Anthropic HH-RLHF JSONL (.jsonl or .jsonl.gz): the `field` transcript of each pair."""
    return _strict(path, functools.partial(_convert_hh, field=field))


READERS: dict[str, Callable[..., Iterator[tuple[str, dict]]]] = {
    "messages": read_messages_jsonl,
    "alpaca": read_alpaca,
    "sharegpt": read_sharegpt,
    "oasst": read_oasst_trees,
    "hh": read_hh,
}
_CONVERTERS: dict[str, Converter] = {
    "messages": _convert_messages,
    "alpaca": _convert_alpaca,
    "sharegpt": _convert_sharegpt,
    "oasst": _convert_oasst,
    "hh": _convert_hh,
}


def _format_of_record(rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return None
    if "message_tree_id" in rec or isinstance(rec.get("prompt"), dict):
        return "oasst"
    if isinstance(rec.get("chosen"), str) and rec["chosen"].startswith("\n\nHuman:"):
        return "hh"
    if "messages" in rec:
        return "messages"
    turns = rec.get("conversations", rec.get("conversation"))
    if isinstance(turns, list) and turns and isinstance(turns[0], dict):
        return "sharegpt" if "from" in turns[0] else "messages"
    if "instances" in rec or "instruction" in rec:
        return "alpaca"
    return None


def detect_format(path: str | Path) -> str:
    """Guess a chat file's format from its first record (and, for HH, its *.jsonl.gz name)."""
    path = check_data_path(path, "chat data")
    first = next(_records(path), None)
    if first is None:
        raise ValueError(f"{path}: no records, cannot detect its format")
    where, rec = first
    if isinstance(rec, DataError):
        raise rec
    fmt = _format_of_record(rec)
    is_pair = isinstance(rec, dict) and {"chosen", "rejected"} <= set(rec)
    if fmt is None and is_pair and path.name.endswith(".jsonl.gz"):
        fmt = "hh"
    if fmt is None:
        keys = ", ".join(sorted(rec)) if isinstance(rec, dict) else type(rec).__name__
        raise ValueError(
            f"{where}: cannot detect the chat format (first record: {keys}); "
            f"pass format= one of {', '.join(READERS)}"
        )
    return fmt


def load_chat_data(
    path: str | Path, format: str = "auto", on_error: str = "raise", **options
) -> tuple[list[dict], dict]:
    """Read and validate a chat file: (examples, stats).

    stats: {"format", "records": file records, "read": examples read (kept + skipped),
    "kept", "skipped", "errors": the first 5 error messages}. on_error "raise" lets the first
    DataError propagate; "skip" drops bad records and counts them. `options` go to the reader
    (e.g. field="rejected" for hh).
    """
    path = check_data_path(path, "chat data")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if format == "auto":
        format = detect_format(path)
    if format not in _CONVERTERS:
        raise ValueError(f"unknown chat format {format!r}; known: auto, {', '.join(READERS)}")
    convert = functools.partial(_CONVERTERS[format], **options)
    stats: dict = {"format": format, "records": 0, "read": 0, "kept": 0, "skipped": 0, "errors": []}
    examples = []
    for where, item in _iter_converted(path, convert, stats):
        stats["read"] += 1
        try:
            if isinstance(item, DataError):
                raise item
            examples.append(validate_example(item, where))
        except DataError as e:
            if on_error == "raise":
                raise
            stats["skipped"] += 1
            if len(stats["errors"]) < 5:
                stats["errors"].append(str(e))
    stats["kept"] = len(examples)
    return examples, stats


def load_prompts(path: str | Path, limit: int | None = None) -> list[dict]:
    """Prompt records {"prompt_id", "messages"} from {"messages"} or {"prompt": str} records (the
    sample and RL stages' `prompts`; a {"prompt": str} record also keeps its "text", which the
    RL stages' rollout.prompt_format: plain gives the policy as it is), in any format `tables.py` reads; "family" and "gold" are
    kept when both are given (the toy world's tasks). prompt_id defaults to "<stem>/<record>"
    (record numbered from 1). Errors name the file and the line or row."""
    path = check_data_path(path, "prompts")
    stem, out = path.stem, []
    for i, (where, rec) in enumerate(read_records(path), 1):
        if "messages" not in rec and "prompt" not in rec:
            raise DataError(f"{where}: a prompt record needs 'messages' or 'prompt'")
        if "messages" in rec:
            msgs = validate_prompt(rec["messages"], where)
        else:
            if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
                raise DataError(f"{where}: 'prompt' must be a non-empty string")
            msgs = [{"role": "user", "content": rec["prompt"]}]
        prompt = {"prompt_id": str(rec.get("prompt_id", f"{stem}/{i}")), "messages": msgs}
        if "messages" not in rec:  # the text as given, for completion-style (plain) prompts
            prompt["text"] = rec["prompt"]
        if "gold" in rec and "family" in rec:
            prompt |= {"family": rec["family"], "gold": rec["gold"]}
        out.append(prompt)
    return out[:limit] if limit else out
