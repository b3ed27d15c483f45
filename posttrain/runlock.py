"""One run at a time in a run directory: a lock on `<run_dir>/.lock`.

Two runs writing to the same folder corrupt each other silently (one clears and rewrites the
stage folders under the other; their metrics lines interleave). So a run holds an exclusive
`flock` on `<run_dir>/.lock` for its whole length, and writes into that file who holds it (pid,
host, command, start time) so that a second run can say whom it is waiting for. The kernel drops
a `flock` when its holder dies, however it dies: a run killed with SIGKILL leaves its holder
record behind but not the lock, and the next run takes the folder over (and says so). A clean
exit empties the file. Where the filesystem has no `flock` (ENOLCK, EOPNOTSUPP: some network
mounts), the holder record alone decides: a holder on this host whose pid is gone is stale.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; the holder record alone decides
    fcntl = None

LOCK_NAME = ".lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirLocked(ValueError):
    """Another live run holds the run directory. Also a ValueError, so the command line reports
    it as a plain error (exit 2), not a traceback."""


def holder_record() -> dict:
    """Who this process is, as written into the lock file."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _describe(holder: dict) -> str:
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
        f"started {holder.get('started', '?')}: {holder.get('command') or '?'}"
    )


def _read_holder(fd: int) -> dict | None:
    """The record in the lock file, or None if it is empty (released cleanly)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        holder = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"command": "(unreadable lock record)"}
    return holder if isinstance(holder, dict) else None


def _alive_here(holder: dict) -> bool:
    """Whether the holder is a process that still runs on this host (unknown hosts count as
    alive: from here there is no telling)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except (KeyError, TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _write_holder(fd: int, holder: dict) -> None:
    data = (json.dumps(holder) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
    os.fsync(fd)


def _busy(run_dir: Path, holder: dict | None) -> RunDirLocked:
    who = _describe(holder) if holder else "a process whose record is not written yet"
    return RunDirLocked(
        f"run directory {run_dir} is in use by another run ({who}); wait for it to finish, "
        f"or give this run another out= (two runs in one folder overwrite each other)"
    )


@contextlib.contextmanager
def hold(run_dir: str | Path, say: Callable[[str], None] = print) -> Iterator[dict]:
    """Hold `run_dir`'s lock for the duration of the block (creating the folder); yields this
    process's holder record. Raises RunDirLocked, naming the holder, if a live run holds it;
    takes over (with a line through `say`) a lock left by a run that died."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # O_RDWR without O_TRUNC: the holder's record must survive until we know we may replace it.
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            if fcntl is None:
                raise OSError(errno.ENOSYS, "no flock")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flocked = True
        except BlockingIOError:
            raise _busy(run_dir, _read_holder(fd)) from None
        except OSError as e:
            if e.errno not in _NO_FLOCK:
                raise
            flocked = False  # no flock here: the holder record alone decides
        previous = _read_holder(fd)
        if previous is not None and not flocked and _alive_here(previous):
            raise _busy(run_dir, previous)
        if previous is not None:
            say(f"{run_dir}: taking over the lock of a run that ended without releasing it "
                f"({_describe(previous)})")  # fmt: skip
        me = holder_record()
        _write_holder(fd, me)
        try:
            yield me
        finally:
            os.ftruncate(fd, 0)  # released cleanly: an empty lock file is a free folder
    finally:
        os.close(fd)  # drops the flock
