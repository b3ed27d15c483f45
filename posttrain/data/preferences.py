"""Preference pairs: the record the preference stages exchange, and readers of real pair data.

A pair record is `{"prompt_id": str, "messages": [...], "chosen": str, "rejected": str}`, with
optional `"margin": float`, `"annotator": str` and `"source"` (a str, or a dict of str such as
`{"chosen": generator, "rejected": generator}`). `messages` is the prompt: chat messages as in
`schema.py`, ending with a user turn; `chosen` / `rejected` are the two assistant replies to it,
both non-empty and different. Pairs sharing a prompt share its `prompt_id`.

Each reader returns `(pairs, stats)`. stats counts file records read ("records"), pairs "kept",
and what was dropped, one key per reason ("skipped_<reason>"), every key present even when 0.
A record that is not the format at all (bad JSON, not an object, a missing or non-string field)
is a `DataError` whose message starts with "FILE:LINE: " (or "FILE:record N: ", "FILE:row N: ");
the known flaws of real data (an empty reply, a tie) are skipped and counted instead. Every reader
takes JSONL, a JSON list, Parquet or a `datasets` save_to_disk folder (`tables.py`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.data.readers import (
    OASST_ROLES,
    _need_dict,
    _records,
    _usable,
    oasst_root,
    parse_hh_transcript,
)
from posttrain.data.schema import DataError, _validate_message
from posttrain.data.tables import check_data_path

Stats = dict[str, int]

_HH_ASSISTANT = "\n\nAssistant:"
_ROW = re.compile(r":row \d+$")


def _record_no(where: str, index: int) -> int:
    """A record's number for default ids: the line (or record) number at the end of a reader's
    "FILE:LINE" / "FILE:record N"; for a table ("SHARD:row N") the record's 1-based `index` over
    the whole dataset, so rows of different shards get different ids."""
    return index if _ROW.search(where) else int(re.search(r"(\d+)$", where).group(1))


def _field(rec: dict, key: str, where: str) -> Any:
    if key not in rec:
        raise DataError(
            f"{where}: missing field {key!r} (keys: {', '.join(sorted(rec)) or 'none'})"
        )
    return rec[key]


def _string(rec: dict, key: str, where: str) -> str:
    value = _field(rec, key, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} is not a string (got {type(value).__name__})")
    return value


def _raise(item: Any) -> Any:
    if isinstance(item, DataError):
        raise item
    return item


# ---------------------------------------------------------------- Anthropic HH-RLHF


def read_hh_pairs(path: str | Path) -> tuple[list[dict], Stats]:
    """Anthropic HH-RLHF {"chosen": transcript, "rejected": transcript} JSONL (or .jsonl.gz).

    Both transcripts are parsed with `parse_hh_transcript(..., merge_repeats=True)`: a repeated
    "\\n\\nAssistant:" marker is no new turn but part of the reply that ran past it (a sampled
    reply that invented a "Human:" turn and went on), kept verbatim. The prompt is every turn
    before the last, which must be the same in both transcripts; chosen / rejected are the two
    final assistant turns. prompt_id is "hh/<line>".

    Skipped and counted: `skipped_empty_reply` (a final reply that is empty, or a transcript
    ending with a Human turn), `skipped_identical` (chosen == rejected), `skipped_prompt_mismatch`
    (the transcripts differ before their final turns). Counted but kept: `early_divergence`, pairs
    whose raw transcripts differ before their last "\\n\\nAssistant:" marker (so the usual
    rfind-based prompt extraction would get them wrong) because a reply spans a repeated marker;
    `repeated_marker_in_prompt`, pairs whose prompt holds such a merged turn.
    """
    stats: Stats = dict.fromkeys(
        (
            "records",
            "kept",
            "skipped",
            "skipped_empty_reply",
            "skipped_identical",
            "skipped_prompt_mismatch",
            "early_divergence",
            "repeated_marker_in_prompt",
        ),
        0,
    )
    pairs = []
    for n, (where, rec) in enumerate(_records(Path(path)), 1):
        stats["records"] += 1
        rec = _need_dict(_raise(rec), where)
        chosen = parse_hh_transcript(_field(rec, "chosen", where), where, merge_repeats=True)
        rejected = parse_hh_transcript(_field(rec, "rejected", where), where, merge_repeats=True)
        reason = None
        if any(t[-1]["role"] != "assistant" or not t[-1]["content"] for t in (chosen, rejected)):
            reason = "skipped_empty_reply"
        elif chosen[:-1] != rejected[:-1]:
            reason = "skipped_prompt_mismatch"
        elif chosen[-1]["content"] == rejected[-1]["content"]:
            reason = "skipped_identical"
        if reason is not None:
            stats[reason] += 1
            stats["skipped"] += 1
            continue
        messages = chosen[:-1]
        replies = (chosen[-1]["content"], rejected[-1]["content"])
        stats["early_divergence"] += any(_HH_ASSISTANT in r for r in replies)
        stats["repeated_marker_in_prompt"] += any(_HH_ASSISTANT in m["content"] for m in messages)
        pairs.append(
            {
                "prompt_id": f"hh/{_record_no(where, n)}",
                "messages": messages,
                "chosen": replies[0],
                "rejected": replies[1],
            }
        )
    stats["kept"] = len(pairs)
    return pairs, stats


# ---------------------------------------------------------------- OpenAssistant trees


def read_oasst_pairs(path: str | Path) -> tuple[list[dict], Stats]:
    """Ranked sibling replies of OASST message trees (one tree per line) -> pairs.

    At every usable prompter message with >= 2 usable ranked assistant replies, each two of those
    siblings give a pair, the lower `rank` (0 = best) chosen: all i < j in rank order, so k ranked
    replies give k(k-1)/2 pairs. messages = the path from the tree's root to that prompter
    message (prompter -> user, assistant -> assistant); prompt_id = its message_id; margin = the
    rank difference (rejected rank - chosen rank, >= 1). Deleted messages and those with
    review_result false are left out with their subtrees, as in `read_oasst_trees`.

    stats: "records" (trees), "kept" (pairs), "parents" (prompter messages that gave pairs),
    `skipped_unranked` (assistant replies without a rank beside another assistant reply),
    `skipped_empty_reply` (ranked replies with empty text), `skipped_unusable` (deleted or
    rejected messages, each cutting its subtree); and pairs not made: `skipped_tie` (two
    siblings of equal rank), `skipped_identical` (two siblings with the same text).
    """
    stats: Stats = dict.fromkeys(
        (
            "records",
            "kept",
            "parents",
            "skipped_unranked",
            "skipped_empty_reply",
            "skipped_unusable",
            "skipped_tie",
            "skipped_identical",
        ),
        0,
    )
    pairs: list[dict] = []
    for where, rec in _records(Path(path)):
        stats["records"] += 1
        root = oasst_root(_raise(rec), where)
        stack: list[tuple[dict, list[dict]]] = [(root, [])]
        while stack:
            node, above = stack.pop()
            if not _usable(node):
                stats["skipped_unusable"] += 1
                continue
            text = node.get("text")
            if node.get("role") not in OASST_ROLES or not isinstance(text, str):
                raise DataError(f"{where}: message {node.get('message_id')}: bad role or text")
            messages = [*above, {"role": OASST_ROLES[node["role"]], "content": text}]
            children = node.get("replies") or []
            if node["role"] == "prompter":
                pairs.extend(_oasst_sibling_pairs(node, messages, stats))
            stack.extend((child, messages) for child in reversed(children))
    stats["kept"] = len(pairs)
    return pairs, stats


def _oasst_sibling_pairs(parent: dict, messages: list[dict], stats: Stats) -> list[dict]:
    replies = [
        r for r in parent.get("replies") or [] if r.get("role") == "assistant" and _usable(r)
    ]
    if len(replies) < 2:
        return []
    ranked = []
    for r in replies:
        if not isinstance(r.get("rank"), int):
            stats["skipped_unranked"] += 1
        elif not isinstance(r.get("text"), str) or not r["text"].strip():
            stats["skipped_empty_reply"] += 1
        else:
            ranked.append(r)
    ranked.sort(key=lambda r: r["rank"])
    out = []
    for i, better in enumerate(ranked):
        for worse in ranked[i + 1 :]:
            if better["rank"] == worse["rank"]:
                stats["skipped_tie"] += 1
            elif better["text"] == worse["text"]:
                stats["skipped_identical"] += 1
            else:
                margin = float(worse["rank"] - better["rank"])
                out.append(
                    {
                        "prompt_id": str(parent.get("message_id")),
                        "messages": messages,
                        "chosen": better["text"],
                        "rejected": worse["text"],
                        "margin": margin,
                    }
                )
    stats["parents"] += bool(out)
    return out


# ---------------------------------------------------------------- AlpacaEval annotations


def read_alpaca_eval_pairs(path: str | Path) -> tuple[list[dict], Stats]:
    """AlpacaEval pairwise annotations (a JSON list, or JSONL) -> pairs.

    Each {"instruction", "output_1", "output_2", "preference", "generator_1"?, "generator_2"?,
    "annotator"?}: preference 1 -> output_1 chosen, 2 -> output_2 chosen. messages = [the
    instruction as a user turn]; prompt_id = "alpaca_eval/<record>"; source = {"chosen",
    "rejected"}: the generators' names when both are given; annotator kept when given.

    Skipped and counted: `skipped_tie` (preference 0 or 1.5), `skipped_no_preference` (missing,
    null or NaN), `skipped_other_preference` (any other value, e.g. a soft 1.3),
    `skipped_empty_reply`, `skipped_identical` (a decided preference between identical outputs).
    """
    stats: Stats = dict.fromkeys(
        (
            "records",
            "kept",
            "skipped",
            "skipped_tie",
            "skipped_no_preference",
            "skipped_other_preference",
            "skipped_empty_reply",
            "skipped_identical",
        ),
        0,
    )
    pairs = []
    for n, (where, rec) in enumerate(_records(Path(path)), 1):
        stats["records"] += 1
        rec = _need_dict(_raise(rec), where)
        instruction = _string(rec, "instruction", where)
        outputs = (_string(rec, "output_1", where), _string(rec, "output_2", where))
        pref = rec.get("preference")
        reason = None
        if isinstance(pref, bool) or not isinstance(pref, int | float | None):
            raise DataError(f"{where}: preference is not a number (got {type(pref).__name__})")
        if pref is None or math.isnan(pref):
            reason = "skipped_no_preference"
        elif pref in (0, 1.5):
            reason = "skipped_tie"
        elif pref not in (1, 2):
            reason = "skipped_other_preference"
        elif not all(o.strip() for o in outputs):
            reason = "skipped_empty_reply"
        elif outputs[0] == outputs[1]:
            reason = "skipped_identical"
        if reason is not None:
            stats[reason] += 1
            stats["skipped"] += 1
            continue
        win = 0 if pref == 1 else 1
        pair = {
            "prompt_id": f"alpaca_eval/{_record_no(where, n)}",
            "messages": [{"role": "user", "content": instruction}],
            "chosen": outputs[win],
            "rejected": outputs[1 - win],
        }
        if isinstance(rec.get("annotator"), str):
            pair["annotator"] = rec["annotator"]
        gens = (rec.get("generator_1"), rec.get("generator_2"))
        if all(isinstance(g, str) for g in gens):
            pair["source"] = {"chosen": gens[win], "rejected": gens[1 - win]}
        pairs.append(pair)
    stats["kept"] = len(pairs)
    return pairs, stats


# ---------------------------------------------------------------- our own pair records


def _file_stem(path: Path) -> str:
    name = path.name.removesuffix(".gz")
    for suffix in (".jsonl", ".ndjson", ".json"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return Path(name).stem


def _validate_prompt(rec: dict, where: str, default_prompt_id: str | None) -> tuple[str, list]:
    """(prompt_id, messages) of a record's prompt: chat messages ending with a user turn, or a
    plain "prompt" string (then prompt_id defaults to `default_prompt_id`)."""
    if "messages" in rec or "prompt" not in rec:
        raw = _field(rec, "messages", where)
        if not isinstance(raw, list) or not raw:
            raise DataError(f'{where}: field "messages" must be a non-empty list')
        messages = [_validate_message(m, i, f'{where}: "messages"') for i, m in enumerate(raw)]
        if messages[-1]["role"] != "user":
            raise DataError(
                f'{where}: "messages" must end with a user turn (ends with {messages[-1]["role"]})'
            )
        prompt_id = _field(rec, "prompt_id", where)
        if isinstance(prompt_id, int) and not isinstance(prompt_id, bool):
            prompt_id = str(prompt_id)
        if not isinstance(prompt_id, str) or not prompt_id:
            raise DataError(f'{where}: field "prompt_id" must be a non-empty string')
    else:
        prompt = _string(rec, "prompt", where)
        messages = [{"role": "user", "content": prompt}]
        prompt_id = rec.get("prompt_id", default_prompt_id)
        if not isinstance(prompt_id, str) or not prompt_id:
            raise DataError(f'{where}: field "prompt_id" must be a non-empty string')
    if not messages[-1]["content"].strip():
        raise DataError(f"{where}: the prompt's last user turn is empty")
    return prompt_id, messages


def validate_pair(rec: Any, where: str, default_prompt_id: str | None = None) -> dict:
    """A normalised copy of a pair record (either form); DataError(f"{where}: ...") if it is bad.

    The plain form {"prompt": str, "chosen", "rejected"} becomes messages = [the prompt as a user
    turn], prompt_id = `default_prompt_id`. Keys outside the contract are dropped.
    """
    rec = _need_dict(rec, where)
    prompt_id, messages = _validate_prompt(rec, where, default_prompt_id)
    out: dict = {"prompt_id": prompt_id, "messages": messages}
    for key in ("chosen", "rejected"):
        out[key] = _string(rec, key, where)
        if not out[key].strip():
            raise DataError(f"{where}: field {key!r} is an empty response")
    if out["chosen"] == out["rejected"]:
        raise DataError(f'{where}: "chosen" and "rejected" are the same response')
    margin = rec.get("margin")
    if margin is not None:
        if (
            isinstance(margin, bool)
            or not isinstance(margin, int | float)
            or not math.isfinite(margin)
        ):
            raise DataError(f'{where}: field "margin" must be a finite number (got {margin!r})')
        out["margin"] = float(margin)
    if rec.get("annotator") is not None:
        out["annotator"] = _string(rec, "annotator", where)
    source = rec.get("source")
    if source is not None:
        ok = isinstance(source, str) or (
            isinstance(source, dict) and all(isinstance(v, str) for v in source.values())
        )
        if not ok:
            raise DataError(f'{where}: field "source" must be a string or a dict of strings')
        out["source"] = source
    return out


def read_pair_records(path: str | Path) -> tuple[list[dict], Stats]:
    """Our pair records (the record above, or the plain {"prompt", "chosen", "rejected"} form).

    Strict: the first bad record raises a DataError naming file, line and field: a missing
    field, a non-string or empty chosen/rejected, chosen == rejected, a prompt that does not end
    with a user turn, an unknown role. Plain records get prompt_id "<file stem>/<line>".
    stats: "records", "kept" (equal) and "skipped" (0: nothing is skipped).
    """
    return _read_strict(path, validate_pair)


def _read_strict(
    path: str | Path, validate: Callable[[Any, str, str], dict]
) -> tuple[list[dict], Stats]:
    """Every record validated (plain ones get prompt_id "<file stem>/<line or row>")."""
    path = Path(path)
    stem = _file_stem(path)
    recs = [
        validate(_raise(rec), where, f"{stem}/{_record_no(where, n)}")
        for n, (where, rec) in enumerate(_records(path), 1)
    ]
    return recs, {"records": len(recs), "kept": len(recs), "skipped": 0}


# ---------------------------------------------------------------- format choice

PAIR_READERS: dict[str, Callable[[str | Path], tuple[list[dict], Stats]]] = {
    "pairs": read_pair_records,
    "hh": read_hh_pairs,
    "oasst": read_oasst_pairs,
    "alpaca_eval": read_alpaca_eval_pairs,
}


def detect_pair_format(path: str | Path) -> str:
    """Guess a preference file's format from its first record's keys."""
    path = check_data_path(path, "preference data")
    first = next(_records(path), None)
    if first is None:
        raise ValueError(f"{path}: no records, cannot detect its format")
    where, rec = first
    rec = _raise(rec)
    keys = set(rec) if isinstance(rec, dict) else set()
    if "message_tree_id" in keys or (keys and isinstance(rec.get("prompt"), dict)):
        return "oasst"
    if {"output_1", "output_2"} <= keys:
        return "alpaca_eval"
    if {"chosen", "rejected"} <= keys:
        if "messages" in keys or "prompt" in keys:
            return "pairs"
        chosen = rec["chosen"]
        if isinstance(chosen, str) and chosen.startswith("\n\nHuman:"):
            return "hh"
        if path.name.endswith(".jsonl.gz"):
            return "hh"
    found = ", ".join(sorted(keys)) if keys else type(rec).__name__
    raise ValueError(
        f"{where}: cannot detect the preference format (first record: {found}); "
        f"pass format= one of {', '.join(PAIR_READERS)}"
    )


def load_pairs(path: str | Path, format: str = "auto") -> tuple[list[dict], Stats]:
    """Read preference pairs with the reader for `format` (auto: `detect_pair_format`)."""
    path = Path(path)
    if format != "auto" and format not in PAIR_READERS:
        raise ValueError(
            f"unknown preference format {format!r}; known: auto, {', '.join(PAIR_READERS)}"
        )
    check_data_path(path, "preference data")
    if format == "auto":
        format = detect_pair_format(path)
    return PAIR_READERS[format](path)


# ---------------------------------------------------------------- unpaired feedback (KTO)
# A feedback record is {"prompt_id", "messages", "completion": str, "label": bool}: one reply
# judged good (True, desirable) or bad (False) on its own, thumbs up/down (TRL's "unpaired
# preference" form also has the plain {"prompt", "completion", "label"}).


def validate_feedback(rec: Any, where: str, default_prompt_id: str | None = None) -> dict:
    """A normalised copy of a feedback record; DataError(f"{where}: ...") if it is bad."""
    rec = _need_dict(rec, where)
    prompt_id, messages = _validate_prompt(rec, where, default_prompt_id)
    completion = _string(rec, "completion", where)
    if not completion.strip():
        raise DataError(f"{where}: field 'completion' is an empty response")
    label = _field(rec, "label", where)
    if not isinstance(label, bool):
        raise DataError(f"{where}: field 'label' must be true or false (got {label!r})")
    return {"prompt_id": prompt_id, "messages": messages, "completion": completion, "label": label}


def read_feedback_records(path: str | Path) -> tuple[list[dict], Stats]:
    """Feedback records, strict: the first bad record raises a DataError naming file and line
    (or row)."""
    return _read_strict(path, validate_feedback)


def pairs_to_feedback(pairs: list[dict]) -> list[dict]:
    """Each pair as two feedback records: its chosen reply desirable, its rejected one not."""
    return [
        {
            "prompt_id": p["prompt_id"],
            "messages": p["messages"],
            "completion": p[key],
            "label": label,
        }
        for p in pairs
        for key, label in (("chosen", True), ("rejected", False))
    ]


def load_feedback(path: str | Path, format: str = "auto") -> tuple[list[dict], Stats]:
    """Feedback records from a feedback file (format "feedback", or auto when the first record
    has "completion" and "label"), or from any preference-pair format, each pair split in two."""
    path = check_data_path(path, "feedback data")
    if format == "auto":
        first = next(_records(path), None)
        rec = _raise(first[1]) if first else None
        if isinstance(rec, dict) and {"completion", "label"} <= set(rec):
            format = "feedback"
    if format == "feedback":
        return read_feedback_records(path)
    pairs, stats = load_pairs(path, format)
    return pairs_to_feedback(pairs), stats | {"from_pairs": len(pairs)}
