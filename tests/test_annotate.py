"""The annotation app: assignment, tokens, sessions, the security rules, validation and export.

Server tests run the real app (uvicorn on a loopback port, in a thread) and talk HTTP to it.
"""

import json
import sqlite3

import pytest

pytest.importorskip("fastapi", reason="the annotation app needs the 'annotate' extra")

from posttrain.annotate import db  # noqa: E402
from posttrain.annotate.server import order_from_ranks, parse_form_ranks  # noqa: E402
from posttrain.annotate.testing import EVIL, Client, add, fake_run, thread_server  # noqa: E402
from posttrain.cli import main  # noqa: E402


@pytest.fixture
def app(tmp_path):
    """8 prompts, one annotator each (k=1) between alice and bob, plus an admin."""
    run = fake_run(tmp_path / "run", n_prompts=8)
    tokens = {n: add(run, n, group=g) for n, g in (("alice", "g1"), ("bob", "g2"))}
    tokens["boss"] = add(run, "boss", admin=True)
    with thread_server(run, k=1) as port:
        clients = {}
        for name, tok in tokens.items():
            clients[name] = Client(port)
            clients[name].login(tok)
        yield run, port, clients


def queue(client) -> list[str]:
    status, body = client.get_json("/api/queue")
    assert status == 200
    return body["queue"]


# ----------------------------------------------------------------------------- pure parts


def test_assignment_is_deterministic_k_per_prompt_and_stable():
    pids = [f"p{i}" for i in range(200)]
    a = db.assign(pids, ["ann", "bea", "cy"], k=2)
    assert a == db.assign(pids, ["cy", "ann", "bea"], k=2)  # order of names does not matter
    for pid in pids:
        assert sum(pid in a[n] for n in a) == 2
    assert all(40 < len(v) < 200 for v in a.values())  # spread, not all on one person
    # A newcomer takes over some prompts; nobody else gains any, and every prompt keeps k.
    b = db.assign(pids, ["ann", "bea", "cy", "dee"], k=2)
    for n in ("ann", "bea", "cy"):
        assert set(b[n]) <= set(a[n])
    assert sum(map(len, b.values())) == 2 * len(pids)
    assert db.assign(pids, ["solo"], k=3) == {"solo": pids}  # k above the pool: everyone gets it


def test_display_order_is_shuffled_per_annotator():
    orders = {tuple(db.display_order("p", name, 5)) for name in ("a", "b", "c", "d", "e", "f")}
    assert all(sorted(o) == list(range(5)) for o in orders)
    assert len(orders) > 1
    assert db.display_order("p", "a", 5) == db.display_order("p", "a", 5)


def test_rank_numbers_become_orders_with_ties():
    assert order_from_ranks({0: 2, 1: 1, 2: 2}) == [1, [0, 2]]
    assert order_from_ranks({0: 3, 1: 1, 2: 7}) == [1, 0, 2]  # gaps are fine
    assert parse_form_ranks({"rank_2": "1", "rank_0": "1", "rank_1": "2"}, [2, 0, 1]) == [[0, 2], 1]
    with pytest.raises(ValueError, match="every response needs a rank: B has none"):
        parse_form_ranks({"rank_2": "1", "rank_0": "", "rank_1": "2"}, [2, 0, 1])
    with pytest.raises(ValueError, match="response A: rank '-1'"):
        parse_form_ranks({"rank_2": "-1", "rank_0": "1", "rank_1": "2"}, [2, 0, 1])
    with pytest.raises(ValueError, match="unknown field 'rank_9'"):
        parse_form_ranks({"rank_9": "1", "rank_0": "1"}, [0])


def test_tokens_are_stored_hashed_and_work_once(tmp_path):
    path = db.db_path(tmp_path)
    token, created = db.add_annotator(path, "alice", group="g1")
    token2, created2 = db.add_annotator(path, "alice")  # a new link for the same annotator
    assert created and not created2
    with db.opened(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(FULL)")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        stored = conn.execute("SELECT token_hash FROM login_tokens").fetchall()
        assert {r[0] for r in stored} == {db.hash_secret(token), db.hash_secret(token2)}
        assert db.consume_login_token(conn, token).name == "alice"
        assert db.consume_login_token(conn, token) is None  # spent
        assert db.consume_login_token(conn, "forged") is None
        sid, csrf = db.create_session(conn, "alice")
        assert db.get_session(conn, sid).annotator == db.Annotator("alice", "g1", "annotator")
        assert db.get_session(conn, sid + "x") is None
    wal = path.with_name(path.name + "-wal")  # gone once the last connection closed
    raw = path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    for secret in (token, token2, sid):
        assert secret.encode() not in raw
    with pytest.raises(ValueError, match="already in group 'g1'"):
        db.add_annotator(path, "alice", group="g2")
    with pytest.raises(ValueError, match="already registered as annotator"):
        db.add_annotator(path, "alice", admin=True)
    with pytest.raises(ValueError, match="letters, digits"):
        db.add_annotator(path, "a+b")


# ----------------------------------------------------------------------------- CLI


def test_cli_add_annotator_and_clear_errors(tmp_path, capsys):
    run = fake_run(tmp_path / "run")
    assert main(["annotate", "add-annotator", "ann", "--run", str(run), "--group", "g1"]) == 0
    out = capsys.readouterr().out
    assert "login link (works once): http://127.0.0.1:8000/login?token=" in out
    token = out.split("token: ")[1].split()[0]
    with db.opened(db.db_path(run)) as conn:
        assert db.consume_login_token(conn, token).group == "g1"
    assert main(["annotate", "add-admin", "boss", "--run", str(run), "--url", "http://h:9/"]) == 0
    assert "http://h:9/login?token=" in capsys.readouterr().out
    cases = [
        (["serve", "--run", str(tmp_path / "nope")], "run directory .*nope not found"),
        (["serve", "--run", str(run), "--stage", "smaple"], "no stage directory 'smaple'.*sample"),
        (["serve", "--run", str(run), "--k", "0"], "--k must be at least 1"),
        (["export", "--run", str(run)], "has not served this run yet"),
    ]
    (tmp_path / "empty" / "sample").mkdir(parents=True)
    cases.append((["serve", "--run", str(tmp_path / "empty")], "candidates.jsonl not found"))
    for argv, message in cases:
        assert main(["annotate", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("posttrain: error:")
        assert __import__("re").search(message, err), (argv, err)


def test_serve_refuses_another_stage_or_changed_candidates(tmp_path):
    from posttrain.annotate.core import open_store

    run = fake_run(tmp_path / "run")
    fake_run(run, stage="sample2")
    store = open_store(run, "sample", k=1)
    with pytest.raises(ValueError, match="holds labels of stage 'sample', not 'sample2'"):
        open_store(run, "sample2")
    add(run, "ann")
    with db.opened(store.db_path) as conn:
        db.save_ranking(conn, "toy/0", "ann", [0, 1, 2], 3)
    cands = run / "sample" / "candidates.jsonl"
    cands.write_text(cands.read_text().replace("answer 0", "ANSWER 0"))
    with pytest.raises(ValueError, match="changed since labelling began"):
        open_store(run, "sample")


# ----------------------------------------------------------------------------- the server


def test_without_a_session_everything_is_refused(app):
    run, port, _ = app
    anon, forged = Client(port), Client(port)
    forged.cookie = "posttrain_session=" + "A" * 43
    for c in (anon, forged):
        for path in ("/", "/rank/next", "/rank/0", "/admin", "/api/me", "/api/queue",
                     "/api/labels", "/api/prompt/toy/0", "/api/admin/progress"):  # fmt: skip
            assert c.get(path)[0] == 401, path
        assert c.post_json("/api/rank", {"prompt_id": "toy/0", "order": [0, 1, 2]})[0] == 401
        assert c.post_form("/rank/0", {"rank_0": "1", "rank_1": "2", "rank_2": "3"})[0] == 401
        assert c.post_form("/skip/0", {})[0] == 401
        assert c.post_json("/api/admin/export", {})[0] == 401
    status, _, body = anon.get("/")
    assert b"Not logged in" in body
    assert anon.get("/login")[0] == 200 and anon.get("/static/app.js")[0] == 200
    with db.opened(db.db_path(run)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM rankings").fetchone()[0] == 0


def test_login_link_works_once_and_sets_a_strict_httponly_cookie(tmp_path):
    run = fake_run(tmp_path / "run")
    token = add(run, "ann")
    with thread_server(run) as port:
        c = Client(port)
        status, _, body = c.get(f"/login?token={token}")  # showing the form spends nothing
        assert status == 200 and token.encode() in body
        status, headers, _ = c.post_form("/login", {"token": token})
        assert status == 303 and headers["location"] == "/"
        cookie = headers["set-cookie-all"][0]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        assert c.get("/")[0] == 200
        again = Client(port)
        status, _, body = again.post_form("/login", {"token": token})
        assert status == 403 and b"already used" in body
        assert again.post_json("/api/login", {"token": token}, csrf=False)[0] == 403
        me = c.get_json("/api/me")[1]
        c.post_form("/logout", {"csrf": me["csrf"]})
        assert c.get("/")[0] == 401


def test_annotator_cannot_read_or_change_another_annotators_labels(app):
    run, port, cl = app
    alice, bob = cl["alice"], cl["bob"]
    mine, theirs = queue(alice), queue(bob)
    assert mine and theirs and not set(mine) & set(theirs)  # k=1: disjoint queues
    assert alice.post_json("/api/rank", {"prompt_id": mine[0], "order": [2, 1, 0]})[0] == 200
    # Bob sees only his own labels, whatever he asks for.
    for path in ("/api/labels", "/api/labels?annotator=alice"):
        status, body = bob.get_json(path)
        assert status == 200 and body == {"annotator": "bob", "rankings": {}, "skipped": []}
    # ... cannot open, rank or skip Alice's prompt, nor write as Alice ...
    idx = int(mine[0].split("/")[1])
    assert bob.get(f"/api/prompt/{mine[0]}")[0] == 403
    assert bob.get(f"/rank/{idx}")[0] == 403
    assert bob.post_json("/api/rank", {"prompt_id": mine[0], "order": [0, 1, 2]})[0] == 403
    assert bob.post_json("/api/skip", {"prompt_id": mine[0]})[0] == 403
    form = {"csrf": bob.csrf, "rank_0": "1", "rank_1": "2", "rank_2": "3"}
    assert bob.post_form(f"/rank/{idx}", form)[0] == 403
    status, body = bob.post_json(
        "/api/rank", {"prompt_id": theirs[0], "order": [0, 1, 2], "annotator": "alice"}
    )
    assert status == 422 and "unknown field 'annotator'" in body["detail"]
    # ... and the admin pages are not his either.
    assert bob.get("/admin")[0] == 403 and bob.get("/api/admin/progress")[0] == 403
    assert bob.post_json("/api/rank", {"prompt_id": theirs[0], "order": [0, 1, 2]})[0] == 200
    with db.opened(db.db_path(run)) as conn:
        assert db.rankings_of(conn, "alice") == {mine[0]: [2, 1, 0]}
        assert db.rankings_of(conn, "bob") == {theirs[0]: [0, 1, 2]}


def test_script_in_a_response_is_rendered_inert(app):
    _, _, cl = app
    who = next(c for c in (cl["alice"], cl["bob"]) if "toy/1" in queue(c))
    status, headers, body = who.get("/rank/1")
    html = body.decode()
    assert status == 200
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;&lt;img src=x onerror=" in html
    assert "<script>window" not in html and "<img" not in html and "<b>what" not in html
    assert html.count("<script") == 1 and '<script src="/static/app.js">' in html
    assert "script-src 'self'" in headers["content-security-policy"]  # no inline script runs
    assert headers["x-content-type-options"] == "nosniff"
    # The API gives the raw text (JSON, not HTML) and nothing but the text of each response.
    status, body = who.get_json("/api/prompt/toy/1")
    assert EVIL in {c["text"].split("Sure! ")[-1].removesuffix(" done") for c in body["candidates"]}
    assert all(set(c) == {"index", "label", "text"} for c in body["candidates"])
    assert "gold" not in json.dumps(body) and "logprob" not in json.dumps(body)


def test_forged_cross_site_posts_are_refused(app):
    run, port, cl = app
    alice = cl["alice"]
    pid = queue(alice)[0]
    idx = int(pid.split("/")[1])
    ranks = {"rank_0": "1", "rank_1": "2", "rank_2": "3"}
    evil = {"Origin": "http://evil.example"}
    attempts = [
        alice.post_form(f"/rank/{idx}", ranks),  # no CSRF token
        alice.post_form(f"/rank/{idx}", {**ranks, "csrf": "guess"}),
        alice.post_form(f"/rank/{idx}", {**ranks, "csrf": alice.csrf}, headers=evil),
        alice.post_form(
            f"/rank/{idx}", {**ranks, "csrf": alice.csrf}, headers={"Sec-Fetch-Site": "cross-site"}
        ),  # fmt: skip
        alice.post_form(f"/skip/{idx}", {}),
        alice.post_form("/logout", {}),
    ]
    assert [a[0] for a in attempts] == [403] * len(attempts)
    assert b"CSRF token missing or wrong" in attempts[0][2]
    assert b"cross-site request refused" in attempts[2][2]
    order = {"prompt_id": pid, "order": [0, 1, 2]}
    assert alice.post_json("/api/rank", order, csrf=False)[0] == 403
    assert alice.post_json("/api/rank", order, headers=evil)[0] == 403
    assert cl["boss"].post_json("/api/admin/export", {}, csrf=False)[0] == 403
    with db.opened(db.db_path(run)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM rankings").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM skips").fetchone()[0] == 0
    # The same form from the app's own page goes through.
    status, headers, _ = alice.post_form(f"/rank/{idx}", {**ranks, "csrf": alice.csrf},
                                         headers={"Origin": f"http://127.0.0.1:{port}"})  # fmt: skip
    assert status == 303 and headers["location"] == "/rank/next"


def test_invalid_rankings_get_422_naming_the_problem(app):
    run, _, cl = app
    alice = cl["alice"]
    pid = queue(alice)[0]
    bad = {
        "not a permutation of the 3 candidates": [[0, 1], [0, 1, 1], [0, 1, 3], [[0, 1, 2, 3]]],
        "must be a non-empty list": ["012", [], None],
        "must hold candidate indices": [[0, [1, True], 2], [0, 1.0, 2]],
    }
    for message, orders in bad.items():
        for order in orders:
            status, body = alice.post_json("/api/rank", {"prompt_id": pid, "order": order})
            assert status == 422 and message in body["detail"], (order, body)
            assert f"prompt {pid!r}" in body["detail"]
    assert alice.post_json("/api/rank", {"prompt_id": "nope", "order": [0]})[0] == 404
    status, body = alice.post_json("/api/rank", {"prompt_id": 3, "order": [0]})
    assert status == 422 and "'prompt_id' must be a string" in body["detail"]
    status, _, body = alice.request("POST", "/api/rank", b"[1, 2",
                                    {"Content-Type": "application/json", "X-CSRF-Token": alice.csrf})  # fmt: skip
    assert status == 422 and b"JSON object" in body
    idx = int(pid.split("/")[1])
    status, _, body = alice.post_form(f"/rank/{idx}", {"csrf": alice.csrf, "rank_0": "1"})
    assert status == 422 and b"every response needs a rank" in body and b'value="1"' in body
    with db.opened(db.db_path(run)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM rankings").fetchone()[0] == 0


def test_resubmitting_updates_the_annotators_own_label(app):
    run, _, cl = app
    alice = cl["alice"]
    pid = queue(alice)[0]
    # A different order is a re-submission; the same one again (a replay) changes nothing.
    for rev, order in zip((1, 2, 2), ([0, 1, 2], [2, [0, 1]], [2, [0, 1]]), strict=True):
        status, body = alice.post_json("/api/rank", {"prompt_id": pid, "order": order})
        assert status == 200 and body["revision"] == rev
    assert pid not in queue(alice)
    assert alice.get_json("/api/labels")[1]["rankings"] == {pid: [2, [0, 1]]}
    status, _, page = alice.get(f"/rank/{pid.split('/')[1]}")  # reopened: the stored ranking
    assert status == 200 and b"submitting\nreplaces your ranking" in page
    for i, rank in ((0, 2), (1, 2), (2, 1)):
        assert f'name="rank_{i}" value="{rank}"'.encode() in page
    with db.opened(db.db_path(run)) as conn:
        rows = conn.execute("SELECT order_json, revisions FROM rankings").fetchall()
    assert rows == [("[2, [0, 1]]", 2)]


def test_export_writes_the_rank_stage_records_and_agreement(tmp_path, capsys):
    """Two annotators on every prompt (k=2); the export is what the rank stage consumes."""
    import io

    from posttrain.config import Pipeline, PipelineConfig
    from posttrain.log import Logger
    from posttrain.stages.base import StageContext
    from posttrain.stages.rank import (
        Config,
        PairSettings,
        build_pairs,
        load_candidates,
        load_rankings,
    )
    from posttrain.stages.rank import run as rank_run

    run = fake_run(tmp_path / "run", n_prompts=5)
    tokens = {"ann": add(run, "ann", group="g1"), "bea": add(run, "bea", group="g2")}
    boss = add(run, "boss", admin=True)
    with thread_server(run, k=2) as port:
        for i, (name, tok) in enumerate(tokens.items()):
            c = Client(port)
            c.login(tok)
            for pid in queue(c):
                if name == "bea" and pid == "toy/4":
                    assert c.post_json("/api/skip", {"prompt_id": pid})[0] == 200
                    continue
                order = [0, 1, 2] if i == 0 or pid == "toy/0" else [0, [1, 2]]
                assert c.post_json("/api/rank", {"prompt_id": pid, "order": order})[0] == 200
        admin = Client(port)
        admin.login(boss)
        status, o = admin.get_json("/api/admin/progress")
        assert status == 200 and (o["total"], o["covered"], o["complete"]) == (9, 5, 4)
        rows = {r["name"]: r for r in o["rows"]}
        assert rows["bea"]["skipped"] == 1 and rows["ann"]["ranked"] == 5
        assert {"rank/kappa/ann~bea", "rank/alpha", "rank/agreement_gold"} <= set(o["metrics"])
        status, _, page = admin.get("/admin")
        assert status == 200 and b"rank/kappa/ann~bea" in page
        status, headers, _ = admin.post_form("/admin/export", {"csrf": admin.csrf})
        assert status == 303 and headers["location"] == "/admin/export"
        status, _, page = admin.get("/admin/export")
        assert status == 200 and b"Wrote 9 rankings" in page
    assert main(["annotate", "export", "--run", str(run)]) == 0
    assert "wrote 9 rankings" in capsys.readouterr().out
    out = run / "annotate"
    cands = load_candidates(run / "sample" / "candidates.jsonl")
    rankings = load_rankings(out / "rankings.jsonl", cands)  # the rank stage's own reader
    exported = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
    assert exported == rankings and len(rankings) == 9
    assert set(exported[0]) == {"prompt_id", "annotator", "group", "order"}
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert pairs == json.loads(json.dumps(build_pairs(cands, rankings, PairSettings())))
    # The rank stage with `labels:` takes the export and computes the same agreement figures.
    pipe = Pipeline(PipelineConfig(name="h", stages=["rank"]), [], "test")
    ctx = StageContext("rank", "rank", tmp_path / "r", pipe, Logger(stream=io.StringIO()))
    ctx.stage_dir.mkdir(parents=True)
    res = rank_run(Config(candidates=str(run / "sample/candidates.jsonl"),
                          labels=str(out / "rankings.jsonl")), ctx)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert res.metrics == pytest.approx(metrics)
    assert (ctx.stage_dir / "pairs.jsonl").read_text() == (out / "pairs.jsonl").read_text()
    # Only human agreement figures: ann and bea agree on toy/0 and on all strict pairs of ann.
    assert metrics["rank/rankings"] == 9 and "rank/kappa/ann~bea" in metrics
    with sqlite3.connect(db.db_path(run)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
