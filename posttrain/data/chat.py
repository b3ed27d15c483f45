"""Chat examples -> token ids and a loss mask, for any chat template.

What is trained is exactly what the template renders for each assistant turn of *this*
conversation (its content, reasoning if the template shows it there, tool calls), plus the
end-of-turn token(s) the template writes right after it; never a system, user or tool turn, the
role header, or the generation prompt. Nothing here knows a particular template. The spans are
found by the first of three methods that applies, and the method is reported:

- "prefix": for assistant turn i, `render(messages[:i], add_generation_prompt=True)` is the text
  just before the reply and `render(messages[:i+1])` the text just after it. Exact, but only for
  templates that render earlier turns the same whatever follows them.
- "generation-markers": the template's own `{% generation %}` blocks, one per assistant turn.
- "rendered-markers": for templates that render a turn differently once others follow (Qwen3 and
  DeepSeek-R1 drop past reasoning, gpt-oss ends the last turn with <|return|> and earlier ones
  with <|end|>, Phi-3 appends eos after the last message, Alpaca's separators depend on what
  follows). The whole conversation is rendered a second time with each assistant text (content
  pieces, reasoning, tool-call names) replaced by a unique marker; outside the markers the two
  renderings must agree character for character, so each marker maps back to its text. A turn
  starts where generation starts (after the generation prompt `<|im_start|>assistant\\n`, or
  `<|start|>assistant` for gpt-oss, whose channel header the model must then write itself) and
  ends after the text that follows its last marker both in this conversation and when the turn
  is last (its common prefix: `<|im_end|>`, `<|eot_id|>`, tool calls...); where those two differ
  from their first special token on (gpt-oss), the conversation's own special token ends it.
  Anything that cannot be matched is a TemplateError, never a guess.

Each piece of text is tokenised on its own and concatenated, so the prompt ids are exactly those
the model sees at generation time and mask boundaries never fall inside a token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, NamedTuple

TrainOn = Literal["all_assistant", "last_assistant"]
MaskMethod = Literal["prefix", "generation-markers", "rendered-markers"]
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # the names templates read
_THINK_TAGS = ("<think>", "</think>")  # kept around markers: templates split content on them
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateError(ValueError):
    """The assistant spans cannot be derived from this chat template for this conversation."""


@dataclass
class TokenizedExample:
    input_ids: list[int]  # (T,)
    loss_mask: list[int]  # (T,) 1 where the token is trained on (predicted from its prefix)
    truncated: bool = False
    mask_method: str = ""  # how the assistant spans were found (see the module docstring)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(self.loss_mask)


class ChatSpans(NamedTuple):
    text: str  # the full rendering
    spans: list[tuple[int, int]]  # (start, end) character spans of the trained assistant turns
    method: MaskMethod


def _render(tokenizer, messages, tools, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _try_render(tokenizer, messages, tools, add_generation_prompt: bool) -> str | None:
    """A probe rendering (a prefix of the conversation); None where the template rejects it,
    e.g. an empty conversation or a tool result without its call."""
    from jinja2 import TemplateError as JinjaError

    try:
        return _render(tokenizer, messages, tools, add_generation_prompt)
    except (JinjaError, ValueError, TypeError):
        return None


def _special_tokens(tokenizer) -> list[str]:
    """Special tokens, longest first; real tokenizers mark many (<|end|>, <|start_header_id|>)
    special in their added tokens without listing them in all_special_tokens."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    found = {t.content for t in added if t.special} | set(tokenizer.all_special_tokens)
    return sorted((t for t in found if t), key=len, reverse=True)


def _strip_after_special(text: str, specials: list[str]) -> str:
    """Drop whitespace that follows a final special token (e.g. the newline after <|im_end|>):
    the model stops at the special token and never produces it."""
    stripped = text.rstrip()
    if stripped != text and any(stripped.endswith(s) for s in specials):
        return stripped
    return text


def _starts_with_special(text: str, at: int, specials: list[str]) -> str | None:
    return next((s for s in specials if text.startswith(s, at)), None)


def _prefix_spans(tokenizer, messages, tools, turns, full, specials):
    """Spans from prefix renderings; None where the template is not prefix-consistent, or where
    a turn ends before a special token that then belongs to no turn (vLLM's ChatML writes
    <|im_end|> only after turns that are not last)."""
    spans = []
    for i in turns:
        if i == 0:  # nothing to render before it (bos, a default system prompt would be trained)
            return None
        before = _try_render(tokenizer, messages[:i], tools, True)
        after = _try_render(tokenizer, messages[: i + 1], tools, False)
        if before is None or after is None:
            return None
        after = _strip_after_special(after, specials)
        if not after.startswith(before) or not full.startswith(after):
            return None
        ends_turn = any(after.endswith(s) for s in specials)
        if not ends_turn and _starts_with_special(full, len(after), specials):
            return None
        spans.append((len(before), len(after)))
    return spans


def _generation_spans(tokenizer, messages, tools, turns, full, specials):
    """Spans from the template's {% generation %} blocks, when it has exactly one per assistant
    message (otherwise a block cannot be tied to its turn)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template = tokenizer.get_chat_template(None, tools)
    if not _GENERATION_TAG.search(template):
        return None
    plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
    (text,), (blocks,) = render_jinja_template(
        [plain], tools=tools, chat_template=template, return_assistant_tokens_mask=True,
        **tokenizer.special_tokens_map,
    )  # fmt: skip
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if text != full or len(blocks) != len(assistant):
        return None
    return [tuple(blocks[assistant.index(i)]) for i in turns]


class _Marked(NamedTuple):
    messages: list[dict]  # the conversation with assistant texts replaced by markers
    values: list[str]  # values[k]: the text that marker k stands for
    owner: list[int]  # owner[k]: the index of the message marker k belongs to
    pattern: re.Pattern  # matches any marker; group 1 is k


def _mark(messages: list[dict], full: str, tags: list[str]) -> _Marked:
    """Replace every assistant text by markers. Whitespace around a text and the tags inside it
    (<think>, added tokens) are kept, because templates trim and split on them; tool-call names
    are marked so that a turn with only tool calls can still be found."""
    base = "ZqMk"
    while base in full:  # markers must not occur in the real text
        base += "q"
    values: list[str] = []
    owner: list[int] = []
    splitter = re.compile("(" + "|".join(map(re.escape, tags)) + ")")

    def text(s, i):
        if not isinstance(s, str):
            return s
        out = []
        for piece in splitter.split(s):
            lead, core, trail = re.fullmatch(r"(\s*)(.*?)(\s*)", piece, re.S).groups()
            if piece in tags or not core:
                out.append(piece)
                continue
            out.append(f"{lead}{base}{len(values)}Q{trail}")
            values.append(core)
            owner.append(i)
        return "".join(out)

    marked = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            marked.append(m)
            continue
        m = dict(m)
        content = m.get("content")
        if isinstance(content, list):  # content parts: mark the text ones
            m["content"] = [
                {**p, "text": text(p["text"], i)} if isinstance(p, dict) and "text" in p else p
                for p in content
            ]
        elif content is not None:
            m["content"] = text(content, i)
        m.update({f: text(m[f], i) for f in _REASONING_FIELDS if f in m})  # each its own markers
        if m.get("tool_calls"):
            m["tool_calls"] = [_mark_call(c, lambda s, i=i: text(s, i)) for c in m["tool_calls"]]
        marked.append(m)
    return _Marked(marked, values, owner, re.compile(re.escape(base) + r"(\d+)Q"))


def _mark_call(call, text):
    """A tool call with its function name marked (OpenAI's nested form or a flat one)."""
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        return {
            **call,
            "function": {**call["function"], "name": text(call["function"].get("name"))},
        }
    if isinstance(call, dict) and "name" in call:
        return {**call, "name": text(call["name"])}
    return call


class _Alignment(NamedTuple):
    occ: list[tuple[int, int, int]]  # (start, end, k) of each marker occurrence in the marked text
    pieces: list[tuple[int, int, int]]  # (g0, g1, f0): marked[g0:g1] == full[f0:f0 + g1 - g0]

    def to_full(self, g: int) -> int:
        """A position in the marked rendering, outside markers, as a position in the real one."""
        return next(f0 + g - g0 for g0, g1, f0 in self.pieces if g0 <= g <= g1)


def _align(full: str, marked: str, mk: _Marked) -> _Alignment:
    """Map the marked rendering onto the real one: the text outside markers must be identical,
    and each marker must stand for exactly its text. Anything else means the template renders
    the texts themselves in a way we cannot follow (it transforms them), so we stop."""
    occ = [(m.start(), m.end(), int(m.group(1))) for m in mk.pattern.finditer(marked)]
    pieces, f, g = [], 0, 0
    for a, b, k in [*occ, (len(marked), len(marked), None)]:
        if not full.startswith(marked[g:a], f) or (k is None and len(full) != f + a - g):
            raise TemplateError(
                f"the chat template renders this conversation differently once the assistant "
                f"texts are replaced by markers (near character {f} of the rendering): it depends "
                "on the texts themselves, so the assistant spans cannot be located"
            )
        pieces.append((g, a, f))
        f += a - g
        if k is not None:
            if not full.startswith(mk.values[k], f):
                raise TemplateError(
                    f"the chat template transforms assistant text {mk.values[k][:40]!r} of "
                    f"message {mk.owner[k]}, so its span cannot be located"
                )
            f, g = f + len(mk.values[k]), b
    return _Alignment(occ, pieces)


def _longest(fits, hi: int) -> int:
    """The largest n <= hi with fits(n), for a fits that holds up to some n and not beyond."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _snap(text: str, n: int, tags: list[str]) -> int:
    """n, moved back to the start of an added token that it would cut in two."""
    for t in tags:
        s = text.find(t, max(0, n - len(t) + 1), n + len(t) - 1)
        if 0 <= s < n:
            return _snap(text, s, tags)
    return n


def _turn_start(tokenizer, messages, tools, mk, i, marked, al, a, tags) -> int:
    """Where turn i starts in the marked rendering: right after its generation prompt, the text
    that add_generation_prompt appends, or the longest part of it found before the turn's first
    marker (DeepSeek-R1 prompts with <｜Assistant｜><think>\\n but renders <｜Assistant｜>).
    Templates without one (Mistral) start the turn where the prompt rendering ends. A first
    message has no prompt before it: a one-question probe conversation stands in for it."""
    prev = max((e for _, e, _ in al.occ if e <= a), default=0)
    before = marked[prev:a]
    probe = [{"role": "user", "content": "?"}]
    prompt = _try_render(tokenizer, messages[:i] or probe, tools, True)
    bare = _try_render(tokenizer, messages[:i] or probe, tools, False)
    head = prompt[len(bare) :] if prompt and bare is not None and prompt.startswith(bare) else ""
    n = _snap(head, _longest(lambda n: head[:n] in before, len(head)), tags)
    if n:
        return prev + before.rfind(head[:n]) + n
    tail = _try_render(tokenizer, mk.messages[:i] or probe, tools, True)
    if tail:
        tail = tail[max((m.end() for m in mk.pattern.finditer(tail)), default=0) :]
        n = _longest(lambda n: tail[len(tail) - n :] in before, len(tail))
        if n:
            return prev + before.rfind(tail[len(tail) - n :]) + n
    raise TemplateError(
        f"message {i}: cannot find where the assistant turn starts (no generation prompt and no "
        "end of the prompt rendering before its text)"
    )


def _turn_end(tokenizer, tools, mk, i, marked, al, j_last, specials, tags) -> int:
    """Where turn i ends in the marked rendering: after the text that follows its last marker
    both here and when the turn is the last message (tool calls, <|im_end|>, <|eot_id|>, ...).
    Where the two differ from a special token on (gpt-oss: <|end|> here, <|return|> when last;
    vLLM's ChatML: <|im_end|> here, nothing when last), the special token written here."""
    _, b, k_last = al.occ[j_last]
    after = marked[b : min((s for s, _, _ in al.occ if s >= b), default=len(marked))]
    last = _try_render(tokenizer, mk.messages[: i + 1], tools, False) or ""
    m = next((m for m in mk.pattern.finditer(last) if int(m.group(1)) == k_last), None)
    alone = last[m.end() :] if m else None
    n = 0
    while alone is not None and n < min(len(after), len(alone)) and after[n] == alone[n]:
        n += 1
    n = _snap(after, n, tags)
    eot = after[:n]
    if not any(s in eot for s in specials):
        tok = _starts_with_special(after, n, specials)
        if tok and (alone is None or n == len(alone) or _starts_with_special(alone, n, specials)):
            eot = after[: n + len(tok)]
    return b + len(_strip_after_special(eot, specials))


def _marker_spans(tokenizer, messages, tools, turns, full, specials):
    """Spans located in the whole rendering through markers (see the module docstring)."""
    tags = sorted({*_THINK_TAGS, *tokenizer.added_tokens_encoder}, key=len, reverse=True)
    mk = _mark(messages, full, tags)
    marked = _render(tokenizer, mk.messages, tools, False)
    al = _align(full, marked, mk)
    first: dict[int, int] = {}  # marker -> its first occurrence (later ones echo it elsewhere)
    for j, (_, _, k) in enumerate(al.occ):
        first.setdefault(k, j)
    turn_occ: dict[int, list[int]] = {}  # assistant message -> first occurrences of its markers
    for j in sorted(first.values()):
        turn_occ.setdefault(mk.owner[al.occ[j][2]], []).append(j)
    found = {i: (al.occ[js[0]][0], js[-1]) for i, js in turn_occ.items()}  # (start, last marker)
    order = [found[i] for i in sorted(found)]
    if any(al.occ[p[1]][1] > q[0] for p, q in zip(order, order[1:], strict=False)):
        raise TemplateError("the chat template renders assistant turns out of order")
    spans = []
    for i in turns:
        if i not in found:
            raise TemplateError(
                f"message {i}: the chat template renders none of this assistant message's "
                "content, reasoning or tool calls, so its span cannot be located"
            )
        a, j_last = found[i]
        start = _turn_start(tokenizer, messages, tools, mk, i, marked, al, a, tags)
        end = _turn_end(tokenizer, tools, mk, i, marked, al, j_last, specials, tags)
        spans.append((al.to_full(start), al.to_full(end)))
    return spans


_METHODS = (
    ("prefix", _prefix_spans),
    ("generation-markers", _generation_spans),
    ("rendered-markers", _marker_spans),
)


def assistant_spans(
    tokenizer, messages: list[dict], tools=None, train_on: TrainOn = "all_assistant"
) -> ChatSpans:
    """The full rendered text, the (start, end) character spans of the trained assistant turns,
    and the method that found them: the first of _METHODS that applies (the last one raises
    TemplateError rather than guess)."""
    full = _render(tokenizer, messages, tools, False)
    specials = _special_tokens(tokenizer)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        turns = turns[-1:]  # only the last turn need be prefix-consistent
    for method, find in _METHODS:
        spans = find(tokenizer, messages, tools, turns, full, specials)
        if spans is not None:
            return ChatSpans(full, [(s, e) for s, e in spans if e > s], method)
    raise AssertionError("unreachable: the rendered-markers method raises or returns spans")


def tokenize_chat(
    tokenizer, example: dict, train_on: TrainOn = "all_assistant"
) -> TokenizedExample:
    """Token ids and loss mask of one chat example ({"messages": [...], "tools"?: [...]})."""
    full, spans, method = assistant_spans(
        tokenizer, example["messages"], example.get("tools"), train_on
    )
    ids: list[int] = []
    mask: list[int] = []
    cursor = 0
    for start, end in spans:
        for text, trained in ((full[cursor:start], 0), (full[start:end], 1)):
            if text:
                piece = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids.extend(piece)
                mask.extend([trained] * len(piece))
        cursor = end
    if cursor < len(full):
        piece = tokenizer(full[cursor:], add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        mask.extend([0] * len(piece))
    return TokenizedExample(ids, mask, mask_method=method)


def fit_length(
    ex: TokenizedExample, max_length: int, policy: Literal["truncate", "drop"]
) -> TokenizedExample | None:
    """Keep-start truncation to max_length, or drop; None when nothing trainable is left."""
    if len(ex) <= max_length:
        return ex
    if policy == "drop":
        return None
    cut = TokenizedExample(
        ex.input_ids[:max_length], ex.loss_mask[:max_length], True, ex.mask_method
    )
    return cut if cut.n_trained > 0 else None
