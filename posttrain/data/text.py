"""Plain-text corpora: records of {"text": ...} or a .txt file, tokenised into one id stream."""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain.data.schema import DataError
from posttrain.data.tables import check_data_path, is_table, iter_records
from posttrain.io import read_text

_RECORD_NAMES = (".jsonl", ".jsonl.gz", ".ndjson")


def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """Documents: the `field` of each record of a JSONL file (one {"text": str} per line), a
    Parquet file or folder, or a `datasets` save_to_disk folder; any other file is one document.

    A malformed line, a missing field, a non-string value or bytes that are not UTF-8 are an
    error naming the file and the line (or row).
    """
    path = check_data_path(path, "text data")
    if not (is_table(path) or path.name.lower().endswith(_RECORD_NAMES)):
        return [read_text(path)]
    docs = []
    for where, rec in iter_records(path):
        if isinstance(rec, DataError):
            raise rec
        if not isinstance(rec, dict) or field not in rec:
            raise DataError(f"{where}: missing field {field!r}")
        if not isinstance(rec[field], str):
            raise DataError(f"{where}: field {field!r} must be a string")
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
