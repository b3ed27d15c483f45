"""Loss masks derived from the chat template itself, checked on structurally different templates."""

import pytest

from posttrain.data.chat import TemplateError, fit_length, tokenize_chat

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4 plus 4?"},
    {"role": "assistant", "content": "8"},
]

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
DEFAULT_SYSTEM = (
    "{% if messages[0].role != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Mistral-like: no role headers for the assistant, tool calls as a JSON list after a marker.
TOOLS_INLINE = (
    "{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
    "{% elif m.role == 'tool' %}[TOOL_RESULTS] {{ m.content }} [/TOOL_RESULTS]"
    "{% elif m.role == 'assistant' %}{% if m.tool_calls %}[TOOL_CALLS] {{ m.tool_calls | map(attribute='function') | list | tojson }}"
    "{% else %}{{ m.content }}{% endif %}{{ eos_token }}{% endif %}{% endfor %}"
)
NOT_PREFIX = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}{% if loop.last %} [END]{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def trained_text(tok, ex):
    """The decoded runs of trained tokens."""
    runs, cur = [], []
    for i, m in zip(ex.input_ids, ex.loss_mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


@pytest.fixture
def tok(small_tokenizer):
    import copy

    t = copy.deepcopy(small_tokenizer)
    yield t


def test_chatml_masks_exactly_assistant_content_and_end_token(tok):
    ex = tokenize_chat(tok, {"messages": CONV})
    assert trained_text(tok, ex) == ["5<|im_end|>", "8<|im_end|>"]
    # the ids are the whole rendering, unchanged
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(CONV, tokenize=False)
    # and agree with the template's own {% generation %} mask
    ref = tok.apply_chat_template(CONV, return_dict=True, return_assistant_tokens_mask=True)
    assert ex.input_ids == ref["input_ids"]
    assert ex.loss_mask == ref["assistant_masks"]


def test_last_assistant_only(tok):
    ex = tokenize_chat(tok, {"messages": CONV}, train_on="last_assistant")
    assert trained_text(tok, ex) == ["8<|im_end|>"]


def test_llama3_style_headers(tok):
    tok.chat_template = LLAMA3
    ex = tokenize_chat(tok, {"messages": CONV})
    assert trained_text(tok, ex) == ["5<|eot_id|>", "8<|eot_id|>"]
    assert tok.decode(ex.input_ids).startswith("<|bos|><|start_header_id|>system")


def test_template_that_injects_a_default_system_prompt(tok):
    tok.chat_template = DEFAULT_SYSTEM
    ex = tokenize_chat(tok, {"messages": CONV[1:]})
    assert trained_text(tok, ex) == ["5<|im_end|>", "8<|im_end|>"]
    assert "You are a helpful assistant." in tok.decode(ex.input_ids)


def test_tool_calls_are_trained_tool_results_are_not(tok):
    conv = [
        {"role": "user", "content": "What is 12 plus 30?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 12, "b": 30}}}]},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "42"},
    ]  # fmt: skip
    ex = tokenize_chat(tok, {"messages": conv})
    assert trained_text(tok, ex) == [
        '<tool_call>\n{"name": "add", "arguments": {"a": 12, "b": 30}}\n</tool_call><|im_end|>',
        "42<|im_end|>",
    ]
    tok.chat_template = TOOLS_INLINE
    ex = tokenize_chat(tok, {"messages": conv})
    assert trained_text(tok, ex) == [
        '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 12, "b": 30}}]<|endoftext|>',
        "42<|endoftext|>",
    ]


def test_inconsistent_template_is_an_error(tok):
    tok.chat_template = NOT_PREFIX
    with pytest.raises(TemplateError, match="not prefix-consistent at message 2"):
        tokenize_chat(tok, {"messages": CONV})


def test_truncate_or_drop_overlong(tok):
    ex = tokenize_chat(tok, {"messages": CONV})
    n = len(ex)
    assert fit_length(ex, n, "drop") is ex
    assert fit_length(ex, n - 1, "drop") is None
    cut = fit_length(ex, n - 1, "truncate")
    assert cut.truncated and len(cut) == n - 1 and cut.input_ids == ex.input_ids[: n - 1]
    first_trained = ex.loss_mask.index(1)
    assert fit_length(ex, first_trained, "truncate") is None  # nothing left to learn
