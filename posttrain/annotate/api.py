"""The JSON API (scripts, the load and crash tests): the same rules as the pages.

    POST /api/login {"token"}              -> {"annotator", "group", "role", "csrf"} + cookie
    GET  /api/me | /api/queue | /api/labels
    GET  /api/prompt/{prompt_id}           -> {"prompt_id", "messages", "candidates", "guidelines"}
    POST /api/rank {"prompt_id", "order"}  (header X-CSRF-Token)
                                           -> {"prompt_id", "order", "revision", "changed"}
    POST /api/skip {"prompt_id"}           (header X-CSRF-Token)

A 200 from /api/rank means the ranking is committed to disk. Submitting a different order for
the same prompt replaces the caller's own ranking (`revision` counts up); the same ranking again
(a retry) is acknowledged with `"changed": false` and the stored revision. Neither adds a second
one. Bodies over 1 MiB get 413, JSON nested too deeply 400 (see `checks`).
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, Request

from posttrain.annotate import db, guidelines
from posttrain.annotate.checks import clip
from posttrain.annotate.core import Gate, content_text, letter, progress

COUNTS = ("assigned", "ranked", "skipped", "queued")


def check_fields(body: dict, allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise HTTPException(422, f"unknown field {clip(extra[0])} (allowed: {sorted(allowed)}); "
                            "labels are always stored as the logged-in annotator's")  # fmt: skip
    if not isinstance(body.get("prompt_id"), str):
        raise HTTPException(422, "'prompt_id' must be a string")


def add_api_routes(app: FastAPI, gate: Gate) -> None:
    store = gate.store

    @app.get("/api/me")
    async def api_me(request: Request):
        def work(conn):
            s = gate.session(request, conn, role=None)
            a = s.annotator
            out = {"annotator": a.name, "group": a.group, "role": a.role, "csrf": s.csrf}
            if a.role == "annotator":
                p = progress(store, conn, a.name)
                out["progress"] = {k: p[k] for k in COUNTS}
            return out

        return await gate.threaded(work)()

    @app.get("/api/queue")
    async def api_queue(request: Request):
        def work(conn):
            p = progress(store, conn, gate.session(request, conn).annotator.name)
            return {"queue": p["queue"], "skipped": p["skipped_ids"],
                    "progress": {k: p[k] for k in COUNTS}}  # fmt: skip

        return await gate.threaded(work)()

    @app.get("/api/prompt/{prompt_id:path}")
    async def api_prompt(request: Request, prompt_id: str):
        def work(conn):
            s = gate.session(request, conn)
            gate.require_mine(conn, s, prompt_id)
            rec = store.cands[prompt_id]
            shown = db.display_order(prompt_id, s.annotator.name, len(rec["responses"]))
            # Only the text: never gold, log-probs or anything else the sample stage kept.
            cands = [{"index": i, "label": letter(pos), "text": rec["responses"][i]["text"]}
                     for pos, i in enumerate(shown)]  # fmt: skip
            msgs = [{"role": m.get("role"), "content": content_text(m)} for m in rec["messages"]]
            return {"prompt_id": prompt_id, "messages": msgs, "candidates": cands,
                    "guidelines": guidelines.get(conn)}  # fmt: skip

        return await gate.threaded(work)()

    @app.get("/api/labels")
    async def api_labels(request: Request):
        def work(conn):
            name = gate.session(request, conn).annotator.name  # the caller's own, whatever is asked
            return {"annotator": name, "rankings": db.rankings_of(conn, name),
                    "skipped": sorted(db.skips_of(conn, name))}  # fmt: skip

        return await gate.threaded(work)()

    @app.post("/api/rank")
    async def api_rank(request: Request):
        body = await gate.json_body(request)

        def work(conn):
            s = gate.write_session(request, conn, request.headers.get("x-csrf-token"))
            check_fields(body, {"prompt_id", "order"})
            pid = body["prompt_id"]
            gate.require_mine(conn, s, pid)
            n = len(store.cands[pid]["responses"])
            try:  # save_ranking checks the order (checks.check_ranking) before it stores it
                saved = db.save_ranking(conn, pid, s.annotator.name, body.get("order"), n)
            except ValueError as e:
                raise HTTPException(422, str(e)) from None
            return {"prompt_id": pid, "order": body["order"], "revision": saved.revision,
                    "changed": saved.changed}  # fmt: skip

        return await gate.threaded(work)()

    @app.post("/api/skip")
    async def api_skip(request: Request):
        body = await gate.json_body(request)

        def work(conn):
            s = gate.write_session(request, conn, request.headers.get("x-csrf-token"))
            check_fields(body, {"prompt_id"})
            gate.require_mine(conn, s, body["prompt_id"])
            db.save_skip(conn, body["prompt_id"], s.annotator.name)
            return {"prompt_id": body["prompt_id"], "skipped": True}

        return await gate.threaded(work)()
