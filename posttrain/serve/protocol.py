"""The OpenAI API's request bodies, checked, and its response shapes (plain dicts, no fastapi).

A body becomes a `Parsed`: our `ChatRequest`s or `CompletionRequest`s plus what the response
needs (stream, usage chunk, top logprobs). Every problem is an `APIError` naming the parameter,
with the API's error shape. A parameter the API defines but we do not implement is refused
with a 400 naming it, unless its value changes nothing (presence_penalty 0, tools []); one that
never changes the reply (user, metadata) is accepted; an unknown one is refused.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass

MAX_TOP_LOGPROBS = 5


class APIError(Exception):
    """An error the API returns: HTTP status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)  # fmt: skip

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}  # fmt: skip


def invalid(message: str, param: str | None = None, code: str | None = "invalid_value"):
    return APIError(400, message, param, code)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# What each parameter must be: (what the error says, test). null always means "not given".
INT = ("an integer", _is_int)
NUM = ("a number", lambda v: _is_int(v) or isinstance(v, float))
BOOL = ("a boolean", lambda v: isinstance(v, bool))
STR = ("a string", lambda v: isinstance(v, str))
OBJ = ("an object", lambda v: isinstance(v, dict))
LIST = ("an array", lambda v: isinstance(v, list))
STRS = ("a string or an array of strings",
        lambda v: isinstance(v, str) or isinstance(v, list) and all(isinstance(s, str) for s in v))  # fmt: skip
SEED = ("an integer in [-2**63, 2**64)", lambda v: _is_int(v) and -(2**63) <= v < 2**64)

COMMON = {"model": STR, "n": INT, "temperature": NUM, "top_p": NUM, "max_tokens": INT,
          "stop": STRS, "seed": SEED, "stream": BOOL, "stream_options": OBJ}  # fmt: skip
CHAT = COMMON | {"messages": LIST, "max_completion_tokens": INT, "logprobs": BOOL,
                 "top_logprobs": INT}  # fmt: skip
COMPLETIONS = COMMON | {"prompt": STRS, "logprobs": INT}
# Defined by the API, not implemented: accepted only at a value that changes nothing.
UNSUPPORTED = {
    "frequency_penalty": lambda v, b: v == 0,
    "presence_penalty": lambda v, b: v == 0,
    "logit_bias": lambda v, b: v == {},
    "tools": lambda v, b: v == [],
    "functions": lambda v, b: v == [],
    "tool_choice": lambda v, b: v in ("none", "auto"),  # there are no tools to choose
    "function_call": lambda v, b: v in ("none", "auto"),
    "parallel_tool_calls": lambda v, b: True,  # means nothing without tools
    "response_format": lambda v, b: isinstance(v, dict) and v.get("type") == "text",
    "modalities": lambda v, b: v == ["text"],
    "audio": lambda v, b: False,
    "prediction": lambda v, b: False,
    "reasoning_effort": lambda v, b: False,
    "verbosity": lambda v, b: False,
    "web_search_options": lambda v, b: False,
    "echo": lambda v, b: v is False,
    "suffix": lambda v, b: v == "",
    "best_of": lambda v, b: v == (b.get("n") or 1),
}
# Never change the reply: accepted and not used.
IGNORED = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
ROLES = {"system", "developer", "user", "assistant", "tool"}


@dataclass
class Parsed:
    """A body as our requests: one per conversation or prompt, and how to answer."""

    requests: list  # ChatRequest | CompletionRequest
    n: int
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    logprobs: bool
    top_logprobs: int  # alternatives at each position (0: only the chosen token's logprob)
    max_tokens_given: bool  # else max_tokens is the server's default, capped by the context


def _check_keys(body, types: dict) -> dict:
    """The body's parameters with a value (null: not given), each of its type; else APIError."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None)
    given = {}
    for key, value in body.items():
        if value is None:
            continue
        if key in types:
            what, ok = types[key]
            if not ok(value):
                raise invalid(f"{key}: expected {what}, got {value!r}", key, "invalid_type")
            given[key] = value
        elif key in UNSUPPORTED:
            if not UNSUPPORTED[key](value, body):
                raise invalid(f"{key}={value!r} is not supported by this server (posttrain serve "
                              "implements sampling only)", key, "unsupported_parameter")  # fmt: skip
        elif key not in IGNORED:
            raise invalid(f"Unrecognized request argument supplied: {key}", key,
                          "unrecognized_parameter")  # fmt: skip
    return given


def _settings(given: dict, default_max: int, max_key: str = "max_tokens") -> dict:
    stop = given.get("stop")
    max_tokens = given.get(max_key, given.get("max_tokens", default_max))
    stream = given.get("stream", False)
    opts = given.get("stream_options")
    if opts is not None:
        if not stream:
            raise invalid("stream_options: only allowed when stream is true", "stream_options")
        extra = set(opts) - {"include_usage"}
        if extra or not isinstance(opts.get("include_usage", False), bool):
            raise invalid(f"stream_options={opts!r}: only include_usage (a boolean) is "
                          "supported", "stream_options")  # fmt: skip
    return {
        "n": given.get("n", 1),
        "temperature": float(given.get("temperature", 1.0)),
        "top_p": float(given.get("top_p", 1.0)),
        "max_tokens": max_tokens,
        "stop": [stop] if isinstance(stop, str) else stop or None,
        "seed": given.get("seed"),
    }


def _build(cls, first, settings: dict, logprobs: bool, param: str):
    """cls(first, **settings); its ValueError as a 400 naming the parameter."""
    try:
        return cls(first, **settings, logprobs=logprobs)
    except ValueError as e:
        name = re.match(r"[\w\[\].]+", str(e))
        raise invalid(str(e), name.group(0) if name else param) from None


def parse_chat(body, default_max_tokens: int) -> Parsed:
    from posttrain.generate.requests import ChatRequest

    given = _check_keys(body, CHAT)
    for key in ("model", "messages"):
        if key not in given:
            raise invalid(f"you must provide '{key}'", key, "missing_required_parameter")
    both = given.get("max_tokens"), given.get("max_completion_tokens")
    if None not in both and both[0] != both[1]:
        raise invalid("max_tokens and max_completion_tokens differ: give one", "max_tokens")
    settings = _settings(given, default_max_tokens, "max_completion_tokens")
    logprobs, top = given.get("logprobs", False), given.get("top_logprobs")
    if top is not None and not logprobs:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise invalid(f"top_logprobs={top} must be in [0, {MAX_TOP_LOGPROBS}]", "top_logprobs")
    messages = _messages(given["messages"])
    req = _build(ChatRequest, messages, settings, logprobs, "messages")
    given_max = "max_tokens" in given or "max_completion_tokens" in given
    return Parsed([req], req.n, bool(given.get("stream")), _usage_opt(given), logprobs,
                  top or 0, given_max)  # fmt: skip


def parse_completion(body, default_max_tokens: int = 16) -> Parsed:
    from posttrain.generate.requests import CompletionRequest

    given = _check_keys(body, COMPLETIONS)
    for key in ("model", "prompt"):
        if key not in given:
            raise invalid(f"you must provide '{key}'", key, "missing_required_parameter")
    prompts = [given["prompt"]] if isinstance(given["prompt"], str) else given["prompt"]
    if not prompts:
        raise invalid("prompt: must not be an empty array", "prompt")
    logprobs = given.get("logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise invalid(f"logprobs={logprobs} must be in [0, {MAX_TOP_LOGPROBS}]", "logprobs")
    settings = _settings(given, default_max_tokens)
    reqs = [_build(CompletionRequest, p, settings, logprobs is not None, "prompt") for p in prompts]
    return Parsed(reqs, reqs[0].n, bool(given.get("stream")), _usage_opt(given),
                  logprobs is not None, logprobs or 0, "max_tokens" in given)  # fmt: skip


def _usage_opt(given: dict) -> bool:
    return bool((given.get("stream_options") or {}).get("include_usage", False))


def _messages(messages: list) -> list[dict]:
    """The API's messages as {role, content} with string content (text parts joined)."""
    if not messages:
        raise invalid("messages: must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise invalid(f"{where}: expected an object with a role in {sorted(ROLES)}", where)
        for key in ("tool_calls", "function_call", "audio"):
            if m.get(key):
                raise invalid(f"{where}.{key}: not supported by this server", f"{where}.{key}",
                              "unsupported_parameter")  # fmt: skip
        content = m.get("content")
        if isinstance(content, list):
            for k, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else part
                    raise invalid(f"{where}.content[{k}]: only text parts are supported, got "
                                  f"{kind!r}", f"{where}.content")  # fmt: skip
            content = "".join(str(part.get("text", "")) for part in content)
        if not isinstance(content, str):
            raise invalid(f"{where}.content: expected a string or text parts", f"{where}.content")
        role = "system" if m["role"] == "developer" else m["role"]  # the API's newer name
        out.append({"role": role, "content": content})
    return out


# Responses. An Answer (engine.py) per request: replies (text, finish_reason, logprobs) + usage.


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_of(answers) -> dict:
    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    return {k: sum(a.usage[k] for a in answers) for k in keys}


def chat_logprobs(items: list[dict] | None) -> dict | None:
    """Our per-token items as the chat API's logprobs: {"content": [{token, logprob, bytes,
    top_logprobs}]}."""
    if items is None:
        return None
    return {"content": [
        {"token": it["token"], "logprob": it["logprob"], "bytes": list(it["token"].encode()),
         "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                          for t, lp in it["top"]]}
        for it in items
    ]}  # fmt: skip


def completion_logprobs(items: list[dict] | None, top: int, offset: int = 0) -> dict | None:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    if items is None:
        return None
    offsets = []
    for it in items:
        offsets.append(offset)
        offset += len(it["token"])
    return {
        "tokens": [it["token"] for it in items],
        "token_logprobs": [it["logprob"] for it in items],
        "top_logprobs": [dict(it["top"]) for it in items] if top else None,
        "text_offset": offsets,
    }


def chat_response(model: str, answer) -> dict:
    choices = [{"index": j, "message": {"role": "assistant", "content": r.text},
                "logprobs": chat_logprobs(r.logprobs), "finish_reason": r.finish_reason}
               for j, r in enumerate(answer.replies)]  # fmt: skip
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage_of([answer])}  # fmt: skip


def completion_response(model: str, answers, top: int) -> dict:
    choices = [{"index": i * len(a.replies) + j, "text": r.text,
                "logprobs": completion_logprobs(r.logprobs, top), "finish_reason": r.finish_reason}
               for i, a in enumerate(answers) for j, r in enumerate(a.replies)]  # fmt: skip
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage_of(answers)}  # fmt: skip


class Chunks:
    """One job's stream as the API's chunks (`chat.completion.chunk` or `text_completion`):
    for chat a role chunk per choice first; a chunk per piece of text; a last chunk per choice
    with its finish_reason; then (include_usage) one with the usage and no choices, every
    chunk before it carrying "usage": null. Completions number choices i * n + j (prompt i,
    reply j)."""

    def __init__(self, model: str, parsed: Parsed, chat: bool):
        self.model, self.parsed, self.chat = model, parsed, chat
        self.id, self.created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        self.offsets: dict[int, int] = {}  # completions: text offset of each choice's logprobs

    def _chunk(self, choices: list, usage=None) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
               "choices": choices}  # fmt: skip
        return out | ({"usage": usage} if self.parsed.include_usage else {})

    def _choice(self, i: int, j: int, text: str | None, items, finish: str | None) -> dict:
        if self.chat:
            delta = {} if text is None else {"content": text}
            return {"index": j, "delta": delta, "logprobs": chat_logprobs(items),
                    "finish_reason": finish}  # fmt: skip
        index = i * self.parsed.n + j
        offset = self.offsets.get(index, 0)
        logprobs = completion_logprobs(items, self.parsed.top_logprobs, offset)
        if logprobs is not None:
            self.offsets[index] = offset + sum(len(t) for t in logprobs["tokens"])
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}

    def start(self) -> list[dict]:
        if not self.chat:
            return []
        return [self._chunk([{"index": j, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
                for j in range(self.parsed.n)]  # fmt: skip

    def text(self, i: int, j: int, delta: str, items) -> dict:
        return self._chunk([self._choice(i, j, delta, items, None)])

    def end(self, answers) -> list[dict]:
        out = [self._chunk([self._choice(i, j, None, None, r.finish_reason)])
               for i, a in enumerate(answers) for j, r in enumerate(a.replies)]  # fmt: skip
        return out + ([self._chunk([], usage_of(answers))] if self.parsed.include_usage else [])
