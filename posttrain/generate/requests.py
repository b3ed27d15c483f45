"""Chat requests as the OpenAI API shapes them, answered by a local model with our decoder.

One request asks for `n` replies to one conversation (`ChatRequest`, rendered with the chat
template) or to a raw text (`CompletionRequest`) with its own sampling settings; `run_requests`
answers a list of them in as few batched decoding calls as it can (requests
whose settings agree decode together). `posttrain serve` and the local model client both answer
through it, so a model behind the server and the same model loaded in-process give the same
replies for the same seed.

    reqs = [ChatRequest([{"role": "user", "content": "hi"}], n=2, temperature=0.7, seed=1)]
    out = run_chat_requests(model, tokenizer, reqs)
    out[0].choices[1].text, out[0].choices[1].finish_reason, out[0].usage
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from posttrain.generate.decode import generate
from posttrain.generate.sampling import SamplingParams


@dataclass(frozen=True)
class _Sampling:
    """The API's sampling settings, shared by chat and completion requests (validated)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] | list[str] | None = None
    seed: int | None = None  # None: a fresh random seed (replies differ between calls)
    logprobs: bool = False

    def _check(self) -> None:
        checks = [
            ("n", isinstance(self.n, int) and 1 <= self.n <= 128, "must be an integer in [1, 128]"),
            ("temperature", 0 <= self.temperature <= 2, "must be in [0, 2]"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             "must be an integer >= 1"),
            ("stop", self.stop is None or (len(self.stop) <= 4 and all(
                isinstance(s, str) and s for s in self.stop)),
             "must be at most 4 non-empty strings"),
        ]  # fmt: skip
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} {why}")

    def _sampling_key(self) -> dict:
        return {
            "n": self.n,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "stop": list(self.stop) if self.stop else None,
            "seed": self.seed,
            "logprobs": self.logprobs,
        }


@dataclass(frozen=True, kw_only=True)
class ChatRequest(_Sampling):
    """One conversation to answer, with the API's sampling settings (validated on creation)."""

    messages: tuple | list  # [{"role", "content"}, ...]

    def __init__(self, messages, **kw):  # messages may be given by position
        object.__setattr__(self, "messages", messages)
        for k, v in kw.items():
            if k not in _Sampling.__dataclass_fields__:
                raise TypeError(f"ChatRequest: unknown field {k!r}")
            object.__setattr__(self, k, v)
        self.__post_init__()

    def __post_init__(self):
        if not (isinstance(self.messages, list | tuple) and len(self.messages) > 0):
            raise ValueError(
                f"messages={self.messages!r} must be a non-empty list of {{role, content}}"
            )
        for i, m in enumerate(self.messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ValueError(f"messages[{i}]: expected an object with a 'role', got {m!r}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}].content: expected a string")
        self._check()

    def key(self) -> dict:
        """Every field, as plain JSON: what a cache of replies is keyed by."""
        return {"messages": [dict(m) for m in self.messages]} | self._sampling_key()


@dataclass(frozen=True, kw_only=True)
class CompletionRequest(_Sampling):
    """A raw text prompt to continue (no chat template), with the same sampling settings."""

    prompt: str

    def __init__(self, prompt, **kw):
        object.__setattr__(self, "prompt", prompt)
        for k, v in kw.items():
            if k not in _Sampling.__dataclass_fields__:
                raise TypeError(f"CompletionRequest: unknown field {k!r}")
            object.__setattr__(self, k, v)
        self.__post_init__()

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt:
            raise ValueError(f"prompt={self.prompt!r} must be a non-empty string")
        self._check()

    def key(self) -> dict:
        return {"prompt": self.prompt} | self._sampling_key()


@dataclass
class Choice:
    text: str
    finish_reason: str  # "stop": a stop token or stop string ended it; "length": max_tokens
    tokens: list[str] | None = None  # with logprobs: the reply's tokens as text
    token_logprobs: list[float] | None = None  # log p(token | prefix), temperature 1


@dataclass
class ChatResponse:
    choices: list[Choice]
    usage: dict = field(default_factory=dict)  # prompt_tokens, completion_tokens, total_tokens
    cached: bool = False  # answered from a client's cache


def cut_at_stop(text: str, stop) -> tuple[str, bool]:
    """The text before the first occurrence of any stop string, and whether one occurred."""
    if not stop:
        return text, False
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def render_chat(tokenizer, messages) -> list[int]:
    """The conversation through the chat template, ending with the assistant's header."""
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages], add_generation_prompt=True, tokenize=True, return_dict=False
    )


def prompt_ids(tokenizer, req: ChatRequest | CompletionRequest) -> list[int]:
    """The ids a request's replies are conditioned on: the chat rendered with the template, or
    the completion prompt as it is (no special tokens added)."""
    if isinstance(req, ChatRequest):
        return render_chat(tokenizer, req.messages)
    return tokenizer(req.prompt, add_special_tokens=False)["input_ids"]


def _choice(tokenizer, gen, req: _Sampling) -> Choice:
    text, hit = cut_at_stop(gen.text, req.stop)
    reason = "stop" if hit or gen.finished else "length"
    if not req.logprobs:
        return Choice(text, reason)
    tokens, logps, shown = [], [], ""
    body = gen.token_ids[:-1] if gen.finished else gen.token_ids  # the stop token is not text
    for tid, lp in zip(body, gen.logprobs, strict=False):
        if hit and len(shown) >= len(text):
            break
        piece = tokenizer.decode([tid], skip_special_tokens=True)
        tokens.append(piece)
        logps.append(float(lp))
        shown += piece
    return Choice(text, reason, tokens, logps)


def run_requests(
    model,
    tokenizer,
    requests: list[ChatRequest | CompletionRequest],
    batch_size: int = 32,
    on_token: Callable[[int, int, int], None] | None = None,
) -> list[ChatResponse]:
    """Answer every request; replies come back in the order of `requests`.

    Requests whose (temperature, top_p, max_tokens, seed) agree are decoded in one `generate`
    call, their n copies side by side (greedy requests whatever their seed and top_p; unseeded
    ones share one fresh seed). Requests with the same seed share one random generator, so a
    seeded reply depends on what else shares its call: ask for it alone (as the server and the
    client's cache do) to get the same reply every time. on_token(request index, choice index, token id) is
    called as tokens are decoded, where the decoder supports it (streaming).
    """
    prompts = [prompt_ids(tokenizer, r) for r in requests]
    fresh = random.getrandbits(31)  # unseeded requests: one fresh seed, so they batch together
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        if r.temperature == 0:  # greedy: neither seed nor top_p changes a token
            key = (0.0, 1.0, r.max_tokens, 0)
        else:
            key = (r.temperature, r.top_p, r.max_tokens, fresh if r.seed is None else r.seed)
        groups.setdefault(key, []).append(i)
    gens: dict[int, list] = {}
    for (temperature, top_p, max_tokens, seed), idx in groups.items():
        params = SamplingParams(
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            batch_size=batch_size,
        )
        flat = [(i, j) for i in idx for j in range(requests[i].n)]
        callback = None
        if on_token is not None:

            def callback(row, token_id, _flat=flat):
                on_token(_flat[row][0], _flat[row][1], token_id)

        kwargs = {"on_token": callback} if callback is not None else {}
        out = generate(model, tokenizer, [prompts[i] for i, _ in flat], params, **kwargs)
        for (i, _), g in zip(flat, out, strict=True):
            gens.setdefault(i, []).append(g)
    responses = []
    for i, r in enumerate(requests):
        choices = [_choice(tokenizer, g, r) for g in gens[i]]
        completion = sum(len(g.token_ids) for g in gens[i])
        usage = {
            "prompt_tokens": len(prompts[i]),
            "completion_tokens": completion,
            "total_tokens": len(prompts[i]) + completion,
        }
        responses.append(ChatResponse(choices, usage))
    return responses


run_chat_requests = run_requests  # the name for chat-only callers
