"""The annotation web app: FastAPI, server-rendered pages, a JSON API (api.py), admin (admin.py).

Every route but `/login`, `/api/login` and the two static files needs a session cookie
(HttpOnly, SameSite=Strict), issued once a one-time login token is spent. Every POST needs the
session's CSRF token (form field `csrf` or header `X-CSRF-Token`), and a POST whose `Origin` is
another site, or whose `Sec-Fetch-Site` says cross-site, is refused before it reaches a route.
Rankings are stored under the session's annotator only, and only for prompts assigned to them:
no route reads or writes another annotator's labels.

Input limits (`checks`): a body over 1 MiB gets 413, JSON nested too deeply 400, an invalid
order 422; an error message quotes at most a short prefix of any value that was sent.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from posttrain.annotate import db, guidelines
from posttrain.annotate.checks import clip, clip_text
from posttrain.annotate.core import (
    COOKIE,
    TOO_LARGE,
    BodyLimit,
    Gate,
    Store,
    content_text,
    letter,
    open_store,
    progress,
)
from posttrain.annotate.guidelines import public_id
from posttrain.annotate.pages import CSS, JS, render

HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # no-referrer would make POSTs send `Origin: null`
    "Cache-Control": "no-store",
}
TITLES = {400: "Bad request", 401: "Not logged in", 403: "Refused", 404: "Not found",
          409: "Conflict", 413: "Too large", 422: "Invalid input"}  # fmt: skip
MAX_MESSAGE = 1000  # an error message longer than this is cut: it quoted too much of the input
SHOWN_RANK = 8  # characters of a refused rank field shown again in its input box


def order_from_ranks(ranks: dict[int, int]) -> list:
    """{candidate: rank number} -> order best first, equal numbers tied:
    {0: 2, 1: 1, 2: 2} -> [1, [0, 2]]."""
    out = []
    for r in sorted(set(ranks.values())):
        tier = sorted(i for i, v in ranks.items() if v == r)
        out.append(tier[0] if len(tier) == 1 else tier)
    return out


def parse_form_ranks(form, shown: list[int]) -> list:
    """The rank-number form -> an order; ValueError naming responses by the letters shown."""
    allowed = {f"rank_{i}" for i in shown}
    extra = sorted(k for k in form.keys() if k.startswith("rank_") and k not in allowed)
    if extra:
        raise ValueError(f"unknown field {clip(extra[0])}: rank only the responses shown")
    ranks, missing = {}, []
    for pos, i in enumerate(shown):
        v = str(form.get(f"rank_{i}") or "").strip()
        if not v:
            missing.append(letter(pos))
        elif not v.isdecimal() or int(v) < 1:
            raise ValueError(f"response {letter(pos)}: rank {clip(v)} is not a whole number from 1")
        else:
            ranks[i] = int(v)
    if missing:
        raise ValueError(f"every response needs a rank: {', '.join(missing)} has none")
    return order_from_ranks(ranks)


def error_response(request: Request, status: int, message: str) -> Response:
    message = clip_text(message, MAX_MESSAGE)  # whatever a check quoted, never the whole input
    if request.url.path.startswith("/api/"):
        return JSONResponse({"detail": message}, status_code=status)
    title = TITLES.get(status, "Error")
    return HTMLResponse(render("error.html", title=title, message=message), status_code=status)


def set_cookie(resp: Response, sid: str) -> Response:
    resp.set_cookie(COOKIE, sid, max_age=db.SESSION_SECONDS, path="/", httponly=True,
                    samesite="strict")  # fmt: skip
    return resp


def too_large(scope) -> Response:
    return error_response(Request(scope), 413, TOO_LARGE)


def create_app(store: Store) -> FastAPI:
    from posttrain.annotate.admin import add_admin_routes
    from posttrain.annotate.api import add_api_routes

    app = FastAPI(title="posttrain annotate", docs_url=None, redoc_url=None, openapi_url=None)
    gate = Gate(store)
    # Added before `guard`, so inside it: the 413 a route gets while reading the body passes out
    # through guard as a response, not as an error out of the task group guard reads it in.
    app.add_middleware(BodyLimit, on_refuse=too_large)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("origin")
            own = f"{request.url.scheme}://{request.headers.get('host', '')}"
            if request.headers.get("sec-fetch-site") == "cross-site" or (
                origin is not None and origin != own
            ):
                resp = error_response(request, 403, "cross-site request refused")
                resp.headers.update(HEADERS)
                return resp
        resp = await call_next(request)
        for k, v in HEADERS.items():
            resp.headers.setdefault(k, v)
        return resp

    @app.exception_handler(StarletteHTTPException)  # ours and the router's 404/405 alike
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)  # a path parameter: say which, quote nothing
    async def invalid_parameter(request: Request, exc: RequestValidationError):
        e = exc.errors()[0]
        where = " ".join(str(x) for x in e.get("loc", ()))
        return error_response(request, 422, f"{where}: {e.get('msg', 'invalid')}")

    @app.get("/static/app.css")
    async def css():
        return Response(CSS, media_type="text/css")

    @app.get("/static/app.js")
    async def js():
        return Response(JS, media_type="text/javascript")

    add_login_routes(app, gate)
    add_page_routes(app, gate)
    add_api_routes(app, gate)
    add_admin_routes(app, gate)
    return app


def login(conn, token) -> tuple[db.Annotator, str, str]:
    """Spend a login token: (annotator, session id, CSRF token), or 403."""
    who = db.consume_login_token(conn, token) if isinstance(token, str) and token else None
    if who is None:
        raise HTTPException(403, "this login link is invalid or was already used; "
                            "ask the admin for a new one")  # fmt: skip
    sid, csrf = db.create_session(conn, who.name)
    return who, sid, csrf


def add_login_routes(app: FastAPI, gate: Gate) -> None:
    @app.get("/login", response_class=HTMLResponse)
    async def login_page(token: str | None = None):
        # Showing the form spends nothing: link previews and prefetchers cannot use up a token.
        return render("login.html", title="Log in", token=token)

    @app.post("/login")
    async def login_form(request: Request):
        form = await request.form()
        who, sid, _ = await gate.threaded(login)(form.get("token"))
        return set_cookie(RedirectResponse("/admin" if who.role == "admin" else "/", 303), sid)

    @app.post("/api/login")
    async def login_api(request: Request):
        body = await gate.json_body(request)
        who, sid, csrf = await gate.threaded(login)(body.get("token"))
        out = {"annotator": who.name, "group": who.group, "role": who.role, "csrf": csrf}
        return set_cookie(JSONResponse(out), sid)

    @app.post("/logout")
    async def logout(request: Request):
        form = await request.form()

        def work(conn):
            gate.write_session(request, conn, form.get("csrf"), role=None)
            db.delete_session(conn, request.cookies[COOKIE])

        await gate.threaded(work)()
        resp = RedirectResponse("/login", 303)
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return resp


def add_page_routes(app: FastAPI, gate: Gate) -> None:
    from posttrain.stages.rank import tiers

    store = gate.store

    @app.get("/", response_class=HTMLResponse)
    async def home(request: Request):
        def work(conn):
            s = gate.session(request, conn, role=None)
            if s.annotator.role == "admin":
                return RedirectResponse("/admin", 303)
            p = progress(store, conn, s.annotator.name)
            skipped = [{"index": store.position[x], "prompt_id": public_id(x)}
                       for x in p["skipped_ids"]]  # fmt: skip
            html = render("home.html", title="My queue", p=p, skipped=skipped,
                          me=s.annotator, csrf=s.csrf)  # fmt: skip
            return HTMLResponse(html)

        return await gate.threaded(work)()

    @app.get("/rank/next")
    async def rank_next(request: Request):
        def work(conn):
            s = gate.session(request, conn)
            queue = progress(store, conn, s.annotator.name)["queue"]
            return RedirectResponse(f"/rank/{store.position[queue[0]]}" if queue else "/", 303)

        return await gate.threaded(work)()

    def rank_page(conn, s, index: int, error=None, values=None, status=200) -> HTMLResponse:
        pid, name = store.prompt_ids[index], s.annotator.name
        rec = store.cands[pid]
        shown = db.display_order(pid, name, len(rec["responses"]))
        previous = db.rankings_of(conn, name).get(pid)
        if values is None and isinstance(previous, list):  # the stored ranking, to revise it
            values = {
                f"rank_{i}": str(t + 1) for t, tier in enumerate(tiers(previous)) for i in tier
            }
        values = values or {}
        # Only the text of each response: never gold, log-probs or the original position.
        cands = [{"index": i, "label": letter(pos), "text": rec["responses"][i]["text"],
                  "value": values.get(f"rank_{i}", "")} for pos, i in enumerate(shown)]  # fmt: skip
        messages = [{"role": str(m.get("role", "?")), "text": content_text(m)}
                    for m in rec["messages"]]  # fmt: skip
        shown_id = public_id(pid)  # never the id itself: it names the task family
        html = render("rank.html", title=f"Rank {shown_id}", prompt_id=shown_id, index=index,
                      cands=cands, messages=messages, p=progress(store, conn, name), error=error,
                      previous=previous is not None, me=s.annotator, csrf=s.csrf,
                      guidelines=guidelines.blocks(guidelines.get(conn)))  # fmt: skip
        return HTMLResponse(html, status_code=status)

    @app.get("/rank/{index}", response_class=HTMLResponse)
    async def rank_get(request: Request, index: int):
        def work(conn):
            s = gate.session(request, conn)
            gate.mine_at(conn, s, index)
            return rank_page(conn, s, index)

        return await gate.threaded(work)()

    @app.post("/rank/{index}")
    async def rank_post(request: Request, index: int):
        form = await request.form()

        def work(conn):
            s = gate.write_session(request, conn, form.get("csrf"))
            pid = gate.mine_at(conn, s, index)
            n = len(store.cands[pid]["responses"])
            try:  # save_ranking checks the order (checks.check_ranking) before it stores it
                order = parse_form_ranks(form, db.display_order(pid, s.annotator.name, n))
                db.save_ranking(conn, pid, s.annotator.name, order, n)
            except ValueError as e:
                values = {k: str(v)[:SHOWN_RANK] for k, v in form.items() if k.startswith("rank_")}
                return rank_page(conn, s, index, error=str(e), values=values, status=422)
            return RedirectResponse("/rank/next", 303)

        return await gate.threaded(work)()

    @app.post("/skip/{index}")
    async def skip_post(request: Request, index: int):
        form = await request.form()

        def work(conn):
            s = gate.write_session(request, conn, form.get("csrf"))
            pid = gate.mine_at(conn, s, index)
            db.save_skip(conn, pid, s.annotator.name)
            return RedirectResponse("/rank/next", 303)

        return await gate.threaded(work)()


def serve(run_dir: str | Path, stage: str, host: str, port: int, k: int,
          guidelines_file: str | Path | None = None) -> None:  # fmt: skip
    import uvicorn

    store = open_store(run_dir, stage, k)
    if guidelines_file is not None:  # this queue's guidelines, replacing what was stored
        with db.opened(store.db_path) as conn:
            guidelines.put(conn, Path(guidelines_file).read_text())
    print(
        f"posttrain annotate: {len(store.cands)} prompts of {store.run_dir / stage} "
        f"({k} annotator(s) each) at http://{host}:{port}/ ; labels in {store.db_path}",
        flush=True,
    )
    # No access log: it would record login links (one-time tokens) in the query string.
    uvicorn.run(create_app(store), host=host, port=port, log_level="warning", access_log=False)
