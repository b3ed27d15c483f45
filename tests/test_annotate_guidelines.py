"""Ranking guidelines (one set per queue: the default, `serve --guidelines FILE`, or the admin's),
and prompts shown under a hash of their id (the toy world's ids name the task family)."""

import pytest

pytest.importorskip("fastapi", reason="the annotation app needs the 'annotate' extra")

from posttrain.annotate import db, guidelines  # noqa: E402
from posttrain.annotate.testing import Client, add, fake_run, thread_server  # noqa: E402


def test_guidelines_text_becomes_paragraphs_and_lists():
    text = "Rank by truth.\n- Correct first\n* Then short\n\nTies are fine."
    assert guidelines.blocks(text) == [
        {"kind": "p", "items": ["Rank by truth."]},
        {"kind": "ul", "items": ["Correct first", "Then short"]},
        {"kind": "p", "items": ["Ties are fine."]},
    ]
    kinds = [b["kind"] for b in guidelines.blocks(guidelines.DEFAULT)]
    assert kinds == ["p", "ul"] and "longer is not better" in guidelines.DEFAULT
    with pytest.raises(ValueError, match="at most 5,000"):
        guidelines.check("x" * 5001)
    # A hash: stable, short, and nothing of the id (its family) in it.
    pid = "safety/rl/00012"
    assert guidelines.public_id(pid) == guidelines.public_id(pid) != guidelines.public_id("x")
    assert "safety" not in guidelines.public_id(pid) and len(guidelines.public_id(pid)) == 10


def test_guidelines_default_stored_reset_and_only_the_admin_sets_them(tmp_path):
    run = fake_run(tmp_path / "run", n_prompts=2)
    tokens = {"ann": add(run, "ann"), "boss": add(run, "boss", admin=True)}
    with thread_server(run, k=1) as port:
        ann, boss = Client(port), Client(port)
        ann.login(tokens["ann"])
        boss.login(tokens["boss"])
        status, body = ann.get_json("/api/prompt/toy/0")
        assert status == 200 and body["guidelines"] == guidelines.DEFAULT
        page = ann.get("/rank/0")[2].decode()
        assert 'id="guidelines"' in page and "Correct first" in page
        assert guidelines.public_id("toy/0") in page and "toy/0" not in page
        assert 'id="keys"' in page and "<kbd>u</kbd> undo last pick" in page

        form = {"csrf": ann.csrf, "guidelines": "mine"}
        assert ann.post_form("/admin/guidelines", form)[0] == 403  # annotators cannot
        assert boss.post_form("/admin/guidelines", {"guidelines": "no csrf"})[0] == 403
        status, _, _ = boss.post_form("/admin/guidelines", {"csrf": boss.csrf,
                                                            "guidelines": "- <b>Be right</b>"})  # fmt: skip
        assert status == 303
        page = ann.get("/rank/0")[2].decode()
        assert "<li>&lt;b&gt;Be right&lt;/b&gt;</li>" in page  # escaped like every text
        status, _, body = boss.post_form("/admin/guidelines", {"csrf": boss.csrf,
                                                               "guidelines": "x" * 6000})  # fmt: skip
        assert status == 422 and b"at most 5,000" in body
        boss.post_form("/admin/guidelines", {"csrf": boss.csrf, "guidelines": "  "})
        assert ann.get_json("/api/prompt/toy/0")[1]["guidelines"] == guidelines.DEFAULT


def test_serve_guidelines_file_sets_the_queue(tmp_path, monkeypatch):
    import uvicorn

    from posttrain.annotate import server

    run = fake_run(tmp_path / "run", n_prompts=1)
    f = tmp_path / "guide.txt"
    f.write_text("Prefer the honest answer.\r\n- Ties are fine\n")
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)  # start nothing
    server.serve(run, "sample", "127.0.0.1", 0, 1, f)
    with db.opened(db.db_path(run)) as conn:
        assert guidelines.get(conn) == "Prefer the honest answer.\n- Ties are fine"
