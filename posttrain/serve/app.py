"""The HTTP side of `posttrain serve`: the OpenAI API's routes over an Engine (FastAPI).

    GET  /v1/models                   the one served model
    POST /v1/chat/completions         chat (the model's chat template), streaming or not
    POST /v1/completions              raw prompts (no template), streaming or not
    GET  /v1/stats                    counters, and how many requests each decode batch held
    GET  /health

Handlers parse and check the body (protocol.py), submit a Job and await its events: the model
and the tokenizer are the engine thread's alone, and the event loop never waits on them. Every
error is the API's error shape: {"error": {"message", "type", "param", "code"}}.
"""

import asyncio
import json
import logging

from posttrain.serve.engine import Engine, Job
from posttrain.serve.protocol import (
    APIError,
    Chunks,
    Parsed,
    chat_response,
    completion_response,
    invalid,
    parse_chat,
    parse_completion,
)

log = logging.getLogger("posttrain.serve")


def create_app(engine: Engine, name: str, default_max_tokens: int = 256):
    """The app serving `engine`'s model as `name`. default_max_tokens: a chat request's
    max_tokens when it gives none, capped so prompt + reply fit the model's context (a
    completion's default is the API's, 16)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="posttrain serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def body_error(request: Request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return await api_error(request, invalid(f"{param}: {first.get('msg')}", param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = f"{request.method} {request.url.path}: {e.detail}"
        code = "not_found" if e.status_code == 404 else None
        return await api_error(request, APIError(e.status_code, message, None, code))

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception):
        log.exception("unhandled error")
        err = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
        return await api_error(request, err)

    def card() -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "posttrain"}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(model_id, name)
        return card()

    @app.get("/v1/stats")
    async def stats():
        return {"model": name, **engine.stats()}

    async def answer(request: Request, parse, chat: bool):
        body = await _json(request)
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            _check_model(body["model"], name)
        parsed = parse(body)
        queue = _submit(engine, parsed)
        if not parsed.stream:
            answers = await _until(queue, "done")
            if chat:
                return chat_response(name, answers[0])
            return completion_response(name, answers, parsed.top_logprobs)
        await _until(queue, "accepted")  # a 400 (context length, template) before streaming
        chunks = Chunks(name, parsed, chat)
        return StreamingResponse(_sse(queue, chunks), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, lambda b: parse_chat(b, default_max_tokens), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, parse_completion, chat=False)

    return app


def _check_model(model: str, name: str) -> None:
    if model != name:
        raise APIError(404, f"The model `{model}` does not exist: this server serves `{name}`",
                       "model", "model_not_found")  # fmt: skip


async def _json(request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}", None, "invalid_json") from None


def _submit(engine: Engine, parsed: Parsed) -> asyncio.Queue:
    """Submit the job; its events arrive in the returned queue, on this loop."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def send(event: tuple) -> None:  # from the engine thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the loop has closed (the server stopped): nobody is waiting
            pass

    engine.submit(Job(parsed.requests, send, parsed.stream, parsed.top_logprobs,
                      parsed.max_tokens_given))  # fmt: skip
    return queue


async def _until(queue: asyncio.Queue, kind: str):
    """Wait for the event `kind` and return its payload; an error event raises its APIError."""
    while True:
        event = await queue.get()
        if event[0] == "error":
            raise event[1]
        if event[0] == kind:
            return event[1] if len(event) > 1 else None


async def _sse(queue: asyncio.Queue, chunks: Chunks):
    """Server-sent events: `data: {chunk}` for each event of the job, then `data: [DONE]`."""

    def line(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    for chunk in chunks.start():
        yield line(chunk)
    while True:
        event = await queue.get()
        if event[0] == "text":
            yield line(chunks.text(*event[1:]))
        elif event[0] == "error":  # decoding failed after the stream began
            yield line(event[1].body())
            break
        elif event[0] == "done":
            for chunk in chunks.end(event[1]):
                yield line(chunk)
            break
    yield "data: [DONE]\n\n"
