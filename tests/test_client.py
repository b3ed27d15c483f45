"""The model client: an OpenAI-compatible server on the loopback (a small stdlib server that can
be told to misbehave) and a tiny local model, both behind one interface, with a reply cache."""

import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from posttrain.generate.client import ClientConfig, ModelClientError, make_client
from posttrain.generate.requests import ChatRequest

MODEL = "teacher"


class ChatServer(ThreadingHTTPServer):
    """POST /v1/chat/completions. `script` is consumed one entry per call, then "ok": "ok",
    ("sleep", s) then ok, "malformed", "nochoices", 500, 429, 400. A user turn saying "bad" is
    always answered 400. Choice j of a request answers f"{content}|seed={seed}|{j}"."""

    daemon_threads = True

    def __init__(self, script=(), delay=0.0):
        super().__init__(("127.0.0.1", 0), Handler)
        self.script, self.delay = list(script), delay
        self.calls, self.bodies, self.headers_seen = 0, [], []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def handle_error(self, request, client_address):
        pass  # a client that gave up on a sleeping handler: a broken pipe, nothing to report

    def next_action(self, body, headers):
        with self.lock:
            self.calls += 1
            self.bodies.append(body)
            self.headers_seen.append(headers)
            return self.script.pop(0) if self.script else "ok"


def reply(body):
    content = body["messages"][-1]["content"]
    choices = []
    for j in range(body.get("n", 1)):
        text = f"{content}|seed={body.get('seed')}|{j}"
        c = {"index": j, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        if body.get("logprobs"):
            c["logprobs"] = {"content": [{"token": t, "logprob": -0.5} for t in text.split("|")]}
        choices.append(c)
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    return {"id": "x", "object": "chat.completion", "choices": choices[::-1], "usage": usage}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, code, payload: bytes):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self):
        assert self.path == "/v1/chat/completions"
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        action = self.server.next_action(body, dict(self.headers))
        time.sleep(self.server.delay)
        if body["messages"][-1]["content"] == "bad":
            action = 400
        if isinstance(action, tuple):
            time.sleep(action[1])
            action = "ok"
        if action == "ok":
            self.send(200, json.dumps(reply(body)).encode())
        elif action == "malformed":
            self.send(200, b'{"choices": [oops')
        elif action == "nochoices":
            self.send(200, b'{"object": "chat.completion"}')
        elif action == 400:
            err = {"error": {"message": "max_tokens is too large for this model", "code": 400}}
            self.send(400, json.dumps(err).encode())
        else:
            self.send(action, b"upstream overloaded, try later")


@pytest.fixture
def server_factory():
    servers = []

    def make(script=(), delay=0.0):
        servers.append(ChatServer(script, delay))
        return servers[-1]

    yield make
    for s in servers:
        s.shutdown()
        s.server_close()


def endpoint(url, cache_dir=None, **kw):
    cfg = ClientConfig.model_validate({"url": url, "model": MODEL, "backoff_s": 0.01} | kw)
    return make_client(cfg, cache_dir=cache_dir)


def ask(content, seed=0, **kw):
    return ChatRequest(messages=[{"role": "user", "content": content}], seed=seed, **kw)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: nothing listens there


# --- the endpoint client -------------------------------------------------------------------------


def test_endpoint_sends_the_standard_body_and_parses_choices(server_factory):
    srv = server_factory()
    client = endpoint(srv.url)
    req = ask("hi", seed=3, n=2, temperature=0.7, max_tokens=64, stop=["\n"], logprobs=True)
    (out,) = client.chat([req])
    assert srv.bodies[0] == {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2,
        "temperature": 0.7, "top_p": 1.0, "max_tokens": 64, "stop": ["\n"], "seed": 3,
        "logprobs": True,
    }  # fmt: skip
    # The server lists choices in reverse: they come back by index.
    assert [c.text for c in out.choices] == ["hi|seed=3|0", "hi|seed=3|1"]
    assert out.choices[1].tokens == ["hi", "seed=3", "1"]
    assert out.choices[1].token_logprobs == [-0.5] * 3
    assert out.choices[0].finish_reason == "stop" and out.usage["total_tokens"] == 7
    assert not out.cached and client.name == MODEL
    assert client.stats == {"requests": 1, "cache_hits": 0, "retries": 0, "errors": 0}
    # Without logprobs asked, none are sent for or parsed; no seed, no seed key.
    (plain,) = client.chat([ask("yo", seed=None)])
    assert "logprobs" not in srv.bodies[1] and "seed" not in srv.bodies[1]
    assert plain.choices[0].tokens is None


def test_connection_refused_fails_after_a_bounded_number_of_attempts():
    url = f"http://127.0.0.1:{closed_port()}/v1"
    client = endpoint(url, max_retries=2)
    t0 = time.perf_counter()
    with pytest.raises(ModelClientError) as e:
        client.chat([ask("hi")])
    assert time.perf_counter() - t0 < 2.0
    msg = str(e.value)
    assert url in msg and MODEL in msg and "3 attempt" in msg and "connection refused" in msg
    assert client.stats["retries"] == 2 and client.stats["errors"] == 1


def test_a_server_slower_than_the_timeout_is_retried_then_named(server_factory):
    srv = server_factory(script=[("sleep", 1.0)] * 5)
    client = endpoint(srv.url, timeout_s=0.2, max_retries=1)
    t0 = time.perf_counter()
    with pytest.raises(ModelClientError, match=r"2 attempt.*timed out after 0\.2 s"):
        client.chat([ask("hi")])
    assert time.perf_counter() - t0 < 1.5  # two 0.2 s waits and a short back-off
    assert srv.calls == 2


@pytest.mark.parametrize(
    "bad, shown", [("malformed", 'malformed JSON: {"choices": [oops'), ("nochoices", "'choices'")]
)
def test_malformed_replies_are_retried_then_shown(server_factory, bad, shown):
    srv = server_factory(script=[bad] * 10)
    client = endpoint(srv.url, max_retries=2)
    with pytest.raises(ModelClientError) as e:
        client.chat([ask("hi")])
    assert shown in str(e.value) and "3 attempt" in str(e.value)
    assert srv.calls == 3


@pytest.mark.parametrize("code, n", [(500, 2), (503, 1), (429, 1)])
def test_server_errors_and_rate_limits_are_retried(server_factory, code, n):
    srv = server_factory(script=[code] * n)
    client = endpoint(srv.url, max_retries=3)
    (out,) = client.chat([ask("hi")])
    assert out.choices[0].text == "hi|seed=0|0"
    assert srv.calls == n + 1 and client.stats["retries"] == n and client.stats["errors"] == 0


def test_the_last_5xx_body_is_in_the_error(server_factory):
    srv = server_factory(script=[500] * 3)
    with pytest.raises(ModelClientError, match="HTTP 500: upstream overloaded"):
        endpoint(srv.url, max_retries=2).chat([ask("hi")])
    assert srv.calls == 3


def test_a_client_error_is_not_retried_and_shows_the_api_message(server_factory):
    srv = server_factory(script=[400])
    client = endpoint(srv.url, max_retries=3)
    with pytest.raises(ModelClientError) as e:
        client.chat([ask("hi")])
    assert "HTTP 400: max_tokens is too large for this model" in str(e.value)
    assert "not retried" in str(e.value) and srv.calls == 1 and client.stats["retries"] == 0


def test_requests_run_concurrently_and_keep_their_order(server_factory):
    srv = server_factory(delay=0.3)
    client = endpoint(srv.url, concurrency=4)
    t0 = time.perf_counter()
    out = client.chat([ask(f"q{i}") for i in range(8)])
    elapsed = time.perf_counter() - t0
    # two rounds of four: ~0.6 s; one at a time would take 2.4 s (room for a loaded machine)
    assert elapsed < 8 * 0.3 * 0.75, elapsed
    assert [r.choices[0].text for r in out] == [f"q{i}|seed=0|0" for i in range(8)]


def test_api_key_is_read_from_the_named_env_var(server_factory, monkeypatch):
    srv = server_factory()
    monkeypatch.delenv("POSTTRAIN_TEST_KEY", raising=False)
    with pytest.raises(ModelClientError, match="POSTTRAIN_TEST_KEY"):
        endpoint(srv.url, api_key_env="POSTTRAIN_TEST_KEY")
    monkeypatch.setenv("POSTTRAIN_TEST_KEY", "sk-123")
    endpoint(srv.url, api_key_env="POSTTRAIN_TEST_KEY").chat([ask("hi")])
    assert srv.headers_seen[0]["Authorization"] == "Bearer sk-123"


# --- the cache -----------------------------------------------------------------------------------


def test_a_rerun_is_answered_from_the_cache(server_factory, tmp_path):
    srv = server_factory()
    reqs = [ask("a"), ask("b", n=2), ask("a")]  # the repeated request is asked once
    first = endpoint(srv.url, tmp_path).chat(reqs)
    assert srv.calls == 2 and [r.cached for r in first] == [False] * 3
    again = endpoint(srv.url, tmp_path)  # a new client: loads the file
    second = again.chat(reqs)
    assert srv.calls == 2 and all(r.cached for r in second)
    assert [r.choices for r in second] == [r.choices for r in first]
    assert again.stats == {"requests": 3, "cache_hits": 3, "retries": 0, "errors": 0}
    # Another seed, another request, another model or server: misses.
    again.chat([ask("a", seed=1), ask("a", max_tokens=5)])
    assert srv.calls == 4
    other = ClientConfig(url=srv.url, model="other")
    make_client(other, cache_dir=tmp_path).chat([ask("a")])
    assert srv.calls == 5
    # Fresh samples (no seed, temperature > 0) are never cached; greedy ones are.
    again.chat([ask("a", seed=None)] * 2 + [ask("g", seed=None, temperature=0)] * 2)
    again.chat([ask("a", seed=None), ask("g", seed=None, temperature=0)])
    assert srv.calls == 5 + 3 + 1


def test_a_truncated_last_line_is_ignored_and_the_run_resumes(server_factory, tmp_path):
    srv = server_factory()
    reqs = [ask(c) for c in "abc"]
    endpoint(srv.url, tmp_path, concurrency=1).chat(reqs)
    path = tmp_path / "chat_cache.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # a kill in the middle of the last line
    with pytest.warns(UserWarning, match="truncated last line"):
        client = endpoint(srv.url, tmp_path)
    out = client.chat(reqs)
    assert srv.calls == 3 + 1 and [r.cached for r in out].count(True) == 2
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(x)["key"] for x in lines)  # whole lines only


def test_a_failed_batch_keeps_what_it_received(server_factory, tmp_path):
    srv = server_factory()
    reqs = [ask("a"), ask("b"), ask("bad"), ask("c")]
    with pytest.raises(ModelClientError, match=r"HTTP 400.*2 of 4 request\(s\) answered"):
        endpoint(srv.url, tmp_path, concurrency=1).chat(reqs)
    assert srv.calls == 3  # the batch stops at its first failure
    assert len((tmp_path / "chat_cache.jsonl").read_text().splitlines()) == 2
    out = endpoint(srv.url, tmp_path).chat([ask("a"), ask("b"), ask("c")])
    assert [r.cached for r in out] == [True, True, False] and srv.calls == 4


def test_no_cache_dir_writes_nothing(server_factory, tmp_path, monkeypatch):
    srv = server_factory()
    monkeypatch.chdir(tmp_path)
    client = endpoint(srv.url)
    client.chat([ask("a")])
    client.chat([ask("a")])
    assert srv.calls == 2 and list(tmp_path.iterdir()) == []


# --- the config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"path": "m", "url": "http://h/v1", "model": "x"}, "url"),
        ({}, "path"),
        ({"path": "m", "model": "x"}, "model"),
        ({"path": "m", "api_key_env": "K"}, "api_key_env"),
        ({"path": "m", "concurrency": 8}, "concurrency"),
        ({"path": "m", "timeout_s": 5}, "timeout_s"),
        ({"url": "http://h/v1", "model": "x", "batch_size": 8}, "batch_size"),
        ({"url": "http://h/v1", "model": "x", "dtype": "bfloat16"}, "dtype"),
        ({"url": "http://h/v1"}, "model"),
        ({"url": "h:8000/v1", "model": "x"}, "url"),
        ({"url": "http://h/v1/chat/completions", "model": "x"}, "url"),
        ({"url": "http://h/v1", "model": "x", "temperature": 0.5}, "temperature"),
        ({"url": "http://h/v1", "model": "x", "concurrency": 0}, "concurrency"),
    ],
)
def test_config_errors_name_the_key(raw, key):
    with pytest.raises(ValidationError, match=key):
        ClientConfig.model_validate(raw)


def test_a_resolved_config_validates_again():
    for raw in ({"url": "http://h/v1", "model": "x"}, {"path": "m", "batch_size": 4}):
        cfg = ClientConfig.model_validate(raw)
        assert ClientConfig.model_validate(cfg.model_dump()) == cfg  # defaults spelled out


# --- the local client ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage_dir(small_tokenizer, tmp_path_factory):
    """A stage folder holding model/: a tiny toy model with sharp distributions."""
    from helpers import sharp_toy_model

    from posttrain.models.load import save_model

    stage = tmp_path_factory.mktemp("sft")
    save_model(sharp_toy_model(small_tokenizer, 0.1), small_tokenizer, stage / "model")
    return stage


def test_local_client_matches_run_chat_requests_and_caches(stage_dir, tmp_path):
    from posttrain.generate.requests import run_chat_requests
    from posttrain.models.load import load_model
    from posttrain.models.tokenizer import load_tokenizer

    reqs = [
        ask("What is 12 plus 11?", seed=1, n=2, temperature=1.0, max_tokens=8, logprobs=True),
        ask("The cat sat", seed=1, n=2, temperature=1.0, max_tokens=8, logprobs=True),
        ask("What is 30 plus 23?", seed=None, temperature=0, max_tokens=6),
    ]
    model_dir = stage_dir / "model"
    want = run_chat_requests(load_model(model_dir), load_tokenizer(model_dir), reqs, 32)
    cfg = ClientConfig(path=str(stage_dir), device="cpu")
    client = make_client(cfg, cache_dir=tmp_path)
    got = client.chat(reqs)
    assert [r.choices for r in got] == [r.choices for r in want]
    assert client.name == str(stage_dir) and client.stats["cache_hits"] == 0

    again = make_client(cfg, cache_dir=tmp_path)
    hit = again.chat(reqs)
    assert [r.choices for r in hit] == [r.choices for r in want] and all(r.cached for r in hit)
    assert again._model is None  # answered without loading the model: zero decodes
    # A retrained model (new weights file times) misses.
    weights = next(model_dir.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    retrained = make_client(cfg, cache_dir=tmp_path)
    assert not any(r.cached for r in retrained.chat(reqs[:1]))


def test_local_client_names_a_missing_model_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelClientError, match=str(missing)):
        make_client(ClientConfig(path=str(missing)))
