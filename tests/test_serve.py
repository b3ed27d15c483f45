"""`posttrain serve`, through the official `openai` client against a live server (uvicorn in a
thread, loopback port, a tiny model saved to disk): replies equal `run_requests` on the same
model in-process, streaming concatenates to the non-streamed reply, logprobs agree with a
forward pass, concurrent requests decode in one batch, every bad request gets the API's error
shape with the right status and the server goes on serving; the CLI's bad-path exit."""

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from posttrain.generate import SamplingParams, generate  # noqa: E402
from posttrain.generate.requests import (  # noqa: E402
    ChatRequest,
    CompletionRequest,
    render_chat,
    run_requests,
)

NAME = "tiny"
HI = [{"role": "user", "content": "Q: What is 12 plus 23?"}]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(small_tokenizer, tmp_path_factory):
    from helpers import sharp_toy_model

    from posttrain.models.load import save_model

    return save_model(sharp_toy_model(small_tokenizer, 0.1), small_tokenizer,
                      tmp_path_factory.mktemp("serve") / "sft" / "model")  # fmt: skip


@pytest.fixture(scope="module")
def local(model_dir):
    """The same model loaded in-process: (model, tokenizer)."""
    from posttrain.models.load import load_model
    from posttrain.models.tokenizer import load_tokenizer

    return load_model(model_dir).eval(), load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    """The app on a free loopback port (uvicorn in a thread); yields its base URL."""
    import uvicorn

    from posttrain.annotate.testing import free_port
    from posttrain.models.load import load_model
    from posttrain.models.tokenizer import load_tokenizer
    from posttrain.serve.app import create_app
    from posttrain.serve.engine import Engine

    engine = Engine(load_model(model_dir), load_tokenizer(model_dir), max_batch=16,
                    batch_wait_ms=20)  # fmt: skip
    port = free_port()
    config = uvicorn.Config(create_app(engine, NAME, default_max_tokens=16), host="127.0.0.1",
                            port=port, log_level="warning")  # fmt: skip
    srv = uvicorn.Server(config)
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=5)
            break
        except OSError:
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.05)
    yield url
    srv.should_exit = True
    t.join(10)
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0)


def chat(client, messages=HI, **kw):
    kw = {"max_tokens": 12, "seed": 1, **kw}
    return client.chat.completions.create(model=NAME, messages=messages, **kw)


def streamed(client, kind: str, **kw) -> tuple[dict[int, str], dict[int, str], list, dict]:
    """A streamed request: (text per choice, finish_reason per choice, chunks, usage)."""
    create = client.chat.completions.create if kind == "chat" else client.completions.create
    texts, reasons, chunks, usage = {}, {}, [], None
    for chunk in create(model=NAME, stream=True, stream_options={"include_usage": True}, **kw):
        chunks.append(chunk)
        usage = chunk.usage or usage
        for c in chunk.choices:
            piece = c.delta.content if kind == "chat" else c.text
            texts[c.index] = texts.get(c.index, "") + (piece or "")
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons, chunks, usage


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_chat_reply_is_run_requests_in_process(client, local):
    model, tok = local
    got = chat(client, n=2, temperature=0.9, top_p=0.95, seed=7)
    ref = run_requests(model, tok, [ChatRequest(HI, n=2, temperature=0.9, top_p=0.95,
                                                max_tokens=12, seed=7)])[0]  # fmt: skip
    assert [c.message.content for c in got.choices] == [c.text for c in ref.choices]
    assert [c.finish_reason for c in got.choices] == [c.finish_reason for c in ref.choices]
    assert got.usage.model_dump(include=set(ref.usage)) == ref.usage
    assert got.choices[0].message.role == "assistant" and got.model == NAME
    assert got.choices[0].message.content  # the toy model says something


def test_chat_stream_concatenates_to_the_non_streamed_reply(client):
    whole = chat(client, n=2, max_tokens=20, seed=3)
    texts, reasons, chunks, usage = streamed(client, "chat", messages=HI, n=2, max_tokens=20,
                                             seed=3)  # fmt: skip
    assert texts == {j: c.message.content for j, c in enumerate(whole.choices)}
    assert reasons == {j: c.finish_reason for j, c in enumerate(whole.choices)}
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2  # pieces
    assert usage == whole.usage


def test_completions_stream_and_not_are_run_requests_on_raw_prompts(client, local):
    model, tok = local
    prompts = ["The cat sat on", "Q: What is 40 plus"]
    got = client.completions.create(model=NAME, prompt=prompts, n=2, max_tokens=10, seed=4)
    reqs = [CompletionRequest(p, n=2, max_tokens=10, seed=4) for p in prompts]
    ref = run_requests(model, tok, reqs)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]  # prompt i, reply j: i * n + j
    assert [c.text for c in got.choices] == [c.text for r in ref for c in r.choices]
    assert got.usage.prompt_tokens == sum(r.usage["prompt_tokens"] for r in ref)
    texts, reasons, chunks, usage = streamed(client, "completions", prompt=prompts, n=2,
                                             max_tokens=10, seed=4)  # fmt: skip
    assert texts == {c.index: c.text for c in got.choices}
    assert reasons == {c.index: c.finish_reason for c in got.choices}
    assert len(chunks) > 6 and usage == got.usage
    one = client.completions.create(model=NAME, prompt="The cat", seed=4)  # the API's default: 16
    ref = run_requests(model, tok, [CompletionRequest("The cat", max_tokens=16, seed=4)])[0]
    assert (one.choices[0].text, one.usage.completion_tokens) == (
        ref.choices[0].text, ref.usage["completion_tokens"])  # fmt: skip


def test_n_and_seeds(client):
    three = chat(client, n=3, temperature=1.0, seed=11)
    assert len(three.choices) == 3 and [c.index for c in three.choices] == [0, 1, 2]
    assert len({c.message.content for c in three.choices}) > 1  # side by side, not copies
    again = chat(client, n=3, temperature=1.0, seed=11)
    assert [c.message.content for c in again.choices] == [c.message.content for c in three.choices]
    other = chat(client, n=3, temperature=1.0, seed=12)
    assert [c.message.content for c in other.choices] != [c.message.content for c in three.choices]


def test_stop_string_cuts_the_reply_and_max_tokens_gives_length(client):
    free = chat(client, max_tokens=20, seed=5).choices[0]
    assert free.finish_reason == "length"
    stop = free.message.content[8:10]
    cut = chat(client, max_tokens=20, seed=5, stop=[stop, "never-there"]).choices[0]
    assert cut.message.content == free.message.content[: free.message.content.find(stop)]
    assert cut.finish_reason == "stop"
    texts, reasons, _, _ = streamed(client, "chat", messages=HI, max_tokens=20, seed=5, stop=stop)
    assert (texts[0], reasons[0]) == (cut.message.content, "stop")
    for kw in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        short = client.chat.completions.create(model=NAME, messages=HI, seed=1, **kw)
        assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def _forward_logps(model, prompt: list[int], reply: list[int]) -> torch.Tensor:
    """(R, V) log p(. | prompt + reply[:t]) at temperature 1, by one uncached forward."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + reply])).logits[0].float()
    return torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]


def test_logprobs_and_top_logprobs_agree_with_a_forward_pass(client, local):
    model, tok = local
    got = chat(client, max_tokens=10, seed=9, logprobs=True, top_logprobs=3)
    prompt = render_chat(tok, HI)
    gen = generate(model, tok, [prompt], SamplingParams(max_new_tokens=10, seed=9))[0]
    logps = _forward_logps(model, prompt, gen.token_ids)
    items = got.choices[0].logprobs.content
    assert "".join(it.token for it in items) == got.choices[0].message.content
    assert len(items) == len(gen.token_ids) == 10
    for t, (it, tid) in enumerate(zip(items, gen.token_ids, strict=True)):
        assert it.logprob == pytest.approx(gen.logprobs[t], abs=1e-6)  # the decoder's number
        assert it.logprob == pytest.approx(float(logps[t, tid]), abs=1e-4)  # a forward pass's
        top = logps[t].topk(3)
        assert [a.token for a in it.top_logprobs] == [tok.decode([i]) for i in top.indices]
        assert [a.logprob for a in it.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    # Streamed: the same items, chunk by chunk.
    stream = client.chat.completions.create(model=NAME, messages=HI, max_tokens=10, seed=9,
                                            logprobs=True, top_logprobs=3, stream=True)  # fmt: skip
    items_s = [it for ch in stream for c in ch.choices if c.logprobs for it in c.logprobs.content]
    assert [it.model_dump() for it in items_s] == [it.model_dump() for it in items]
    # Completions: an integer of alternatives, the legacy shape.
    comp = client.completions.create(model=NAME, prompt="The cat sat", max_tokens=6, seed=2,
                                     logprobs=2).choices[0].logprobs  # fmt: skip
    ids = tok("The cat sat", add_special_tokens=False)["input_ids"]
    gen = generate(model, tok, [ids], SamplingParams(max_new_tokens=6, seed=2))[0]
    logps = _forward_logps(model, ids, gen.token_ids)
    assert comp.token_logprobs == pytest.approx(gen.logprobs, abs=1e-6)
    for t, alts in enumerate(comp.top_logprobs):
        assert len(alts) == 2 and max(alts.values()) == pytest.approx(
            float(logps[t].max()), abs=1e-4
        )
    assert comp.text_offset[0] == 0 and comp.text_offset[1] == len(comp.tokens[0])


def test_concurrent_requests_are_answered_in_one_batch(client, server, local):
    model, tok = local
    questions = [f"Q: What is {a} plus 11?" for a in range(10, 18)]
    before = get(f"{server}/v1/stats")[1]["batches"]
    out: dict[int, str] = {}

    def ask(i: int) -> None:
        msgs = [{"role": "user", "content": questions[i]}]
        r = chat(client, msgs, temperature=0, max_tokens=24)
        out[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    alone = [run_requests(model, tok, [ChatRequest([{"role": "user", "content": q}],
                                                   temperature=0, max_tokens=24)])[0]
             for q in questions]  # fmt: skip
    assert [out.get(i) for i in range(8)] == [r.choices[0].text for r in alone]
    stats = get(f"{server}/v1/stats")[1]
    mine = stats["recent_batches"][-(stats["batches"] - before) :]
    assert sum(b["requests"] for b in mine) == 8
    assert max(b["requests"] for b in mine) > 1  # requests that arrived together decoded together


LONG = [{"role": "user", "content": "The cat sat on mat number 41. " * 40}]
BAD_CHAT = [  # (keyword arguments, error class, parameter named in the message)
    ({"temperature": 3}, openai.BadRequestError, "temperature"),
    ({"n": 0}, openai.BadRequestError, "n"),
    ({"temperature": "hot"}, openai.BadRequestError, "temperature"),
    ({"max_tokens": 0}, openai.BadRequestError, "max_tokens"),
    ({"seed": 2**64}, openai.BadRequestError, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "stop"),
    ({"logprobs": True, "top_logprobs": 9}, openai.BadRequestError, "top_logprobs"),
    ({"presence_penalty": 0.5}, openai.BadRequestError, "presence_penalty"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, openai.BadRequestError,
     "tools"),
    ({"response_format": {"type": "json_object"}}, openai.BadRequestError, "response_format"),
    ({"extra_body": {"frobnicate": 1}}, openai.BadRequestError, "frobnicate"),
    ({"stream_options": {"include_usage": True}}, openai.BadRequestError, "stream_options"),
    ({"messages": []}, openai.BadRequestError, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     openai.BadRequestError, "messages[0].content"),
    ({"messages": LONG, "max_tokens": 20}, openai.BadRequestError, "context length"),
    ({"messages": LONG, "stream": True}, openai.BadRequestError, "context length"),
    ({"model": "no-such-model"}, openai.NotFoundError, "no-such-model"),
]  # fmt: skip


@pytest.mark.parametrize("kw,error,param", BAD_CHAT, ids=[p for _, _, p in BAD_CHAT])
def test_bad_chat_requests_get_the_api_error_and_the_server_goes_on(client, kw, error, param):
    kw = {"model": NAME, "messages": HI, "max_tokens": 4} | kw
    with pytest.raises(error) as e:
        client.chat.completions.create(**kw)
    assert param in e.value.body["message"]
    assert set(e.value.body) == {"message", "type", "param", "code"}
    assert chat(client, max_tokens=2).choices[0].finish_reason == "length"


@pytest.mark.parametrize("kw,param", [({"logprobs": 9}, "logprobs"), ({"echo": True}, "echo"),
                                      ({"prompt": []}, "prompt"), ({"prompt": [1, 2]}, "prompt"),
                                      ({"best_of": 3}, "best_of")])  # fmt: skip
def test_bad_completion_requests_get_a_400_naming_the_parameter(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**({"model": NAME, "prompt": "The cat"} | kw))
    assert param in e.value.body["message"] and e.value.body["param"] == param


def test_unknown_routes_and_malformed_bodies_get_the_error_shape(server):
    status, body = get(f"{server}/v1/nothing")
    assert status == 404 and body["error"]["code"] == "not_found"
    for raw in (b"{not json", b"[1, 2]"):
        req = urllib.request.Request(f"{server}/v1/chat/completions", data=raw,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 400
        assert json.loads(e.value.read())["error"]["type"] == "invalid_request_error"


def test_a_decoding_failure_is_a_500_and_the_next_request_is_served(client, monkeypatch):
    from posttrain.generate import requests as R

    def boom(*a, **kw):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(R, "run_requests", boom)
    with pytest.raises(openai.InternalServerError) as e:
        chat(client)
    assert "out of memory" in e.value.body["message"]
    with pytest.raises(openai.APIError, match="out of memory"):  # after the stream began
        list(client.chat.completions.create(model=NAME, messages=HI, max_tokens=4, stream=True))
    monkeypatch.undo()
    assert chat(client, max_tokens=2).choices[0].finish_reason == "length"


def test_cli_serves_a_stage_folder_and_stops_cleanly_on_ctrl_c(model_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from posttrain.annotate.testing import free_port

    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "serve",
                                 str(model_dir.parent), "--port", str(port), "--device", "cpu"],
                                stdout=out, stderr=out, env=os.environ | {"PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while (status := _status(f"http://127.0.0.1:{port}/v1/models")) is None:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert status[1]["data"][0]["id"] == "sft"  # the folder's name
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    text = log.read_text()
    assert f"http://127.0.0.1:{port}/v1" in text and "stopped" in text and "Traceback" not in text


def _status(url: str):
    try:
        return get(url)
    except OSError:
        return None


def test_cli_bad_model_dir_exits_2_naming_the_path(tmp_path, capsys, model_dir):
    from posttrain.cli import main
    from posttrain.serve.cli import resolve_model_dir

    for bad in (tmp_path / "missing", tmp_path):  # absent; a folder with no config.json
        assert main(["serve", str(bad), "--port", "1"]) == 2
        assert str(bad) in capsys.readouterr().err
    assert resolve_model_dir(model_dir.parent) == model_dir  # a stage folder holding model/
    assert resolve_model_dir(model_dir) == model_dir
