"""A model behind `posttrain serve` on the loopback, for as long as a `with` block lasts.

A pipeline stage that talks to a teacher "as to any endpoint" starts the server as a separate
process (`python -m posttrain serve DIR`), waits until `/v1/models` answers, yields the base
URL, and stops the server afterwards (also on error). The server's output goes to a log file,
whose tail is shown if the server dies or never becomes ready.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@contextlib.contextmanager
def served(model_dir: str | Path, name: str, log_path: Path, device: str = "cpu",
           ready_timeout_s: float = 180.0) -> Iterator[str]:  # fmt: skip
    """Serve `model_dir` under the model name `name`; yields the base URL (".../v1")."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    cmd = [sys.executable, "-m", "posttrain", "serve", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--name", name, "--device", device]  # fmt: skip
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"posttrain serve {model_dir} exited with code "
                                   f"{proc.returncode} before it was ready:\n{_tail(log_path)}")  # fmt: skip
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as r:
                    ids = [m["id"] for m in json.loads(r.read())["data"]]
                if name in ids:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"posttrain serve {model_dir} was not ready after "
                                   f"{ready_timeout_s:.0f} s:\n{_tail(log_path)}")  # fmt: skip
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
