"""What every route uses: the Store (candidates + database), sessions, CSRF, the thread pool.

A route's database work runs in the thread pool on a connection of its own (`Gate.threaded`),
so a slow fsync never blocks the event loop and no connection is shared between threads.
A request body (JSON or form) over `checks.MAX_BODY` is refused with 413 as it arrives
(`BodyLimit`), and a JSON body nested deeper than `checks.MAX_DEPTH` with 400.
"""

from __future__ import annotations

import hmac
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool

from posttrain.annotate import db
from posttrain.annotate.checks import MAX_BODY, MAX_DEPTH, check_ranking, clip, too_deep

COOKIE = "posttrain_session"
TOO_LARGE = (f"the request body is larger than {MAX_BODY // 1024 // 1024} MiB ({MAX_BODY:,} bytes),"
             " the limit for JSON and form bodies")  # fmt: skip
TOO_DEEP = f"the JSON body is nested too deeply (more than {MAX_DEPTH} levels)"


@dataclass
class Store:
    """What the app serves: one stage's candidates and the run's annotation database."""

    run_dir: Path
    stage: str
    db_path: Path
    cands: dict[str, dict]
    k: int
    prompt_ids: list[str] = field(init=False)
    position: dict[str, int] = field(init=False)
    _assigned: tuple = field(init=False, default=((), {}))
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self):
        self.prompt_ids = list(self.cands)
        self.position = {pid: i for i, pid in enumerate(self.prompt_ids)}

    def assignment(self, conn) -> dict[str, list[str]]:
        """annotator -> assigned prompt ids, recomputed only when the annotators change."""
        names = tuple(a.name for a in db.annotators(conn))
        with self._lock:
            if self._assigned[0] != names:
                self._assigned = (names, db.assign(self.prompt_ids, list(names), self.k))
            return self._assigned[1]


def open_store(run_dir: str | Path, stage: str, k: int = 2) -> Store:
    """Check the run, load its candidates and create (or reopen) the database."""
    from posttrain.annotate.export import candidates_path, check_candidates_unchanged
    from posttrain.io import hash_path
    from posttrain.stages.rank import load_candidates

    if k < 1:
        raise ValueError(f"--k must be at least 1 (annotators per prompt), got {k}")
    path = candidates_path(run_dir, stage)
    cands = load_candidates(path)
    if not cands:
        raise ValueError(f"{path}: no prompts to rank")
    dbp = db.init_db(db.db_path(run_dir))
    with db.opened(dbp) as conn, db.transaction(conn):
        served = db.get_meta(conn, "stage")
        if served is not None and served != stage:
            raise ValueError(
                f"{dbp} holds labels of stage {served!r}, not {stage!r}: serve --stage {served}, "
                "or label the other stage in a run directory of its own"
            )
        if conn.execute("SELECT COUNT(*) FROM rankings").fetchone()[0]:
            check_candidates_unchanged(conn, path)
        db.set_meta(conn, "stage", stage)
        db.set_meta(conn, "candidates_hash", hash_path(path))
    return Store(Path(run_dir), stage, dbp, cands, k)


def progress(store: Store, conn, name: str) -> dict:
    """An annotator's queue (unranked, unskipped assigned prompts in file order) and counts. A
    stored ranking that fails the checks counts as not ranked: the prompt is back in the queue,
    and ranking it again replaces the bad row."""
    assigned = store.assignment(conn).get(name, [])
    ranked = {p for p, order in db.rankings_of(conn, name).items()
              if p in store.cands and valid_order(order, len(store.cands[p]["responses"]))}  # fmt: skip
    skipped = (db.skips_of(conn, name) & set(store.cands)) - ranked
    queue = [p for p in assigned if p not in ranked and p not in skipped]
    return {
        "assigned": len(set(assigned) | ranked | skipped),
        "ranked": len(ranked),
        "skipped": len(skipped),
        "queued": len(queue),
        "queue": queue,
        "skipped_ids": sorted(skipped, key=store.position.get),
    }


def valid_order(order, n: int) -> bool:
    try:
        check_ranking(order, n, "")
    except ValueError:
        return False
    return True


def content_text(message: dict) -> str:
    c = message.get("content")
    text = c if isinstance(c, str) else json.dumps(c, indent=2, ensure_ascii=False)
    if message.get("tool_calls"):
        text += "\n" + json.dumps(message["tool_calls"], indent=2, ensure_ascii=False)
    return text


def letter(pos: int) -> str:
    """The name a response is shown under: A, B, C, ... by its position on the page."""
    return chr(ord("A") + pos) if pos < 26 else f"#{pos + 1}"


class Gate:
    """Sessions, roles, CSRF and assignment checks shared by the page, API and admin routes."""

    def __init__(self, store: Store):
        self.store = store

    def session(self, request: Request, conn, role: str | None = "annotator") -> db.Session:
        s = db.get_session(conn, request.cookies.get(COOKIE))
        if s is None:
            raise HTTPException(401, "not logged in: open the login link you were given")
        if role is not None and s.annotator.role != role:
            raise HTTPException(403, f"this needs the {role} role")
        return s

    def write_session(
        self, request: Request, conn, sent, role: str | None = "annotator"
    ) -> db.Session:
        """The caller's session for a request that changes something: logged in, with `role`,
        and `sent` (the form's or header's CSRF token) matching the session's."""
        s = self.session(request, conn, role)
        self.check_csrf(s, sent)
        return s

    @staticmethod
    def check_csrf(s: db.Session, sent) -> None:
        if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), s.csrf.encode()):
            raise HTTPException(403, "CSRF token missing or wrong: reload the page and try again")

    def threaded(self, fn):
        """fn(conn, *args) run in the thread pool on a connection of its own."""

        async def call(*args):
            def work():
                with db.opened(self.store.db_path) as conn:
                    return fn(conn, *args)

            return await run_in_threadpool(work)

        return call

    def prompt_at(self, index: int) -> str:
        if not 0 <= index < len(self.store.prompt_ids):
            raise HTTPException(404, f"no prompt number {index}")
        return self.store.prompt_ids[index]

    def mine_at(self, conn, s: db.Session, index: int) -> str:
        """The id of prompt number `index`, which must be the caller's (see require_mine)."""
        pid = self.prompt_at(index)
        self.require_mine(conn, s, pid)
        return pid

    def require_mine(self, conn, s: db.Session, pid) -> None:
        """The prompt must be assigned to the caller (or ranked or skipped by them before)."""
        name = s.annotator.name
        if not isinstance(pid, str) or pid not in self.store.cands:
            raise HTTPException(404, f"unknown prompt_id {clip(pid)}")
        if pid in self.store.assignment(conn).get(name, []):
            return
        if pid in db.rankings_of(conn, name) or pid in db.skips_of(conn, name):
            return
        raise HTTPException(403, f"prompt {clip(pid)} is not in your queue")

    @staticmethod
    async def json_body(request: Request) -> dict:
        """The body as a JSON object: 413 over MAX_BODY (BodyLimit), 400 nested too deeply,
        422 not a JSON object."""
        try:
            body = await request.json()
        except RecursionError:  # the parser's own stack: 100,000 '[' in 200 kB
            raise HTTPException(400, TOO_DEEP) from None
        except ValueError:
            raise HTTPException(422, "the body must be a JSON object") from None
        if too_deep(body):
            raise HTTPException(400, TOO_DEEP)
        if not isinstance(body, dict):
            raise HTTPException(422, "the body must be a JSON object")
        return body


class BodyLimit:
    """ASGI middleware: a request body over MAX_BODY is refused with 413, JSON and forms alike.

    A declared Content-Length over the limit is refused before anything is read; a chunked body
    is counted as it arrives, and the route reading it gets the 413 (an HTTPException) once the
    count passes the limit, so no more than MAX_BODY is ever held.
    """

    def __init__(self, app, on_refuse):
        self.app, self.on_refuse = app, on_refuse  # on_refuse(scope) -> the 413 response

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > MAX_BODY:
            return await self.on_refuse(scope)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY:
                    raise HTTPException(413, TOO_LARGE)
            return message

        await self.app(scope, limited, send)
