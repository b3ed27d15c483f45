"""Records of a data path, whatever its format: the one place that turns a path into
`(where, record)` pairs, shared by every reader (chat data, preference pairs, feedback, prompts,
text).

Formats, and the `where` that every error about a record starts with:
- JSONL (`.jsonl`, `.ndjson`, `.jsonl.gz`, or any name whose content does not start with "["):
  "FILE:LINE" (1-based line);
- a whole-file JSON list (`.json`): "FILE:record N";
- Parquet: a `.parquet` file, or a directory of `.parquet` shards (read in name order):
  "FILE:row N" (1-based row of that file);
- Arrow: an `.arrow` file, or a directory written by `datasets`' `Dataset.save_to_disk`
  (state.json, dataset_info.json and data-0000x-of-0000n.arrow shards, Arrow IPC stream format):
  "SHARD:row N". A `DatasetDict.save_to_disk` directory (dataset_dict.json, one folder per split)
  is refused with the list of its split folders: point the path at the split to read, so that a
  test split is never trained on by accident.

A row comes out as the dict its JSON line would give: lists of structs as lists of dicts, nulls
in lists as None, with one rule: a null struct field (or column) is left out, because Arrow gives
every row every field that any row has (null where the row had none), e.g. "tool_calls": null on
every message that made no call, or the argument names of every other tool call.

pyarrow is imported only to read Parquet or Arrow; without it the error says
`pip install 'posttrain[data]'`. Nothing is downloaded: a Hub dataset name ("org/name") that is
not a local path is an error saying how to save it locally first.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from posttrain.data.schema import DataError
from posttrain.io import decode_utf8, raw_lines, read_text

TABLE_SUFFIXES = (".parquet", ".arrow")
_DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".gz", ".txt", ".csv", *TABLE_SUFFIXES)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SPLIT_SHARD = re.compile(r"^(?P<split>.+?)-\d+-of-\d+\.parquet$")  # HF's train-00000-of-00002
_BATCH_ROWS = 1024  # rows converted to Python at a time


class MissingPyarrow(ImportError, ValueError):
    """pyarrow is not installed; a ValueError too, so the command line reports it plainly."""


def _pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise MissingPyarrow(
            f"reading {path} (Parquet / Arrow) needs pyarrow: pip install 'posttrain[data]'"
        ) from None
    return pyarrow


def is_table(path: Path) -> bool:
    """Whether `path` is read as a table (Parquet, Arrow, or a directory of them)."""
    return path.is_dir() or path.name.lower().endswith(TABLE_SUFFIXES)


def looks_like_hub_name(path: str | Path) -> bool:
    """Whether a path that does not exist reads as a Hub dataset name: "org/name", no data-file
    suffix, and no local folder "org" (then it is a local path with a typo)."""
    path, text = Path(path), str(path)
    return (
        not path.exists()
        and _HUB_NAME.match(text) is not None
        and not text.lower().endswith(_DATA_SUFFIXES)
        and not path.parent.exists()
    )


def check_data_path(path: str | Path, what: str = "data file") -> Path:
    """`path` if it exists (a file, or a directory read as a table); else FileNotFoundError
    naming the path as resolved, with how to save a Hub dataset locally when it looks like one."""
    path = Path(path)
    if path.exists():
        return path
    text = str(path)
    if looks_like_hub_name(path):
        raise FileNotFoundError(
            f"{what} {text!r} is not a local path (resolved: {path.resolve()}) and looks "
            "like a Hugging Face Hub dataset name; posttrain downloads nothing. Save it "
            f"locally first: python -c \"import datasets; datasets.load_dataset('{text}', "
            "split='train').save_to_disk('DIR')\", then point data.path (the setting that "
            "named it) at DIR"
        )
    raise FileNotFoundError(f"{what} not found: {path} (resolved: {path.resolve()})")


def iter_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, record) per record of `path`; a malformed JSONL line yields (where, DataError),
    so a caller may skip it. A file that cannot be read as a whole (a JSON document that does not
    parse or is no list, a file that is not Parquet) raises at once: nothing of it can be trusted.
    """
    path = check_data_path(path)
    if is_table(path):
        yield from _table_records(path)
    elif _is_jsonl(path):
        yield from _jsonl_records(path)
    else:
        yield from _json_list_records(path)


def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, record) per record, strict: the first malformed record or non-object raises a
    DataError starting with its `where`."""
    for where, rec in iter_records(path):
        if isinstance(rec, DataError):
            raise rec
        if not isinstance(rec, dict):
            raise DataError(f"{where}: record is not an object (got {type(rec).__name__})")
        yield where, rec


# ---------------------------------------------------------------- JSON lines and JSON lists


def _is_jsonl(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return True
    if name.endswith(".json"):
        return False
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        head = f.read(4096)  # unknown suffix: a JSON list starts with "[" (after any BOM)
    return not head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"[")


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    for i, offset, raw in raw_lines(path):
        where = f"{path}:{i}"
        try:
            line = decode_utf8(path, raw, i, offset)
        except ValueError as e:
            yield where, DataError(str(e))
            continue
        if not line.strip():
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            yield where, DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno})")


def _json_list_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    except ValueError as e:  # not UTF-8
        raise DataError(str(e)) from None
    if not isinstance(data, list):
        raise DataError(f"{path}:1: expected a JSON list of records (got {type(data).__name__})")
    for n, rec in enumerate(data, 1):
        yield f"{path}:record {n}", rec


# ---------------------------------------------------------------- Parquet and Arrow


def table_files(path: Path) -> list[Path]:
    """The Parquet / Arrow files of a table path, in reading order (see the module docstring)."""
    if not path.is_dir():
        return [path]
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        example = "train" if "train" in splits or not splits else splits[0]
        raise ValueError(
            f"{path} is a datasets DatasetDict (splits: {', '.join(splits) or 'none'}): point the "
            f"path at the folder of the split to read, e.g. {path / example}"
        )
    if (path / "state.json").is_file():
        try:
            state = json.loads((path / "state.json").read_text(encoding="utf-8"))
            files = [path / f["filename"] for f in state["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"{path / 'state.json'}: not a datasets save_to_disk state ({e})"
            ) from None
        return files
    shards = sorted(path.glob("*.parquet"))
    if not shards:
        subdirs = sorted(p.name for p in path.iterdir() if p.is_dir())
        hint = f"; its folders: {', '.join(subdirs)}: point at one" if subdirs else ""
        raise ValueError(
            f"{path} is a directory, expected a file, a folder of .parquet shards or a datasets "
            f"save_to_disk folder (it holds no *.parquet, state.json or dataset_dict.json{hint})"
        )
    splits = sorted({m["split"] for s in shards if (m := _SPLIT_SHARD.match(s.name))})
    if len(splits) > 1:
        raise ValueError(
            f"{path} holds the Parquet shards of several splits ({', '.join(splits)}): move the "
            "shards of the split to read into a folder of their own and point the path at it"
        )
    return shards


def _table_records(path: Path) -> Iterator[tuple[str, dict]]:
    pa = _pyarrow(path)
    for f in table_files(path):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: a file of {path} is missing")
        row = 0
        for batch in _batches(pa, f):
            for rec in batch.to_pylist(maps_as_pydicts="lossy"):
                row += 1
                yield f"{f}:row {row}", _without_nulls(rec)


def _batches(pa, f: Path) -> Iterator:
    """Record batches of a Parquet file, or of an Arrow IPC stream (save_to_disk) or file."""
    try:
        if f.name.lower().endswith(".parquet"):
            yield from pa.parquet.ParquetFile(f).iter_batches(batch_size=_BATCH_ROWS)
            return
        source = pa.memory_map(str(f))
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:  # not a stream: the random-access Arrow file format
            reader = pa.ipc.open_file(source)
            yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
            return
        yield from reader
    except (pa.ArrowException, OSError) as e:
        kind = "Parquet" if f.name.lower().endswith(".parquet") else "Arrow"
        raise DataError(f"{f}: cannot be read as {kind}: {e}") from None


def _without_nulls(value: Any) -> Any:
    """A row as its JSON would give it: null fields of dicts left out, recursively."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value
