"""What "best" means: the ranking guidelines annotators read above the candidates.

One set per queue (the stage a database serves), stored in the database's meta table: set with
`posttrain annotate serve --guidelines FILE` (a text file; it replaces what is stored) or on the
admin page; DEFAULT until either does. Plain text: a line starting with "- " is a bullet, other
lines are paragraphs. Shown escaped, like every other text of the app.

The prompt's id is never shown to annotators (the toy world's ids name the task family,
"safety/rl/00012", which would tell them what is being tested): pages show `public_id`, a hash.
"""

from __future__ import annotations

import hashlib

from posttrain.annotate import db

KEY = "guidelines"
MAX_CHARS = 5000

DEFAULT = """Rank the responses from best to worst for the person who asked.
- Correct first: a right answer beats a wrong one, however well the wrong one is written.
- Honest: "I don't know" beats a confident answer that is made up.
- Safe and helpful: refuse a request that would cause harm; help with a harmless one that only sounds dangerous ("kill a Python process").
- Then clear and to the point: longer is not better; padding, flattery and lists for their own sake earn nothing.
- Tie responses you cannot tell apart; skip a prompt you cannot judge."""


def check(text) -> str:
    """Guidelines as stored: stripped text of at most MAX_CHARS characters (empty: the default)."""
    if not isinstance(text, str):
        raise ValueError("guidelines must be text")
    text = text.replace("\r\n", "\n").strip()
    if len(text) > MAX_CHARS:
        raise ValueError(f"guidelines are {len(text):,} characters; at most {MAX_CHARS:,}")
    return text


def get(conn) -> str:
    return db.get_meta(conn, KEY) or DEFAULT


def put(conn, text) -> str:
    """Store (or, with empty text, reset to the default) the queue's guidelines."""
    text = check(text)
    with db.transaction(conn):
        if text:
            db.set_meta(conn, KEY, text)
        else:
            conn.execute("DELETE FROM meta WHERE key = ?", (KEY,))
    return text or DEFAULT


def blocks(text: str) -> list[dict]:
    """Text -> [{"kind": "p" | "ul", "items": [...]}]: consecutive "- " lines form one list."""
    out: list[dict] = []
    for line in (x.strip() for x in text.splitlines()):
        if not line:
            continue
        if line.startswith(("- ", "* ")):
            if not out or out[-1]["kind"] != "ul":
                out.append({"kind": "ul", "items": []})
            out[-1]["items"].append(line[2:].strip())
        else:
            out.append({"kind": "p", "items": [line]})
    return out


def public_id(prompt_id: str) -> str:
    """The name a prompt is shown under: a hash of its id, which says nothing about its task."""
    return "P-" + hashlib.sha256(prompt_id.encode()).hexdigest()[:8]
