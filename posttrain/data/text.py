"""Plain-text corpora: JSONL of {"text": ...} or a .txt file, tokenised into one id stream."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from posttrain.io import check_file, decode_utf8, raw_lines, read_text


def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """Documents from a JSONL file (one {"text": str} per line) or a .txt file (one document).

    A malformed line, a missing field, a non-string value or bytes that are not UTF-8 are an
    error naming file and line.
    """
    path = check_file(path, "text data")
    if path.suffix != ".jsonl":
        return [read_text(path)]
    docs = []
    for i, offset, raw in raw_lines(path):
        line = decode_utf8(path, raw, i, offset)
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: malformed JSON: {e.msg}") from None
        if not isinstance(rec, dict) or field not in rec:
            raise ValueError(f"{path}:{i}: missing field {field!r}")
        if not isinstance(rec[field], str):
            raise ValueError(f"{path}:{i}: field {field!r} must be a string")
        docs.append(rec[field])
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs


def tokenize_stream(docs: list[str], tokenizer) -> torch.Tensor:
    """All documents as one 1-D id stream, each followed by EOS (so the model learns to stop)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)
