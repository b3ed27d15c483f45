"""The toy byte-level BPE tokenizer, its ChatML chat template, and tokenizer I/O.

The toy model's tokenizer is an ordinary Hugging Face fast tokenizer, so every stage treats it
exactly like a real model's: ``load_tokenizer`` works on any local tokenizer directory, and the
chat template is the only place that knows how a conversation becomes text.

Design choices (and why):
- Byte-level BPE with the full 256-byte initial alphabet: every string, ASCII or not, encodes
  and decodes back *exactly*, so no text is ever lost to an unknown token.
- Digits are split one per token (as in LLaMA / nanochat): arithmetic in the toy world then sees
  the same token for the same digit wherever it appears.
- No post-processor: nothing (no BOS) is added automatically, so ``apply_chat_template`` yields
  exactly the rendered template tokenised, and the loss masks built from it line up.
- ``<tool_call>`` and ``</tool_call>`` are *added* tokens, never split, but *not special*: they
  survive ``decode(..., skip_special_tokens=True)``, so tool calls can be parsed from generated
  text (the same choice Qwen2.5 makes).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = {
    "bos": "<|bos|>",
    "eos": "<|endoftext|>",
    "pad": "<|pad|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
}
# Added (never split) but not special: see the module docstring.
TOOL_CALL_TOKENS = ("<tool_call>", "</tool_call>")
# Markers that end an assistant turn in common chat formats (ChatML, Llama 3, Gemma, Phi-3).
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
MODEL_MAX_LENGTH = 2048
# Any of these makes a directory loadable by AutoTokenizer (fast, BPE, SentencePiece, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model", "vocab.txt")  # fmt: skip

# ChatML. Each message is "<|im_start|>{role}\n{content}<|im_end|>\n". With `tools`, the tool
# schemas go into the system block as JSON, one per line (appended to a leading system message,
# or in a system message of their own). An assistant's tool calls follow its content, one
# "<tool_call>\n{json}\n</tool_call>" each. The assistant's content, tool calls and <|im_end|>
# are wrapped in {% generation %} so that `return_assistant_tokens_mask=True` marks exactly the
# tokens the model must learn to produce: not the role header, not the newline after <|im_end|>.
CHAT_TEMPLATE = r"""
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is defined and content is not none -%}
        {%- for part in content if part.type == 'text' -%}
            {{- part.text -}}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set tools_in_system = tools and messages and messages[0].role == 'system' -%}
{%- if tools -%}
    {{- '<|im_start|>system\n' -}}
    {%- if tools_in_system -%}
        {{- render_content(messages[0].content) + '\n\n' -}}
    {%- endif -%}
    {{- 'You can call these tools:\n' -}}
    {%- for tool in tools -%}
        {{- tool | tojson + '\n' -}}
    {%- endfor -%}
    {{- '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if loop.first and tools_in_system -%}
        {#- already rendered, with the tools -#}
    {%- elif message.role in ['system', 'user', 'tool'] -%}
        {{- '<|im_start|>' + message.role + '\n' + render_content(message.content) + '<|im_end|>\n' -}}
    {%- elif message.role == 'assistant' -%}
        {{- '<|im_start|>assistant\n' -}}
        {%- generation -%}
            {%- set content = render_content(message.content) -%}
            {{- content -}}
            {%- for call in message.tool_calls or [] -%}
                {%- set fn = call.function if call.function is defined else call -%}
                {%- if not (loop.first and content == '') -%}
                    {{- '\n' -}}
                {%- endif -%}
                {{- '<tool_call>\n{"name": ' + fn.name | tojson + ', "arguments": ' -}}
                {%- if fn.arguments is string -%}
                    {{- fn.arguments -}}
                {%- else -%}
                    {{- fn.arguments | tojson -}}
                {%- endif -%}
                {{- '}\n</tool_call>' -}}
            {%- endfor -%}
            {{- '<|im_end|>' -}}
        {%- endgeneration -%}
        {{- '\n' -}}
    {%- else -%}
        {{- raise_exception('Unknown role: ' ~ message.role) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
""".strip()


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a HF fast tokenizer.

    The vocabulary holds the special tokens (ids 0..4, in SPECIAL_TOKENS order), the 256
    byte-level symbols, the learned merges, and the two tool-call tokens at the end.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    # Digits first so that no merge can ever join two digits, then GPT-2's byte-level regex split.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_CALL_TOKENS])

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        additional_special_tokens=[SPECIAL_TOKENS["im_start"], SPECIAL_TOKENS["im_end"]],
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tokenizer(tok: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """Save `tok` to `out_dir` atomically: readers see the old directory or the new, never half.

    An existing `out_dir` is replaced. POSIX cannot rename a directory over a non-empty one, so
    the old one is first renamed aside and deleted once the new one is in place.
    """
    from posttrain.io import atomic_dir, clean_stale_temps

    clean_stale_temps(Path(out_dir).parent, Path(out_dir).name)  # a killed save's leftovers
    with atomic_dir(out_dir) as tmp:
        tok.save_pretrained(tmp)


def has_tokenizer_files(path: Path | str) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: Path | str) -> PreTrainedTokenizerBase:
    """Load any local Hugging Face tokenizer directory (ours or a real model's)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        what = "is a file, expected a directory" if path.exists() else "not found"
        raise FileNotFoundError(f"tokenizer directory {what}: {path}")
    if not has_tokenizer_files(path):
        empty = " (it is empty)" if not any(path.iterdir()) else ""
        raise FileNotFoundError(
            f"{path} has no tokenizer files{empty} (none of {', '.join(TOKENIZER_FILES)}); give "
            "a model or tokenizer directory written by save_pretrained, or save the model's "
            "tokenizer there (tokenizer.save_pretrained)"
        )
    return AutoTokenizer.from_pretrained(path)


def end_of_turn_ids(tok: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an assistant turn: the end-of-turn marker if present, plus eos.

    Generation stops at any of them. For ChatML tokenizers (ours, Qwen) the marker is
    <|im_end|>; other common formats' markers are recognised too.
    """
    vocab = tok.get_vocab()
    ids = [vocab[t] for t in _END_OF_TURN_TOKENS if t in vocab]
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return list(dict.fromkeys(ids))  # dedupe (Qwen's eos *is* <|im_end|>), keep order
