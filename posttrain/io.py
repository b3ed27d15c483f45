"""Atomic file writes, checked reads of data files, and content hashes.

Every artifact is written to a temporary name in the same directory and then renamed, so a
killed run never leaves a half-written file (or directory) under its final name; what a killed
run does leave is a hidden temporary (`.NAME.XXXXXXXX.tmp`, `.NAME.XXXXXXXX.old`), which
`clean_stale_temps` removes. A full disk is a `DiskFullError` naming the file being written.
Readers name the file, line and byte offset of bytes that are not UTF-8.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

BIG_FILE_BYTES = 64 * 2**20  # above this, hash (size, mtime) instead of contents
# The names atomic_path / atomic_dir give their temporaries: "." + final name + "." + the
# 8 random characters of mkstemp / mkdtemp + ".tmp" (or ".old", a replaced directory).
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.(tmp|old)$")
_NO_SPACE = ("no space left on device", "storagefull", "os error 28", "code: 28", "unexpected pos")


class DiskFullError(OSError, ValueError):
    """The disk filled up while writing an artifact (errno ENOSPC). Also a ValueError, so the
    command line reports it as a plain error (exit 2), not a traceback."""

    def __init__(self, path: str | Path):
        super().__init__(
            f"no space left on device while writing {path}; free space (or point out= at another "
            "disk) and rerun with --resume: the checkpoints already written are intact"
        )
        self.errno, self.filename = errno.ENOSPC, str(path)

    def __str__(self) -> str:
        return self.args[0]


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` (or an exception it was raised from) is a write that ran out of space:
    OSError ENOSPC/EDQUOT, torch.save's "unexpected pos" RuntimeError, or safetensors'
    SafetensorError wrapping "No space left on device" (os error 28)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, RuntimeError | OSError) or type(e).__name__ == "SafetensorError":
            if any(s in str(e).lower() for s in _NO_SPACE):
                return True
        e = e.__cause__ or e.__context__
    return False


def _umask() -> int:
    """The process's umask, read without changing it (os.umask sets it, racing other threads)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(tmp)
        try:  # mkstemp makes 0600; the artifact gets the mode any other tool would give it
            os.fchmod(fd, 0o666 & ~_umask())
        finally:
            os.close(fd)
        yield tmp
        os.replace(tmp, path)
    except Exception as e:
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise DiskFullError(path) from e
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_yaml(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def atomic_write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=True) + "\n")
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path`.

    POSIX cannot rename a directory over a non-empty one, so an existing `path` is first renamed
    aside, then deleted once the new one is in place (and put back if the swap fails).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = old = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as e:
        if old is not None and not path.exists():
            os.replace(old, path)  # put the previous version back
            old = None
        if isinstance(e, Exception) and is_disk_full(e) and not isinstance(e, DiskFullError):
            raise DiskFullError(path) from e
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def clean_stale_temps(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove what killed atomic writes left in `folder` (not below it): the hidden
    `.NAME.XXXXXXXX.tmp` files and folders, and `.NAME.XXXXXXXX.old` folders; with `name`, only
    those of that artifact. Call it only where no write into `folder` is under way."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP_NAME.match(p.name)
        if m is None or (name is not None and m.group("name") != name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one line with a single write(2) in O_APPEND mode: a line is whole or absent (a
    write cut short by a full disk is truncated away, then a DiskFullError)."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        end = os.fstat(fd).st_size
        try:
            short = os.write(fd, data) != len(data)
        except OSError as e:
            if not is_disk_full(e):
                raise
            short = True
        if short:
            os.ftruncate(fd, end)
            raise DiskFullError(path)
    finally:
        os.close(fd)


def check_file(path: str | Path, what: str = "data file") -> Path:
    """`path` if it is a file; else FileNotFoundError (missing) or ValueError (a directory)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{what} {path} is a directory, expected a file: give the path of a file in it"
        )
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def utf8_error(path, data: bytes, e: UnicodeDecodeError, line: int, offset: int) -> str:
    """The message "FILE:LINE: not valid UTF-8 ..." for `data` (line `line`, from byte `offset`
    of the file), with the bad byte's offset in the file and what to do."""
    bad = data[e.start : e.start + 1].hex()
    where = "uncompressed " if str(path).endswith(".gz") else ""
    return (
        f"{path}:{line}: not valid UTF-8 (byte 0x{bad} at {where}byte offset {offset + e.start}); "
        f"fix that line or re-encode the file as UTF-8 (e.g. iconv -f cp1252 -t utf-8 {path} > "
        f"{path}.utf8 if it is Windows-1252/Latin-1 text)"
    )


def decode_utf8(path: str | Path, data: bytes, line: int = 1, offset: int = 0) -> str:
    """`data` (from line `line`, at byte `offset` of `path`) as text; a ValueError naming the
    file, the line and the byte offset if it is not UTF-8. Line numbers of a multi-line `data`
    count from `line`."""
    if offset == 0 and data.startswith(b"\xef\xbb\xbf"):  # a byte-order mark is no text
        data, offset = data[3:], 3
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line += data.count(b"\n", 0, e.start)
        raise ValueError(utf8_error(path, data, e, line, offset)) from None


def raw_lines(path: str | Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number from 1, byte offset of the line, its bytes) of a file (.gz: uncompressed)."""
    path = Path(path)
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        offset = 0
        for i, raw in enumerate(f, 1):
            yield i, offset, raw
            offset += len(raw)


def read_text(path: str | Path) -> str:
    """A whole UTF-8 file (.gz: uncompressed); bytes that are not UTF-8 are a ValueError naming
    the file, line and byte offset."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    text = decode_utf8(path, data)
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads it


def read_jsonl(path: str | Path) -> list[dict]:
    """Read JSONL; a malformed line or bytes that are not UTF-8 are an error naming the file
    and line."""
    path = check_file(path)
    out = []
    for i, offset, raw in raw_lines(path):
        line = decode_utf8(path, raw, i, offset)
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: malformed JSON: {e.msg}") from None
    return out


def hash_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory's (relative path, file hash) list; big files by size+mtime."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        st = f.stat()
        if st.st_size > BIG_FILE_BYTES:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            continue
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
