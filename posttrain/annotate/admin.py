"""Admin routes: progress per annotator, agreement over the human labels, export, and the
queue's ranking guidelines (guidelines.py; POST /admin/guidelines, empty text: the default).

Agreement is the rank stage's own `agreement_metrics` (gold agreement where the candidates carry
gold, Cohen's kappa per annotator pair, Krippendorff's alpha); export is `export.export`. Both
skip a stored ranking that fails the checks and list it, with its row id, under `invalid`.
The export form redirects after its POST (303 to `GET /admin/export`, which shows the last
export), so reloading the result page exports nothing.
"""

from __future__ import annotations

import time
from collections import Counter

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from posttrain.annotate import db, guidelines
from posttrain.annotate.pages import render


def overview(store, conn) -> dict:
    """Progress of every annotator, prompt coverage, and agreement of the human rankings."""
    from posttrain.annotate.export import human_rankings
    from posttrain.stages.rank import agreement_metrics

    people = db.annotators(conn)
    assigned = store.assignment(conn)
    counted = db.counts(conn)
    zero = {"ranked": 0, "skipped": 0, "revisions": 0}
    rows = [{"name": a.name, "group": a.group, "assigned": len(assigned.get(a.name, [])),
             **counted.get(a.name, zero)} for a in people]  # fmt: skip
    rankings, invalid = human_rankings(conn, store.cands)
    per_prompt = Counter(r["prompt_id"] for r in rankings)
    need = min(store.k, len(people)) or 1
    return {
        "stage": store.stage,
        "n_prompts": len(store.cands),
        "k": store.k,
        "total": len(rankings),
        "covered": len(per_prompt),
        "complete": sum(n >= need for n in per_prompt.values()),
        "rows": rows,
        "metrics": agreement_metrics(rankings, store.cands) if rankings else {},
        "invalid": invalid,
    }


def add_admin_routes(app: FastAPI, gate) -> None:
    from posttrain.annotate.export import export, last_export

    store, session, threaded = gate.store, gate.session, gate.threaded

    def admin_page(conn, s, show_export: bool = False) -> HTMLResponse:
        o = overview(store, conn)
        metrics = [
            (k, f"{v:.3f}" if isinstance(v, float) else v) for k, v in o.pop("metrics").items()
        ]
        exported = last_export(conn) if show_export else None
        if exported:
            exported["when"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(exported["time"]))
        html = render("admin.html", title="Progress", me=s.annotator, csrf=s.csrf, metrics=metrics,
                      show_export=show_export, exported=exported,
                      guidelines=guidelines.get(conn), **o)  # fmt: skip
        return HTMLResponse(html)

    def do_export():
        try:
            return export(store.run_dir, store.stage)
        except (ValueError, FileNotFoundError) as e:
            raise HTTPException(409, str(e)) from None

    @app.get("/admin", response_class=HTMLResponse)
    async def admin(request: Request):
        def work(conn):
            return admin_page(conn, session(request, conn, role="admin"))

        return await threaded(work)()

    @app.get("/admin/export", response_class=HTMLResponse)
    async def admin_export_result(request: Request):
        def work(conn):
            return admin_page(conn, session(request, conn, role="admin"), show_export=True)

        return await threaded(work)()

    @app.post("/admin/export")
    async def admin_export(request: Request):
        form = await request.form()

        def work(conn):
            gate.write_session(request, conn, form.get("csrf"), role="admin")
            do_export()
            return RedirectResponse("/admin/export", 303)  # reloading the result re-posts nothing

        return await threaded(work)()

    @app.post("/admin/guidelines")
    async def admin_guidelines(request: Request):
        form = await request.form()

        def work(conn):
            gate.write_session(request, conn, form.get("csrf"), role="admin")
            try:
                guidelines.put(conn, form.get("guidelines", ""))
            except ValueError as e:
                raise HTTPException(422, str(e)) from None
            return RedirectResponse("/admin", 303)

        return await threaded(work)()

    @app.get("/api/admin/progress")
    async def api_progress(request: Request):
        def work(conn):
            session(request, conn, role="admin")
            return overview(store, conn)

        return await threaded(work)()

    @app.post("/api/admin/export")
    async def api_export(request: Request):
        def work(conn):
            gate.write_session(request, conn, request.headers.get("x-csrf-token"), role="admin")
            e = do_export()
            return {"paths": {k: str(v) for k, v in e.paths.items()}, "rankings": e.rankings,
                    "pairs": e.pairs, "metrics": e.metrics, "invalid": e.invalid}  # fmt: skip

        return await threaded(work)()
