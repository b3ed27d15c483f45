"""Real parts for tests and demos: a fake run, the server in a thread or a process, a client.

The client is the standard library's http.client with a cookie and the CSRF token, one
keep-alive connection per client (so one per thread in the load tests).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

EVIL = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 1">'


def fake_run(root: str | Path, n_prompts: int = 4, n_cands: int = 3, stage: str = "sample") -> Path:
    """A run directory with `stage/candidates.jsonl` as the sample stage writes it (with gold and
    log-probs, which the app must never show). Prompt p1's candidate 1 is a script injection."""
    run = Path(root)
    (run / stage).mkdir(parents=True, exist_ok=True)
    lines = []
    for p in range(n_prompts):
        responses = []
        for c in range(n_cands):
            text = f"answer {c} to question {p}: " + " ".join(["word"] * (c + 1))
            if (p, c) == (1, 1):
                text = f"Sure! {EVIL} done"
            responses.append({"text": text, "logprob": -1.5 - c, "token_logprobs": [-0.5] * 3,
                              "n_tokens": 3 + c, "ended": True, "gold": float(c == 0)})  # fmt: skip
        lines.append({"prompt_id": f"toy/{p}", "family": "toy", "responses": responses,
                      "messages": [{"role": "user", "content": f"Question {p}: <b>what</b> is {p} + {p}?"}]})  # fmt: skip
    (run / stage / "candidates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


def add(run: str | Path, name: str, **kw) -> str:
    """Register an annotator (or, with admin=True, an admin) in the run's app; their token."""
    from posttrain.annotate import db

    return db.add_annotator(db.db_path(run), name, **kw)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(port: int, timeout: float = 30.0, proc=None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log else ""
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail}")
        try:
            status, _, _ = Client(port).request("GET", "/login")
            if status == 200:
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"server on port {port} did not come up in {timeout:.0f}s")


@contextlib.contextmanager
def thread_server(run: str | Path, stage: str = "sample", k: int = 2) -> Iterator[int]:
    """The app on a loopback port, served by uvicorn in a thread of this process."""
    import uvicorn

    from posttrain.annotate.core import open_store
    from posttrain.annotate.server import create_app

    port = free_port()
    config = uvicorn.Config(create_app(open_store(run, stage, k)), host="127.0.0.1", port=port,
                            log_level="warning", access_log=False)  # fmt: skip
    server = uvicorn.Server(config)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        wait_until_up(port)
        yield port
    finally:
        server.should_exit = True
        t.join(10)


class ProcessServer:
    """`posttrain annotate serve` in a process of its own (so it can be SIGKILLed)."""

    def __init__(self, run: str | Path, port: int | None = None, k: int = 2, stage: str = "sample"):
        self.run, self.port, self.k, self.stage = Path(run), port or free_port(), k, stage
        self.proc: subprocess.Popen | None = None
        self.log = self.run.parent / f"{self.run.name}.serve.log"

    def start(self) -> ProcessServer:
        cmd = [sys.executable, "-m", "posttrain.cli", "annotate", "serve", "--run", str(self.run),
               "--stage", self.stage, "--port", str(self.port), "--k", str(self.k)]  # fmt: skip
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        with open(self.log, "a") as log:  # a file, not a pipe: a full pipe would stall the server
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
        wait_until_up(self.port, proc=self.proc, log=self.log)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, nothing is flushed."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class Client:
    """One annotator's HTTP client: session cookie, CSRF token, one keep-alive connection."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0):
        self.host, self.port, self.timeout = host, port, timeout
        self.cookie: str | None = None
        self.csrf: str | None = None
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, dict, bytes]:  # fmt: skip
        h = dict(headers or {})
        if self.cookie:
            h.setdefault("Cookie", self.cookie)
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            self.conn.request(method, path, body=body, headers=h)
            resp = self.conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            raise
        out = {k.lower(): v for k, v in resp.getheaders()}
        out["set-cookie-all"] = resp.headers.get_all("set-cookie") or []
        for c in out["set-cookie-all"]:
            name_value = c.split(";", 1)[0]
            self.cookie = None if name_value.endswith("=") or '=""' in name_value else name_value
        return resp.status, out, data

    def get(self, path: str, **kw) -> tuple[int, dict, bytes]:
        return self.request("GET", path, **kw)

    def get_json(self, path: str) -> tuple[int, dict]:
        status, _, data = self.get(path)
        return status, json.loads(data)

    def post_json(self, path: str, obj, csrf: bool = True, headers: dict | None = None):
        h = {"Content-Type": "application/json", **(headers or {})}
        if csrf and self.csrf:
            h.setdefault("X-CSRF-Token", self.csrf)
        status, _, data = self.request("POST", path, json.dumps(obj).encode(), h)
        return status, json.loads(data) if data else None

    def post_form(self, path: str, fields: dict, headers: dict | None = None):
        h = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        return self.request("POST", path, urlencode(fields).encode(), h)

    def login(self, token: str) -> dict:
        status, body = self.post_json("/api/login", {"token": token}, csrf=False)
        if status != 200:
            raise RuntimeError(f"login failed ({status}): {body}")
        self.csrf = body["csrf"]
        return body

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
