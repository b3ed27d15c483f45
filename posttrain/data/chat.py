"""Chat examples -> token ids and a loss mask, for any chat template.

The assistant spans are derived from the template itself, by rendering prefixes: for assistant
turn i, `render(messages[:i], add_generation_prompt=True)` is the text just before the reply and
`render(messages[:i+1])` the text just after it. The difference is what the model must learn to
produce (content, tool calls, the end-of-turn token). Each piece of text is tokenised on its
own and concatenated, so the prompt ids are exactly those the model sees at generation time and
mask boundaries never fall inside a token. Nothing here knows our own template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

TrainOn = Literal["all_assistant", "last_assistant"]


class TemplateError(ValueError):
    """The chat template does not render conversations prefix-consistently."""


@dataclass
class TokenizedExample:
    input_ids: list[int]  # (T,)
    loss_mask: list[int]  # (T,) 1 where the token is trained on (predicted from its prefix)
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(self.loss_mask)


def _render(tokenizer, messages, tools, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _strip_after_special(text: str, specials: list[str]) -> str:
    """Drop whitespace that follows a final special token (e.g. the newline after <|im_end|>):
    the model stops at the special token and never produces it."""
    stripped = text.rstrip()
    if stripped != text and any(stripped.endswith(s) for s in specials):
        return stripped
    return text


def assistant_spans(
    tokenizer, messages: list[dict], tools=None, train_on: TrainOn = "all_assistant"
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the (start, end) character spans of the trained assistant turns."""
    full = _render(tokenizer, messages, tools, False)
    specials = [t for t in tokenizer.all_special_tokens if t]
    spans = []
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        turns = turns[-1:]
    for i in turns:
        before = _render(tokenizer, messages[:i], tools, True) if i else ""
        after = _strip_after_special(_render(tokenizer, messages[: i + 1], tools, False), specials)
        if not after.startswith(before) or not full.startswith(after):
            raise TemplateError(
                f"the chat template is not prefix-consistent at message {i}: rendering the "
                "conversation up to that turn does not give a prefix of the whole rendering"
            )
        if len(after) > len(before):
            spans.append((len(before), len(after)))
    return full, spans


def tokenize_chat(
    tokenizer, example: dict, train_on: TrainOn = "all_assistant"
) -> TokenizedExample:
    """Token ids and loss mask of one chat example ({"messages": [...], "tools"?: [...]})."""
    full, spans = assistant_spans(tokenizer, example["messages"], example.get("tools"), train_on)
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
    return TokenizedExample(ids, mask)


def fit_length(
    ex: TokenizedExample, max_length: int, policy: Literal["truncate", "drop"]
) -> TokenizedExample | None:
    """Keep-start truncation to max_length, or drop; None when nothing trainable is left."""
    if len(ex) <= max_length:
        return ex
    if policy == "drop":
        return None
    cut = TokenizedExample(ex.input_ids[:max_length], ex.loss_mask[:max_length], truncated=True)
    return cut if cut.n_trained > 0 else None
