"""One client for every place a model is called from outside a stage: a judge, self-instruct,
answer generation. The model is either local (a Hugging Face directory, decoded in-process by
`run_chat_requests`) or behind an OpenAI-compatible server (vLLM, SGLang, llama.cpp,
`posttrain serve`), and both answer the same `ChatRequest`s with the same `ChatResponse`s.

    cfg = ClientConfig.model_validate({"url": "http://127.0.0.1:8000/v1", "model": "teacher"})
    client = make_client(cfg, cache_dir=Path("runs/x/cache"))  # None: no cache
    replies = client.chat([ChatRequest(messages=[...], n=2, temperature=0.7, seed=3)])
    client.name, client.stats  # a label for lineage; requests, cache_hits, retries, errors

Replies are cached in `cache_dir/chat_cache.jsonl` (append-only, one line per answered request)
under sha256(backend identity, request.key()), so a rerun of a killed or finished batch pays
only for what is missing. A request with no seed at a temperature above 0 asks for fresh
samples and is never cached.
"""

from __future__ import annotations

import copy
import hashlib
import http.client
import json
import os
import random
import threading
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from posttrain.generate.requests import ChatRequest, ChatResponse, Choice, CompletionRequest
from posttrain.settings import SettingError, StrictModel, is_set

URL_ONLY = ("model", "api_key_env", "concurrency", "max_retries", "backoff_s", "timeout_s")
PATH_ONLY = ("device", "dtype", "batch_size")
CACHE_FILE = "chat_cache.jsonl"


class ClientConfig(StrictModel):
    path: str | None = Field(
        None, description="A local model: a HF model directory, or a stage folder with model/."
    )
    url: str | None = Field(
        None,
        description="Base URL of an OpenAI-compatible API, ending in /v1 (vLLM, SGLang, "
        "llama.cpp, posttrain serve).",
    )
    model: str | None = Field(None, description="The served model's name (url only; required).")
    api_key_env: str | None = Field(
        None, description="Environment variable holding the API key (url only; null: no key)."
    )
    concurrency: int = Field(4, ge=1, le=256, description="HTTP requests in flight (url only).")
    max_retries: int = Field(
        3,
        ge=0,
        description="Retries of a request after a connection error, timeout, HTTP 429/5xx or "
        "malformed reply (url only).",
    )
    backoff_s: float = Field(
        0.5, ge=0, description="Seconds before the first retry; doubling, with jitter (url only)."
    )
    timeout_s: float = Field(
        60.0, gt=0, description="Seconds one HTTP request may wait on the server (url only)."
    )
    device: str = Field("auto", description="Local model's device: auto, cpu, cuda, cuda:1.")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Local model's weights dtype."
    )
    batch_size: int = Field(32, ge=1, description="Sequences the local model decodes together.")

    @model_validator(mode="after")
    def _no_silent_settings(self) -> ClientConfig:
        if self.path is not None and self.url is not None:
            raise SettingError("url", "{at}path is given too: a client calls one model, "
                               "local (path) or served (url); drop one")  # fmt: skip
        if self.path is None and self.url is None:
            raise SettingError("path", "give {at}path (a local model directory) or {at}url "
                               "(an OpenAI-compatible server's base URL, ending in /v1)")  # fmt: skip
        if self.url is not None:
            if not self.url.startswith(("http://", "https://")):
                raise SettingError("url", f"{self.url!r} is not an http(s) URL")
            if self.url.rstrip("/").endswith("/chat/completions"):
                raise SettingError("url", "give the API's base URL (ending in /v1), not the "
                                   "chat/completions endpoint")  # fmt: skip
            if not self.model:
                raise SettingError("model", "required with {at}url: the served model's name "
                                   "(GET <url>/models lists them)")  # fmt: skip
        unused = PATH_ONLY if self.url is not None else URL_ONLY
        for key in unused:
            if is_set(self, key):
                mode = "{at}url (a served model)" if self.url else "{at}path (a local model)"
                raise SettingError(key, f"has no effect with {mode}: drop it")
        return self


class ModelClientError(RuntimeError):
    """A model call that failed for good: the message names the model, the cause and, for a
    server, the URL and the number of attempts."""


class _Transient(Exception):
    """A failure worth retrying; `retry_after` is the server's Retry-After, if it sent one."""

    def __init__(self, cause: str, retry_after: float | None = None):
        super().__init__(cause)
        self.retry_after = retry_after


class _Fatal(Exception):
    """A failure that a retry would repeat (a 4xx other than 429, a wrong number of choices)."""


def _head(raw: bytes | str, limit: int = 200) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


class ReplyCache:
    """Answered requests by key, loaded from and appended to one JSONL file (None: memory only,
    nothing kept). Each line is written with one write(2) in O_APPEND mode: whole or absent."""

    def __init__(self, folder: Path | None):
        self.path = Path(folder) / CACHE_FILE if folder is not None else None
        self.replies: dict[str, dict] = {}
        self._lock = threading.Lock()
        if self.path is not None and self.path.is_file():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline; else a line a kill cut short
        bad = []
        for n, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
                self.replies[rec["key"]] = rec["response"]
            except (ValueError, KeyError, TypeError):
                if line.strip():
                    bad.append(n)
        if tail:
            # Cut the partial line away, so the next append starts a line of its own (unless
            # another process appended meanwhile: then it stays, one unreadable line).
            with open(self.path, "r+b") as f:
                if os.fstat(f.fileno()).st_size == len(data):
                    f.truncate(len(data) - len(tail))
            warnings.warn(f"{self.path}: ignored a truncated last line (a killed run's partial "
                          "write); its request will be asked again", stacklevel=3)  # fmt: skip
        if bad:
            warnings.warn(f"{self.path}: ignored unreadable line(s) {bad[:5]}", stacklevel=3)

    def get(self, key: str) -> ChatResponse | None:
        rec = self.replies.get(key)
        if rec is None:
            return None
        choices = [Choice(**c) for c in rec["choices"]]
        return ChatResponse(choices, dict(rec.get("usage") or {}), cached=True)

    def put(self, key: str, response: ChatResponse, label: str) -> None:
        rec = {"choices": [asdict(c) for c in response.choices], "usage": response.usage}
        line = (json.dumps({"key": key, "model": label, "response": rec}) + "\n").encode()
        with self._lock:
            self.replies[key] = rec
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)


class ModelClient:
    """Answers chat requests, from the cache where it can; subclasses supply `_answer`."""

    name: str

    def __init__(self, identity: dict, cache_dir: Path | None):
        self._identity = json.dumps(identity, sort_keys=True)
        self._cache = ReplyCache(cache_dir) if cache_dir is not None else None
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0, "errors": 0}

    def _count(self, key: str, k: int = 1) -> None:
        with self._lock:
            self.stats[key] += k

    def _key(self, req: ChatRequest) -> str | None:
        """The cache key; None for a request that asks for fresh samples (no seed, sampled)."""
        if self._cache is None or (req.seed is None and req.temperature > 0):
            return None
        blob = json.dumps([self._identity, req.key()], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def complete(self, requests: list[CompletionRequest]) -> list[ChatResponse]:
        """Raw-text continuations (no chat template; the API's /completions), as `chat`."""
        requests = list(requests)
        if not all(isinstance(r, CompletionRequest) for r in requests):
            raise TypeError("complete() takes CompletionRequests; chat() takes ChatRequests")
        return self._run(requests)

    def chat(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        """One response per request, in order. If any request fails for good, ModelClientError;
        the replies received before it stay cached, so a rerun resumes."""
        requests = list(requests)
        if not all(isinstance(r, ChatRequest) for r in requests):
            raise TypeError("chat() takes ChatRequests; complete() takes CompletionRequests")
        return self._run(requests)

    def _run(self, requests: list) -> list[ChatResponse]:
        self._count("requests", len(requests))
        out: list[ChatResponse | None] = [None] * len(requests)
        todo: dict[str | int, list[int]] = {}  # key (or position, if uncached) -> positions
        for i, req in enumerate(requests):
            key = self._key(req)
            hit = self._cache.get(key) if key is not None else None
            if hit is not None:
                out[i] = hit
                self._count("cache_hits")
            else:
                todo.setdefault(key if key is not None else i, []).append(i)
        slots = list(todo.items())  # identical cacheable requests are asked once

        def on_reply(j: int, response: ChatResponse) -> None:
            key, positions = slots[j]
            if isinstance(key, str):
                self._cache.put(key, response, self.name)
            for i in positions:
                out[i] = copy.deepcopy(response)

        if slots:
            self._answer([requests[positions[0]] for _, positions in slots], on_reply)
        return out

    def _answer(self, requests: list[ChatRequest], on_reply) -> None:
        """Call on_reply(j, response) for each request j; raise ModelClientError on failure."""
        raise NotImplementedError


def _dir_identity(path: Path) -> list:
    """Every file of a model directory with its size and mtime: a retrained model differs."""
    files = sorted(p for p in path.iterdir() if p.is_file())
    ident = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    adapter = path / "adapter_config.json"
    if adapter.is_file():  # a LoRA adapter: its base model is part of what answers
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if base and Path(base).is_dir():
            ident.append([str(Path(base).resolve()), _dir_identity(Path(base))])
    return ident


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or a stage folder holding one in model/; else ModelClientError."""
    from posttrain.models.load import check_model_dir

    path = Path(path)
    is_model = (path / "config.json").is_file() or (path / "adapter_config.json").is_file()
    if not is_model and (path / "model").is_dir():
        path = path / "model"
    try:
        return check_model_dir(path).resolve()
    except FileNotFoundError as e:
        raise ModelClientError(f"model client: {e}") from None


class LocalClient(ModelClient):
    """A local model, loaded on first use and answered in-process by `run_chat_requests`."""

    def __init__(self, cfg: ClientConfig, cache_dir: Path | None = None):
        self.cfg, self.name = cfg, cfg.path
        self.model_dir = resolve_model_dir(cfg.path)
        identity = {"path": str(self.model_dir), "files": _dir_identity(self.model_dir)}
        super().__init__(identity | {"dtype": cfg.dtype}, cache_dir)
        self._model = self._tokenizer = None

    def _load(self):
        import torch

        from posttrain.models.load import load_model, resolve_device
        from posttrain.models.tokenizer import load_tokenizer

        if self._model is None:
            device = resolve_device(self.cfg.device)
            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.cfg.dtype]
            self._tokenizer = load_tokenizer(self.model_dir)
            self._model = load_model(self.model_dir, device, dtype).eval()
        return self._model, self._tokenizer

    def _answer(self, requests, on_reply) -> None:
        from posttrain.generate.requests import run_requests

        try:
            model, tok = self._load()
            responses = run_requests(model, tok, requests, self.cfg.batch_size)
        except Exception as e:
            self._count("errors", len(requests))
            raise ModelClientError(
                f"local model {self.model_dir}: {len(requests)} request(s) failed: "
                f"{type(e).__name__}: {e}"
            ) from e
        for j, response in enumerate(responses):
            on_reply(j, response)


class EndpointClient(ModelClient):
    """An OpenAI-compatible server: POST {url}/chat/completions, `concurrency` at a time."""

    def __init__(self, cfg: ClientConfig, cache_dir: Path | None = None):
        self.cfg, self.name = cfg, cfg.model
        self.url = cfg.url.rstrip("/")
        self.endpoint = self.url + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        if cfg.api_key_env is not None:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ModelClientError(
                    f"api_key_env: the environment variable {cfg.api_key_env} is not set (or "
                    f"empty); export the API key for {self.url} there"
                )
            self.headers["Authorization"] = f"Bearer {key}"
        super().__init__({"url": self.url, "model": cfg.model}, cache_dir)

    def _endpoint(self, req) -> str:
        return self.endpoint if isinstance(req, ChatRequest) else self.url + "/completions"

    def _body(self, req: ChatRequest | CompletionRequest) -> dict:
        if isinstance(req, ChatRequest):
            body = {"model": self.cfg.model, "messages": [dict(m) for m in req.messages]}
        else:
            body = {"model": self.cfg.model, "prompt": req.prompt}
        body |= {
            "n": req.n,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "max_tokens": req.max_tokens,
        }
        if req.stop:
            body["stop"] = list(req.stop)
        if req.seed is not None:
            body["seed"] = req.seed
        if req.logprobs:  # chat: a flag; completions: how many top tokens besides the chosen one
            body["logprobs"] = True if isinstance(req, ChatRequest) else 0
        return body

    def _describe(self, e: BaseException | str) -> str:
        if isinstance(e, str):
            return e
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, http.client.RemoteDisconnected):
            return "connection closed without a reply"
        if isinstance(e, ConnectionResetError):
            return "connection reset"
        if isinstance(e, TimeoutError):
            return f"timed out after {self.cfg.timeout_s} s"
        return f"{type(e).__name__}: {e}"

    def _post(self, req: ChatRequest) -> ChatResponse:
        """One attempt; _Transient or _Fatal on failure."""
        data = json.dumps(self._body(req)).encode()
        http_req = urllib.request.Request(self._endpoint(req), data, self.headers, method="POST")
        try:
            with urllib.request.urlopen(http_req, timeout=self.cfg.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            try:
                body = e.read()
            except (OSError, http.client.HTTPException):
                body = b""
            if e.code == 429 or e.code >= 500:
                wait = e.headers.get("Retry-After", "") if e.headers else ""
                after = float(wait) if wait.replace(".", "", 1).isdigit() else None
                raise _Transient(f"HTTP {e.code}: {_head(body)}", after) from None
            raise _Fatal(f"HTTP {e.code}: {_api_message(body)}") from None
        except urllib.error.URLError as e:
            raise _Transient(self._describe(e.reason)) from None
        except (OSError, http.client.HTTPException) as e:
            raise _Transient(self._describe(e)) from None
        try:
            reply = json.loads(raw)
        except ValueError:
            raise _Transient(f"malformed JSON: {_head(raw)}") from None
        if not isinstance(reply, dict) or not isinstance(reply.get("choices"), list):
            raise _Transient(f"a reply without 'choices': {_head(raw)}")
        return self._parse(reply, req, raw)

    def _parse(self, reply: dict, req: ChatRequest, raw: bytes) -> ChatResponse:
        choices = reply["choices"]
        if len(choices) != req.n:
            raise _Fatal(f"asked for n={req.n} choices, got {len(choices)} (a server that "
                         "ignores n? ask n=1 with distinct seeds)")  # fmt: skip
        try:
            choices = sorted(choices, key=lambda c: c.get("index", 0))
            out = []
            for c in choices:
                chat = isinstance(req, ChatRequest)
                text = ((c.get("message") or {}).get("content") if chat else c["text"]) or ""
                reason = c.get("finish_reason") or "stop"
                if not req.logprobs:
                    out.append(Choice(text, reason))
                    continue
                lp = c.get("logprobs") or {}
                if chat:
                    tokens = [t["token"] for t in lp.get("content") or []]
                    logps = [float(t["logprob"]) for t in lp.get("content") or []]
                else:
                    tokens, logps = list(lp["tokens"]), [float(x) for x in lp["token_logprobs"]]
                out.append(Choice(text, reason, tokens, logps))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise _Transient(f"malformed choices: {_head(raw)}") from None
        return ChatResponse(out, dict(reply.get("usage") or {}))

    def _ask(self, req: ChatRequest, abort: threading.Event) -> ChatResponse:
        """One request with retries; ModelClientError once they are spent (or the batch failed)."""
        where = f"{self._endpoint(req)} (model {self.cfg.model})"
        attempts = self.cfg.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return self._post(req)
            except _Fatal as e:
                raise ModelClientError(f"{where}: {e} (not retried)") from None
            except _Transient as e:
                if attempt == attempts:
                    raise ModelClientError(
                        f"{where}: failed after {attempts} attempt(s); last: {e}"
                    ) from None
                wait = self.cfg.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
                if e.retry_after is not None:
                    wait = max(wait, min(e.retry_after, 60.0))
                if abort.wait(wait):  # another request failed for good: stop retrying
                    raise ModelClientError(f"{where}: abandoned after {attempt} attempt(s) "
                                           f"(the batch failed); last: {e}") from None  # fmt: skip
                self._count("retries")
        raise AssertionError("unreachable")

    def _answer(self, requests, on_reply) -> None:
        abort = threading.Event()
        failures: list[ModelClientError] = []
        done: list[int] = []

        def work(j: int) -> None:
            if abort.is_set():
                return
            try:
                response = self._ask(requests[j], abort)
            except ModelClientError as e:
                self._count("errors")
                failures.append(e)
                abort.set()
                return
            on_reply(j, response)
            done.append(j)

        with ThreadPoolExecutor(min(self.cfg.concurrency, len(requests))) as pool:
            list(pool.map(work, range(len(requests))))
        if failures:
            kept = " and cached" if self._cache is not None else ""
            raise ModelClientError(
                f"{failures[0]} [{len(done)} of {len(requests)} request(s) answered{kept}; "
                f"{len(failures)} failed]"
            )


def _api_message(body: bytes) -> str:
    """The API's error message ({"error": {"message": ...}}), else the body's head."""
    try:
        err = json.loads(body).get("error")
        msg = err.get("message") if isinstance(err, dict) else err
        if isinstance(msg, str) and msg:
            return _head(msg, 500)
    except (ValueError, AttributeError):
        pass
    return _head(body) or "(empty body)"


def make_client(cfg: ClientConfig, cache_dir: Path | None = None) -> ModelClient:
    """A client for cfg's model: LocalClient for a path, EndpointClient for a url."""
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    return EndpointClient(cfg, cache_dir) if cfg.url is not None else LocalClient(cfg, cache_dir)
