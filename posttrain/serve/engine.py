"""The thread of `posttrain serve` that owns the model: it batches requests and answers them.

Handlers (on the asyncio loop) `submit` a Job and read its events; they never touch the model
or the tokenizer. The engine takes every pending job (up to `max_batch` requests, waiting at
most `batch_wait_ms` for more once one has arrived) and answers them all with one
`run_requests` call, so requests that arrive together decode together:

    ("accepted",)                   the job's prompts fit the model: decoding follows
    ("text", i, j, delta, items)    reply j of request i grew by `delta` (streaming jobs only;
                                    items: the logprobs of the tokens behind it, or None)
    ("done", [Answer, ...])         one Answer per request
    ("error", APIError)             400 for a request that cannot be answered, 500 if decoding
                                    failed; the engine goes on with the next batch

A seeded sampled request never shares a batch with another job of the same settings and seed
(one generator draws for a group), so its reply is the one `run_requests` gives it alone. Greedy
requests batch whatever their seed, and unseeded ones share one fresh seed per batch.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from posttrain.generate import requests as reqs_mod
from posttrain.generate.requests import ChatRequest, cut_at_stop, prompt_ids
from posttrain.serve.protocol import APIError

log = logging.getLogger("posttrain.serve")
SHUTTING_DOWN = APIError(503, "the server is shutting down", type="server_error")


@dataclass
class Reply:
    text: str
    finish_reason: str  # "stop" | "length"
    logprobs: list[dict] | None = None  # per token: {id, token, logprob, top: [(token, logp)]}


@dataclass
class Answer:
    replies: list[Reply]
    usage: dict  # prompt_tokens, completion_tokens, total_tokens


@dataclass
class Job:
    """One HTTP request's work: its requests (a chat, or one per completion prompt)."""

    requests: list  # ChatRequest | CompletionRequest
    send: Callable[[tuple], None]  # deliver an event to the handler (called from the engine)
    stream: bool = False
    top_logprobs: int = 0
    max_tokens_given: bool = True  # else: capped so prompt + reply fit the context
    prompts: list[list[int]] = field(default_factory=list)  # filled by the engine
    ids: dict = field(default_factory=dict)  # (i, j) -> token ids decoded so far
    streams: dict = field(default_factory=dict)  # (i, j) -> TextStream, when streaming live

    @property
    def live(self) -> bool:
        """Streams text as it is decoded (with logprobs, chunks come after decoding)."""
        return self.stream and not self.requests[0].logprobs

    def sampled_keys(self) -> set:
        return {(r.temperature, r.top_p, r.max_tokens, r.seed) for r in self.requests
                if r.seed is not None and r.temperature > 0}  # fmt: skip


class TextStream:
    """A reply's text as its tokens arrive: only what is final (no half of a multi-byte
    character, nothing that may be the start of a stop string, nothing from a stop string on)."""

    def __init__(self, tokenizer, stop, stop_ids):
        self.tok, self.stop, self.stop_ids = tokenizer, stop or [], set(stop_ids)
        self.ids: list[int] = []
        self.sent = ""
        self.ended = False  # a stop string was seen: nothing more is text

    def push(self, token_id: int) -> str:
        """The text that token_id adds (maybe "")."""
        if self.ended or token_id in self.stop_ids:  # a stop token ends the reply, not text
            return ""
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        text, hit = cut_at_stop(text, self.stop)
        if hit:
            self.ended = True
        elif text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        else:
            text = text[: len(text) - _stop_prefix(text, self.stop)]
        return self.finish(text)

    def finish(self, text: str) -> str:
        """What `text` (the reply so far, or its final text) adds to what was sent."""
        if not text.startswith(self.sent):
            log.warning("streamed text %r is not a prefix of %r", self.sent, text)
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


def _stop_prefix(text: str, stops) -> int:
    """Length of the longest end of `text` that a stop string starts with."""
    return max([k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)


@torch.inference_mode()
def top_logprobs(model, prompt: list[int], reply: list[int], k: int) -> list[list[tuple]]:
    """For each reply position, the k most likely (token id, log-prob) under the model at
    temperature 1, from one forward pass over prompt + reply."""
    if not reply:
        return []
    device = next(model.parameters()).device
    seq = torch.tensor([prompt + reply], device=device)  # (1, P + R)
    # The logits at the last R + 1 positions; the one after the reply's last token is unused.
    logits = model(seq, logits_to_keep=len(reply) + 1).logits[0, :-1]  # (R, V)
    top = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)  # (R, k)
    return [list(zip(i, v, strict=True)) for i, v in zip(top.indices.tolist(),
                                                         top.values.tolist(), strict=True)]  # fmt: skip


class Engine:
    """One thread that owns `model` and answers submitted Jobs in batches."""

    def __init__(self, model, tokenizer, max_batch: int = 32, batch_wait_ms: float = 5.0,
                 decode_batch_size: int = 64):  # fmt: skip
        from posttrain.models.tokenizer import end_of_turn_ids

        if max_batch < 1 or batch_wait_ms < 0:
            raise ValueError(f"max_batch={max_batch} must be >= 1, batch_wait_ms >= 0")
        self.model, self.tok = model.eval(), tokenizer
        self.max_batch, self.wait_s = max_batch, batch_wait_ms / 1000
        self.decode_batch_size = decode_batch_size
        self.stop_ids = end_of_turn_ids(tokenizer)
        self.context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._batches: deque[dict] = deque(maxlen=1000)  # per batch: requests, prompts, rows
        self._totals = {"batches": 0, "requests": 0, "errors": 0}
        self._thread = threading.Thread(target=self._loop, name="posttrain-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                job.send(("error", SHUTTING_DOWN))
                return
            self._pending.append(job)
            self._cond.notify()

    def stats(self) -> dict:
        """Counters, and for each recent decode batch how many requests it held."""
        with self._cond:
            recent = list(self._batches)
            return {**self._totals, "max_batch": self.max_batch, "batch_wait_ms": self.wait_s * 1000,
                    "pending": len(self._pending), "recent_batches": recent}  # fmt: skip

    def close(self) -> None:
        with self._cond:
            self._closed = True
            left = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in left:
            job.send(("error", SHUTTING_DOWN))
        self._thread.join(timeout=30)

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest pending job, and after at most wait_s the others that fit."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            deadline = time.monotonic() + self.wait_s
            while not self._closed and sum(len(j.requests) for j in self._pending) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    break
            if self._closed:
                return None
            taken, keys, size = [], set(), 0
            for job in list(self._pending):
                n = len(job.requests)
                if taken and (size + n > self.max_batch or keys & job.sampled_keys()):
                    continue  # stays first in line for the next batch
                taken.append(job)
                keys |= job.sampled_keys()
                size += n
            for job in taken:
                self._pending.remove(job)
            return taken

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            try:
                ready = [j for j in jobs if self._prepare(j)]
                if ready:
                    self._answer(ready)
            except Exception as e:  # never let the thread die: fail this batch, serve the next
                log.exception("engine batch failed")
                for job in jobs:
                    job.send(("error", APIError(500, f"internal error: {e}", type="server_error")))

    def _prepare(self, job: Job) -> bool:
        """Tokenise the job's prompts and fit max_tokens to the context; else a 400."""
        try:
            job.prompts = [prompt_ids(self.tok, r) for r in job.requests]
            job.requests = [self._fit(r, p, job.max_tokens_given)
                            for r, p in zip(job.requests, job.prompts, strict=True)]  # fmt: skip
        except APIError as e:
            job.send(("error", e))
            return False
        except Exception as e:  # a chat template that refuses the conversation, say
            param = "messages" if isinstance(job.requests[0], ChatRequest) else "prompt"
            job.send(("error", APIError(400, f"{param}: {e}", param)))
            return False
        job.send(("accepted",))
        return True

    def _fit(self, req, prompt: list[int], given: bool):
        param = "messages" if isinstance(req, ChatRequest) else "prompt"
        if not prompt:
            raise APIError(400, f"{param}: the prompt is empty (no tokens)", param)
        if self.context is None or len(prompt) + req.max_tokens <= self.context:
            return req
        room = self.context - len(prompt)
        if not given and room >= 1:
            return dataclasses.replace(req, max_tokens=room)
        raise APIError(400, f"This model's maximum context length is {self.context} tokens; the "
                       f"prompt has {len(prompt)} tokens and max_tokens is {req.max_tokens} "
                       f"({len(prompt) + req.max_tokens} in all). Shorten the {param} or lower "
                       "max_tokens.", param, "context_length_exceeded")  # fmt: skip

    def _answer(self, jobs: list[Job]) -> None:
        owners = [(job, i) for job in jobs for i in range(len(job.requests))]
        batch = self._seeded([r for job in jobs for r in job.requests])
        with self._cond:
            self._totals["batches"] += 1
            self._totals["requests"] += len(jobs)
            self._batches.append({"requests": len(jobs), "prompts": len(batch),
                                  "rows": sum(r.n for r in batch)})  # fmt: skip
        for job in jobs:
            job.ids = {(i, j): [] for i, r in enumerate(job.requests) for j in range(r.n)}
            if job.live:
                job.streams = {key: TextStream(self.tok, job.requests[key[0]].stop, self.stop_ids)
                               for key in job.ids}  # fmt: skip

        def on_token(k: int, j: int, token_id: int) -> None:
            job, i = owners[k]
            job.ids[i, j].append(token_id)
            if job.live and (delta := job.streams[i, j].push(token_id)):
                job.send(("text", i, j, delta, None))

        try:
            out = reqs_mod.run_requests(self.model, self.tok, batch, self.decode_batch_size,
                                        on_token)  # fmt: skip
        except Exception as e:
            bad_input = isinstance(e, ValueError)
            log.log(logging.INFO if bad_input else logging.ERROR, "decoding failed", exc_info=True)
            err = (APIError(400, str(e)) if bad_input else
                   APIError(500, f"decoding failed: {type(e).__name__}: {e}", type="server_error"))  # fmt: skip
            with self._cond:
                self._totals["errors"] += len(jobs)
            for job in jobs:
                job.send(("error", err))
            return
        start = 0
        for job in jobs:
            mine = out[start : start + len(job.requests)]
            start += len(job.requests)
            try:
                job.send(("done", self._finish(job, mine)))
            except Exception as e:
                log.exception("answering a job failed")
                job.send(("error", APIError(500, f"internal error: {e}", type="server_error")))

    def _seeded(self, batch: list) -> list:
        """Greedy requests need no seed (all decode together); unseeded sampled ones share one
        fresh seed (so they decode together too)."""
        taken = {r.seed for r in batch}
        fresh = next(s for s in iter(lambda: random.getrandbits(31), None) if s not in taken)
        out = []
        for r in batch:
            if r.temperature == 0:
                r = dataclasses.replace(r, seed=0, top_p=1.0)
            elif r.seed is None:
                r = dataclasses.replace(r, seed=fresh)
            out.append(r)
        return out

    def _finish(self, job: Job, responses) -> list[Answer]:
        """Answers from run_requests' responses: logprob items and the streams' last text."""
        answers = []
        for i, (req, resp) in enumerate(zip(job.requests, responses, strict=True)):
            replies = []
            for j, choice in enumerate(resp.choices):
                items = self._logprob_items(job, i, j, choice) if req.logprobs else None
                replies.append(Reply(choice.text, choice.finish_reason, items))
                if job.live:
                    if delta := job.streams[i, j].finish(choice.text):
                        job.send(("text", i, j, delta, None))
                elif job.stream:
                    self._send_with_logprobs(job, i, j, choice.text, items)
            answers.append(Answer(replies, dict(resp.usage)))
        return answers

    def _logprob_items(self, job: Job, i: int, j: int, choice) -> list[dict]:
        """The reply's tokens (those of choice.tokens: up to a stop string) with the decoder's
        log-probs and, with top_logprobs, the forward pass's k best alternatives."""
        ids = job.ids[i, j][: len(choice.tokens)]
        tops = top_logprobs(self.model, job.prompts[i], ids, job.top_logprobs) if (
            job.top_logprobs and ids) else [[] for _ in ids]  # fmt: skip
        return [{"id": tid, "token": piece, "logprob": lp,
                 "top": [(self.tok.decode([t]), v) for t, v in top]}
                for tid, piece, lp, top in zip(ids, choice.tokens, choice.token_logprobs, tops,
                                               strict=True)]  # fmt: skip

    def _send_with_logprobs(self, job: Job, i: int, j: int, text: str, items) -> None:
        """A stream with logprobs, after decoding: each chunk of text with its tokens' items."""
        stream = TextStream(self.tok, job.requests[i].stop, self.stop_ids)
        held: list[dict] = []
        for item in items:
            held.append(item)
            if delta := stream.push(item["id"]):
                job.send(("text", i, j, delta, held))
                held = []
        delta = stream.finish(text)
        if delta or held:
            job.send(("text", i, j, delta, held))
