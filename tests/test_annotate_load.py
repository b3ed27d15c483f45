"""The annotation server under load and under SIGKILL: every acknowledged label is kept, once.

Both tests run `posttrain annotate serve` as a real process on a loopback port and drive it
with one HTTP client (one keep-alive connection) per annotator thread.
"""

import http.client
import json
import sqlite3
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the annotation app needs the 'annotate' extra")

from posttrain.annotate import db  # noqa: E402
from posttrain.annotate.testing import Client, ProcessServer, fake_run  # noqa: E402

N_CANDS = 4


def order_for(client: int, prompt: int) -> list:
    """A distinct, checkable ranking per (annotator, prompt), sometimes with a tie."""
    idx = [(client + prompt + j) % N_CANDS for j in range(N_CANDS)]
    return [idx[0], [idx[1], idx[2]], idx[3]] if (client + prompt) % 3 == 0 else idx


def setup_run(tmp_path, n_annotators: int, n_prompts: int):
    run = fake_run(tmp_path / "run", n_prompts=n_prompts, n_cands=N_CANDS)
    names = [f"ann{i:02d}" for i in range(n_annotators)]
    tokens = [
        db.add_annotator(db.db_path(run), n, group=f"g{i % 3}")[0] for i, n in enumerate(names)
    ]
    return run, names, tokens


def rank(client: Client, i: int, pid: str):
    """Client i ranks prompt `toy/<p>` with order_for(i, p); (status, body)."""
    return client.post_json("/api/rank", {"prompt_id": pid, "order": order_for(i, int(pid[4:]))})


def stored(run) -> list[tuple]:
    with sqlite3.connect(db.db_path(run)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return conn.execute(
            "SELECT prompt_id, annotator, order_json, revisions FROM rankings"
        ).fetchall()


def test_20_concurrent_annotators_store_exactly_1000_rankings(tmp_path):
    from posttrain.annotate.export import export
    from posttrain.stages.rank import load_candidates, load_rankings

    run, names, tokens = setup_run(tmp_path, n_annotators=20, n_prompts=50)
    server = ProcessServer(run, k=20).start()  # every annotator gets all 50 prompts
    errors, statuses = [], []
    start = threading.Barrier(20)

    def annotate(i: int):
        c = Client(server.port)
        try:
            c.login(tokens[i])
            queue = c.get_json("/api/queue")[1]["queue"]
            assert len(queue) == 50
            start.wait(timeout=60)
            for pid in queue:
                statuses.append(rank(c, i, pid)[0])
            for pid in queue[:3]:  # a client retrying (say, after a timeout) must not duplicate
                statuses.append(rank(c, i, pid)[0])
            assert c.get_json("/api/queue")[1]["progress"]["ranked"] == 50
        except Exception as e:  # noqa: BLE001 (reported below, with the thread's name)
            errors.append(f"client {i}: {e!r}")
        finally:
            c.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=annotate, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    elapsed = time.monotonic() - t0
    server.stop()
    assert not errors, errors
    assert statuses == [200] * (20 * 53)
    rows = stored(run)
    assert len(rows) == 1000
    assert len({(p, a) for p, a, _, _ in rows}) == 1000  # none duplicated
    assert sum(rev for *_, rev in rows) == 1000  # a retry of the same order is no revision
    want = {(f"toy/{p}", names[i]): order_for(i, p) for i in range(20) for p in range(50)}
    assert {(p, a): json.loads(o) for p, a, o, _ in rows} == want
    e = export(run)
    assert e.rankings == 1000
    cands = load_candidates(run / "sample" / "candidates.jsonl")
    assert len(load_rankings(e.paths["rankings"], cands)) == 1000  # it rejects duplicates
    print(f"1060 rankings from 20 clients in {elapsed:.1f}s")


def test_sigkill_while_submitting_loses_no_acknowledged_ranking(tmp_path):
    run, names, tokens = setup_run(tmp_path, n_annotators=6, n_prompts=60)
    server = ProcessServer(run, k=6).start()
    acked: dict[tuple, list] = {}  # (prompt_id, annotator) -> order the server said it stored
    lock = threading.Lock()
    clients = [Client(server.port, timeout=10) for _ in names]
    for c, tok in zip(clients, tokens, strict=True):
        c.login(tok)

    errors = []

    def annotate(i: int):
        for p in range(60):
            pid, order = f"toy/{p}", order_for(i, p)
            try:
                status, body = clients[i].post_json("/api/rank", {"prompt_id": pid, "order": order})
            except (OSError, http.client.HTTPException):
                return  # the server died: this one was never acknowledged
            if status != 200:
                errors.append(f"client {i}, {pid}: {status} {body}")
                return
            with lock:
                acked[(pid, names[i])] = order

    threads = [threading.Thread(target=annotate, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 60 and time.monotonic() < deadline:  # kill it mid-stream
        time.sleep(0.005)
    server.kill()
    for t in threads:
        t.join(30)
    assert not errors, errors
    n_acked = len(acked)
    assert 60 <= n_acked < 360, n_acked  # killed while the clients were still submitting

    server.start()  # same port, same database; sessions survive the crash
    rows = stored(run)  # and PRAGMA integrity_check says ok
    have = {(p, a): json.loads(o) for p, a, o, _ in rows}
    missing = {k: v for k, v in acked.items() if have.get(k) != v}
    assert not missing, f"{len(missing)} acknowledged rankings lost: {list(missing)[:5]}"
    assert len(have) >= n_acked  # an unacknowledged one may have landed too; never fewer
    # Annotators carry on where they were: their queues hold exactly what is not stored.
    for i, c in enumerate(clients):
        queue = c.get_json("/api/queue")[1]["queue"]
        assert set(queue) == {f"toy/{p}" for p in range(60)} - {p for p, a in have if a == names[i]}
        assert all(rank(c, i, pid)[0] == 200 for pid in queue)
        c.close()
    server.stop()
    rows = stored(run)
    assert len(rows) == 360 and len({(p, a) for p, a, _, _ in rows}) == 360
