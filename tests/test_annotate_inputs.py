"""The annotation app's inputs: orders, JSON bodies, replays, the export form, annotator names.

Each test here is a case that once got through: an empty tie group stored and then a 500 on
every admin page, a 500 on deeply nested JSON, a 10 MB body echoed back, a replay counted as a
re-submission, an export re-posted by a reload, and `..` accepted as a name.
"""

import json
import sqlite3
import time

import pytest

pytest.importorskip("fastapi", reason="the annotation app needs the 'annotate' extra")

from posttrain.annotate import db  # noqa: E402
from posttrain.annotate.testing import Client, add, fake_run, thread_server  # noqa: E402
from posttrain.cli import main  # noqa: E402


@pytest.fixture
def app(tmp_path):
    """4 prompts, all for alice (k=1, one annotator), plus an admin."""
    run = fake_run(tmp_path / "run", n_prompts=4)
    tokens = {"alice": add(run, "alice"), "boss": add(run, "boss", admin=True)}
    with thread_server(run, k=1) as port:
        clients = {}
        for name, tok in tokens.items():
            clients[name] = Client(port)
            clients[name].login(tok)
        yield run, port, clients


def post_raw(client: Client, path: str, body: bytes) -> tuple[int, dict, bytes]:
    h = {"Content-Type": "application/json", "X-CSRF-Token": client.csrf}
    return client.request("POST", path, body, h)


def rows(run) -> list[tuple]:
    with sqlite3.connect(db.db_path(run)) as conn:
        return conn.execute(
            "SELECT id, prompt_id, order_json, revisions FROM rankings ORDER BY id"
        ).fetchall()


# ----------------------------------------------------------------------------- empty tie groups


def test_an_empty_tie_group_is_refused_on_every_write_path(app):
    run, _, cl = app
    alice = cl["alice"]
    for order in ([0, 1, 2, []], [[], 0, 1, 2], [0, [], [1, 2]]):
        status, body = alice.post_json("/api/rank", {"prompt_id": "toy/0", "order": order})
        assert status == 422 and "empty tie group" in body["detail"], (order, body)
    # The database's own write checks it too, whoever calls it.
    with db.opened(db.db_path(run)) as conn, pytest.raises(ValueError, match="empty tie group"):
        db.save_ranking(conn, "toy/0", "alice", [0, 1, 2, []], 3)
    assert rows(run) == []
    # The admin pages and the export still work: nothing bad got in.
    assert cl["boss"].get("/admin")[0] == 200
    assert cl["boss"].get("/api/admin/progress")[0] == 200


def test_a_bad_row_already_stored_is_skipped_and_shown_not_a_500(app, capsys):
    run, _, cl = app
    alice, boss = cl["alice"], cl["boss"]
    assert alice.post_json("/api/rank", {"prompt_id": "toy/1", "order": [2, [0, 1]]})[0] == 200
    with sqlite3.connect(db.db_path(run)) as conn:  # as an older version of the app stored them
        for pid, order in (("toy/0", "[0, 1, 2, []]"), ("toy/2", "not json")):
            conn.execute(
                "INSERT INTO rankings (prompt_id, annotator, order_json, n_candidates, created,"
                " updated) VALUES (?, 'alice', ?, 3, 0, 0)",
                (pid, order),
            )
    bad = {pid: i for i, pid, *_ in rows(run) if pid != "toy/1"}
    status, o = boss.get_json("/api/admin/progress")
    assert status == 200 and o["total"] == 1
    assert sorted(r["id"] for r in o["invalid"]) == sorted(bad.values())
    problem = {r["prompt_id"]: r["problem"] for r in o["invalid"]}
    assert "empty tie group" in problem["toy/0"] and "not valid JSON" in problem["toy/2"]
    status, _, page = boss.get("/admin")
    assert status == 200 and b'id="invalid"' in page
    for i in bad.values():
        assert f"ranking id {i}:".encode() in page
    # The export leaves them out and says so.
    status, e = boss.post_json("/api/admin/export", {})
    assert status == 200 and e["rankings"] == 1
    assert sorted(r["id"] for r in e["invalid"]) == sorted(bad.values())
    exported = (run / "annotate" / "rankings.jsonl").read_text().splitlines()
    assert [json.loads(line)["prompt_id"] for line in exported] == ["toy/1"]
    assert main(["annotate", "export", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 rankings" in out and f"invalid ranking id {bad['toy/0']}" in out
    # The annotator's pages still work, and the two prompts are back in their queue.
    assert alice.get("/")[0] == 200
    assert alice.get_json("/api/queue")[1]["queue"] == ["toy/0", "toy/2", "toy/3"]
    assert alice.get("/rank/0")[0] == 200 and alice.get("/rank/2")[0] == 200
    # Ranking the prompt again replaces the bad row with a good one.
    assert alice.post_json("/api/rank", {"prompt_id": "toy/0", "order": [0, 1, 2]})[0] == 200
    assert [r["prompt_id"] for r in boss.get_json("/api/admin/progress")[1]["invalid"]] == ["toy/2"]


# ----------------------------------------------------------------------------- JSON bodies


def test_deeply_nested_json_is_a_400_not_a_500(app):
    _, _, cl = app
    alice = cl["alice"]
    for depth in (100_000, 1_000, 50):
        deep = b"[" * depth + b"]" * depth
        status, _, body = post_raw(alice, "/api/rank", deep)
        assert status == 400 and b"nested too deeply" in body, (depth, status, body[:200])
        order = json.loads(b"[" * depth + b"0" + b"]" * depth) if depth < 500 else None
        if order is not None:
            status, body = alice.post_json("/api/rank", {"prompt_id": "toy/0", "order": order})
            assert status == 400 and "nested too deeply" in body["detail"]
    # The server is still up and a normal request goes through.
    assert alice.post_json("/api/rank", {"prompt_id": "toy/0", "order": [0, 1, 2]})[0] == 200


def test_json_bodies_over_the_form_limit_get_413_and_a_short_reply(app):
    from posttrain.annotate.checks import MAX_BODY

    run, port, cl = app
    alice = cl["alice"]
    assert MAX_BODY == 1024 * 1024  # the form limit: starlette's max_part_size
    huge = json.dumps({"prompt_id": "toy/0", "order": list(range(2_000_000))}).encode()
    assert len(huge) > 10 * MAX_BODY
    status, _, body = post_raw(alice, "/api/rank", huge)
    assert status == 413 and len(body) < 1000
    assert "larger than 1 MiB" in json.loads(body)["detail"]
    # Chunked (no Content-Length): counted as it arrives.
    c = Client(port)
    c.cookie, c.csrf = alice.cookie, alice.csrf
    h = {"Content-Type": "application/json", "X-CSRF-Token": alice.csrf}
    chunks = (huge[i : i + 65536] for i in range(0, len(huge), 65536))
    c.conn = __import__("http.client").client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.conn.request("POST", "/api/rank", body=chunks, headers=h, encode_chunked=True)
    resp = c.conn.getresponse()
    assert resp.status == 413 and len(resp.read()) < 1000
    # Forms have the same limit.
    status, _, body = alice.post_form("/rank/0", {"csrf": alice.csrf, "rank_0": "1" * MAX_BODY})
    assert status == 413 and len(body) < 5000 and b"larger than 1 MiB" in body
    assert rows(run) == []


def test_error_replies_never_echo_more_than_a_short_prefix(app):
    _, _, cl = app
    alice = cl["alice"]
    long = "x" * 500_000
    replies = [
        alice.post_json("/api/rank", {"prompt_id": "toy/0", "order": list(range(100_000))}),
        alice.post_json("/api/rank", {"prompt_id": "toy/0", "order": [0, 1, long]}),
        alice.post_json("/api/rank", {"prompt_id": long, "order": [0, 1, 2]}),
        alice.post_json("/api/rank", {"prompt_id": "toy/0", "order": [0, 1, 2], long: 1}),
        alice.post_json("/api/skip", {"prompt_id": long}),
    ]
    for status, body in replies:
        assert status in (404, 422) and len(json.dumps(body)) < 600, (status, str(body)[:300])
    assert "not a permutation of the 3 candidates" in replies[0][1]["detail"]
    assert "'xxxxxxxx" in replies[2][1]["detail"]  # a prefix, to recognise the value by
    status, _, page = alice.post_form("/rank/0", {"csrf": alice.csrf, "rank_0": "7" * 100_000,
                                                  "rank_1": "1", "rank_2": "2"})  # fmt: skip
    assert status == 422 and len(page) < 10_000 and b"7777777" in page
    status, _, page = alice.post_form("/rank/0", {"csrf": alice.csrf, "rank_" + long: "1"})
    assert status == 422 and len(page) < 10_000
    status, _, page = alice.get("/rank/" + "9" * 5000)
    assert status in (404, 422) and len(page) < 10_000
    status, _, page = alice.get("/rank/x" + "y" * 5000)
    assert status == 422 and len(page) < 10_000 and b"index" in page


# ----------------------------------------------------------------------------- replays


def test_an_identical_replay_is_acknowledged_without_a_new_revision(app):
    run, _, cl = app
    alice, boss = cl["alice"], cl["boss"]
    send = {"prompt_id": "toy/0", "order": [2, [0, 1]]}
    first, again = alice.post_json("/api/rank", send), alice.post_json("/api/rank", send)
    assert (first[1]["revision"], again[1]["revision"]) == (1, 1)  # the replay is no revision
    assert first == (200, {**send, "revision": 1, "changed": True})
    assert again == (200, {**send, "revision": 1, "changed": False})
    # The same ties written in another order are the same ranking.
    status, body = alice.post_json("/api/rank", {"prompt_id": "toy/0", "order": [2, [1, 0]]})
    assert status == 200 and (body["revision"], body["changed"]) == (1, False)
    assert rows(run)[0][2:] == ("[2, [0, 1]]", 1)
    # A different order is a real re-submission; replaying that one changes nothing more.
    for changed in (True, False):
        status, body = alice.post_json("/api/rank", {"prompt_id": "toy/0", "order": [0, 1, 2]})
        assert status == 200 and (body["revision"], body["changed"]) == (2, changed)
    # The form path: a double submit of the same ranks is one ranking, not a re-submission.
    form = {"csrf": alice.csrf, "rank_0": "1", "rank_1": "1", "rank_2": "2"}
    for _ in range(2):
        assert alice.post_form("/rank/3", form)[0] == 303
    assert [r[2:] for r in rows(run)] == [("[0, 1, 2]", 2), ("[[0, 1], 2]", 1)]
    status, o = boss.get_json("/api/admin/progress")
    assert [(r["ranked"], r["revisions"]) for r in o["rows"]] == [(2, 1)]


# ----------------------------------------------------------------------------- export page


def test_export_redirects_after_post_so_a_reload_does_not_export_again(app):
    run, _, cl = app
    alice, boss = cl["alice"], cl["boss"]
    assert alice.post_json("/api/rank", {"prompt_id": "toy/0", "order": [0, 1, 2]})[0] == 200
    status, headers, _ = boss.post_form("/admin/export", {"csrf": boss.csrf})
    assert status == 303 and headers["location"] == "/admin/export"
    status, _, page = boss.get("/admin/export")
    assert status == 200 and b'id="exported"' in page and b"Wrote 1 rankings" in page
    out = run / "annotate" / "rankings.jsonl"
    out.unlink()
    time.sleep(0.01)
    status, _, page = boss.get("/admin/export")  # a reload: shows the result, exports nothing
    assert status == 200 and b"Wrote 1 rankings" in page and not out.exists()
    assert alice.get("/admin/export")[0] == 403
    # Before any export the page says so; a failed export is an error page, not a redirect.
    fresh = fake_run(run.parent / "fresh")
    boss2 = add(fresh, "boss", admin=True)
    with thread_server(fresh, k=1) as port:
        c = Client(port)
        c.login(boss2)
        status, _, page = c.get("/admin/export")
        assert status == 200 and b"No export yet" in page
        status, _, page = c.post_form("/admin/export", {"csrf": c.csrf})
        assert status == 409 and b"no rankings stored yet" in page


# ----------------------------------------------------------------------------- names


BAD_NAMES = ["..", ".", "../alice", "a/b", "a\\b", ".hidden", "-rf", "a..b", "", "a" * 65]


def test_path_like_annotator_names_are_refused(tmp_path, capsys):
    path = db.db_path(tmp_path)
    for name in BAD_NAMES:
        with pytest.raises(ValueError, match="annotator name .* must"):
            db.add_annotator(path, name)
        if name:  # no group is the default group
            with pytest.raises(ValueError, match="group .* must"):
                db.add_annotator(path, "ok", group=name)
    for name in ("alice", "a.b", "ann_1", "x-y", "_bot", "A9"):
        assert db.add_annotator(path, name)[1]
    run = fake_run(tmp_path / "run")
    assert main(["annotate", "add-annotator", "alice", "--run", str(run)]) == 0
    for action in ("add-annotator", "add-admin"):
        assert main(["annotate", action, "..", "--run", str(run)]) == 2
        err = capsys.readouterr().err
        assert "annotator name '..' must" in err and "path" in err
    with db.opened(db.db_path(run)) as conn:
        assert [a.name for a in db.annotators(conn, role=None)] == ["alice"]
