"""The annotation database: annotators, one-time login tokens, sessions, rankings and skips.

One SQLite file per run (`RUN/annotate/annotations.sqlite`) in WAL mode with `synchronous=FULL`:
a commit is on disk before the server answers, so an acknowledged ranking survives a killed
server. Every request opens its own connection (`connect`); writes take the write lock up front
(`BEGIN IMMEDIATE`) so concurrent writers queue on the busy timeout instead of failing.

Secrets (login tokens, session ids) are stored as sha256 hashes only. A ranking is unique per
(prompt_id, annotator): submitting a different order updates that annotator's own label and
counts a revision; the same order again (a retry, a double submit) changes nothing. It never adds
a row.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from posttrain.annotate.checks import check_name, check_ranking, clip, same_ranking

DB_NAME = "annotations.sqlite"
SESSION_SECONDS = 30 * 24 * 3600

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS annotators (
    name TEXT PRIMARY KEY,
    grp TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('annotator', 'admin')),
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS login_tokens (
    token_hash TEXT PRIMARY KEY,
    annotator TEXT NOT NULL REFERENCES annotators(name),
    created REAL NOT NULL,
    used REAL
);
CREATE TABLE IF NOT EXISTS sessions (
    session_hash TEXT PRIMARY KEY,
    annotator TEXT NOT NULL REFERENCES annotators(name),
    csrf TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rankings (
    id INTEGER PRIMARY KEY,
    prompt_id TEXT NOT NULL,
    annotator TEXT NOT NULL REFERENCES annotators(name),
    order_json TEXT NOT NULL,
    n_candidates INTEGER NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    revisions INTEGER NOT NULL DEFAULT 1,
    UNIQUE (prompt_id, annotator)
);
CREATE TABLE IF NOT EXISTS skips (
    prompt_id TEXT NOT NULL,
    annotator TEXT NOT NULL REFERENCES annotators(name),
    created REAL NOT NULL,
    PRIMARY KEY (prompt_id, annotator)
);
"""


@dataclass(frozen=True)
class Annotator:
    name: str
    group: str
    role: str  # "annotator" | "admin"


@dataclass(frozen=True)
class Session:
    annotator: Annotator
    csrf: str


def db_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "annotate" / DB_NAME


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection for one request or thread: autocommit mode, explicit write transactions."""
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction holding the write lock from the start; committed (durably) on exit."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


@contextlib.contextmanager
def opened(path: str | Path) -> Iterator[sqlite3.Connection]:
    conn = connect(path)
    try:
        yield conn
    finally:
        conn.close()


def init_db(path: str | Path) -> Path:
    """Create the database (WAL mode) and its tables if missing; safe to call on every start."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with opened(path) as conn:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise RuntimeError(f"{path}: SQLite refused WAL mode (got {mode!r})")
        conn.executescript(SCHEMA)
    return path


def get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


# ----------------------------------------------------------------------------- annotators


def add_annotator(
    path: str | Path, name: str, group: str | None = None, admin: bool = False
) -> tuple[str, bool]:
    """Register NAME (or find it) and issue a one-time login token; returns (token, created).

    Issuing a token for an existing annotator is how a lost session is recovered: their labels
    stay theirs. Only the token's hash is stored.
    """
    check_name(name, "annotator name")
    role = "admin" if admin else "annotator"
    init_db(path)
    token = secrets.token_urlsafe(32)
    now = time.time()
    with opened(path) as conn, transaction(conn):
        row = conn.execute("SELECT grp, role FROM annotators WHERE name = ?", (name,)).fetchone()
        if row is None:
            conn.execute(
                "INSERT INTO annotators (name, grp, role, created) VALUES (?, ?, ?, ?)",
                (name, check_name(group or "default", "group"), role, now),
            )
        elif row[1] != role:
            raise ValueError(f"{name!r} is already registered as {row[1]}, not {role}")
        elif group is not None and group != row[0]:
            raise ValueError(f"annotator {name!r} is already in group {row[0]!r}, not {group!r}")
        conn.execute(
            "INSERT INTO login_tokens (token_hash, annotator, created) VALUES (?, ?, ?)",
            (hash_secret(token), name, now),
        )
    return token, row is None


def annotators(conn: sqlite3.Connection, role: str | None = "annotator") -> list[Annotator]:
    rows = conn.execute("SELECT name, grp, role FROM annotators ORDER BY name").fetchall()
    return [Annotator(*r) for r in rows if role is None or r[2] == role]


# ----------------------------------------------------------------------------- login, sessions


def consume_login_token(conn: sqlite3.Connection, token: str) -> Annotator | None:
    """The annotator a valid, unused token belongs to; the token is spent. None otherwise."""
    with transaction(conn):
        rows = conn.execute(  # fetchall: a RETURNING statement must finish before COMMIT
            "UPDATE login_tokens SET used = ? WHERE token_hash = ? AND used IS NULL "
            "RETURNING annotator",
            (time.time(), hash_secret(token)),
        ).fetchall()
        if not rows:
            return None
        r = conn.execute(
            "SELECT name, grp, role FROM annotators WHERE name = ?", rows[0]
        ).fetchone()
    return Annotator(*r)


def create_session(conn: sqlite3.Connection, name: str) -> tuple[str, str]:
    """A new session for NAME: (session id for the cookie, CSRF token for forms and headers)."""
    sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = time.time()
    with transaction(conn):
        conn.execute(
            "INSERT INTO sessions (session_hash, annotator, csrf, created, expires) "
            "VALUES (?, ?, ?, ?, ?)",
            (hash_secret(sid), name, csrf, now, now + SESSION_SECONDS),
        )
    return sid, csrf


def get_session(conn: sqlite3.Connection, sid: str | None) -> Session | None:
    if not sid:
        return None
    row = conn.execute(
        "SELECT a.name, a.grp, a.role, s.csrf FROM sessions s "
        "JOIN annotators a ON a.name = s.annotator WHERE s.session_hash = ? AND s.expires > ?",
        (hash_secret(sid), time.time()),
    ).fetchone()
    return Session(Annotator(*row[:3]), row[3]) if row else None


def delete_session(conn: sqlite3.Connection, sid: str) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM sessions WHERE session_hash = ?", (hash_secret(sid),))


# ----------------------------------------------------------------------------- assignment


def _score(prompt_id: str, name: str) -> bytes:
    return hashlib.blake2b(f"{prompt_id}\x00{name}".encode(), digest_size=8).digest()


def assign(prompt_ids: list[str], names: list[str], k: int) -> dict[str, list[str]]:
    """annotator -> their prompts (in file order): each prompt goes to the k annotators with the
    highest hash of (prompt id, name). Deterministic, and adding an annotator moves only the
    prompts the newcomer wins (rendezvous hashing)."""
    out: dict[str, list[str]] = {n: [] for n in names}
    for pid in prompt_ids:
        for name in sorted(names, key=lambda n: _score(pid, n), reverse=True)[:k]:
            out[name].append(pid)
    return out


def display_order(prompt_id: str, name: str, n: int) -> list[int]:
    """Candidate indices in the order NAME sees them: shuffled per annotator and prompt, so no
    position (first shown, last shown) favours one candidate across annotators."""
    seed = int.from_bytes(hashlib.sha256(f"{name}\x00{prompt_id}".encode()).digest()[:8], "big")
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return idx


# ----------------------------------------------------------------------------- labels


class Saved(NamedTuple):
    revision: int  # 1 = the first ranking of this prompt by this annotator
    changed: bool  # False: the same ranking was already stored (a replay), nothing was written


def save_ranking(conn: sqlite3.Connection, prompt_id: str, name: str, order: list, n: int) -> Saved:
    """Store NAME's ranking of a prompt. The order is checked here (`check_ranking`), whatever
    the caller did before: a ValueError, and nothing stored, if agreement or export would refuse
    it. The same ranking again is acknowledged with the stored revision and writes nothing; a
    different one replaces it and counts a revision."""
    check_ranking(order, n, f"prompt {clip(prompt_id)}")
    now = time.time()
    with transaction(conn):
        row = conn.execute(
            "SELECT order_json, n_candidates, revisions FROM rankings "
            "WHERE prompt_id = ? AND annotator = ?",
            (prompt_id, name),
        ).fetchone()
        if row is not None and row[1] == n and same_ranking(load_order(row[0]), order):
            saved = Saved(row[2], changed=False)
        else:
            [(rev,)] = conn.execute(
                "INSERT INTO rankings (prompt_id, annotator, order_json, n_candidates, created, "
                "updated) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (prompt_id, annotator) DO UPDATE "
                "SET order_json = excluded.order_json, n_candidates = excluded.n_candidates, "
                "updated = excluded.updated, revisions = revisions + 1 RETURNING revisions",
                (prompt_id, name, json.dumps(order), n, now, now),
            ).fetchall()
            saved = Saved(rev, changed=True)
        conn.execute("DELETE FROM skips WHERE prompt_id = ? AND annotator = ?", (prompt_id, name))
    return saved


def load_order(order_json: str):
    """A stored order, or None where the row does not hold JSON (a row no check ever saw)."""
    try:
        return json.loads(order_json)
    except (ValueError, RecursionError):
        return None


def save_skip(conn: sqlite3.Connection, prompt_id: str, name: str) -> None:
    with transaction(conn):
        conn.execute(
            "INSERT OR IGNORE INTO skips (prompt_id, annotator, created) VALUES (?, ?, ?)",
            (prompt_id, name, time.time()),
        )


def rankings_of(conn: sqlite3.Connection, name: str) -> dict[str, list]:
    rows = conn.execute(
        "SELECT prompt_id, order_json FROM rankings WHERE annotator = ?", (name,)
    ).fetchall()
    return {pid: load_order(o) for pid, o in rows}


def skips_of(conn: sqlite3.Connection, name: str) -> set[str]:
    rows = conn.execute("SELECT prompt_id FROM skips WHERE annotator = ?", (name,)).fetchall()
    return {r[0] for r in rows}


def all_rankings(conn: sqlite3.Connection) -> list[dict]:
    """Every stored ranking as the rank stage's record plus its row id, candidate count and
    stored text (`order` is None where that text is not JSON). Not checked: see
    `export.human_rankings`."""
    rows = conn.execute(
        "SELECT r.id, r.prompt_id, r.annotator, a.grp, r.order_json, r.n_candidates "
        "FROM rankings r JOIN annotators a ON a.name = r.annotator "
        "ORDER BY r.prompt_id, r.annotator"
    ).fetchall()
    return [
        {"id": i, "prompt_id": p, "annotator": a, "group": g, "order": load_order(o),
         "order_json": o, "n_candidates": n}
        for i, p, a, g, o, n in rows
    ]  # fmt: skip


def counts(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """annotator -> {"ranked", "skipped", "revisions"} (revisions beyond the first)."""
    out: dict[str, dict[str, int]] = {}
    for name, n, rev in conn.execute(
        "SELECT annotator, COUNT(*), SUM(revisions - 1) FROM rankings GROUP BY annotator"
    ):
        out.setdefault(name, {"ranked": 0, "skipped": 0, "revisions": 0})
        out[name] |= {"ranked": n, "revisions": rev or 0}
    for name, n in conn.execute("SELECT annotator, COUNT(*) FROM skips GROUP BY annotator"):
        out.setdefault(name, {"ranked": 0, "skipped": 0, "revisions": 0})["skipped"] = n
    return out
