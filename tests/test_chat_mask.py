"""Loss masks derived from the chat template itself, checked on structurally different templates
(real models' templates: tests/test_chat_templates.py)."""

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
# The same, but dropping assistant content (nothing to locate) or upper-casing it (the text the
# template renders is no longer the message's).
DROPS_CONTENT = NOT_PREFIX.replace("{{ m.content }}", "{{ m.content if m.role != 'assistant' }}")
TRANSFORMS_CONTENT = NOT_PREFIX.replace("{{ m.content }}", "{{ m.content | upper }}")
# Qwen3-like: an empty think block on the last turn only, inside {% generation %} blocks.
GENERATION_NOT_PREFIX = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
    "{% if loop.last %}<think>\n\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m.content }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
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


def test_assistant_speaking_first_trains_neither_the_header_nor_a_default_system_prompt(tok):
    conv = [{"role": "assistant", "content": "Hi."}, *CONV[1:]]
    # ours (with {% generation %} blocks), and one that injects a default system prompt
    for template, method in ((None, "generation-markers"), (DEFAULT_SYSTEM, "rendered-markers")):
        tok.chat_template = template or tok.chat_template
        ex = tokenize_chat(tok, {"messages": conv})
        assert trained_text(tok, ex) == ["Hi.<|im_end|>", "5<|im_end|>", "8<|im_end|>"]
        assert ex.mask_method == method


def test_content_parts_are_located_too(tok):
    tok.chat_template = NOT_PREFIX.replace(
        "{{ m.content }}",
        "{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}"
        "{{ p.text }}{% endfor %}{% endif %}",
    )
    conv = [*CONV[:2], {"role": "assistant", "content": [{"type": "text", "text": "Five"},
            {"type": "text", "text": " (5)"}]}, *CONV[3:]]  # fmt: skip
    ex = tokenize_chat(tok, {"messages": conv})
    assert trained_text(tok, ex) == ["Five (5)", "8 [END]"]


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


def test_template_that_is_not_prefix_consistent_is_masked_from_the_whole_rendering(tok):
    # " [END]" follows only the last message (the newline after {% endif %} is trimmed), so "5"
    # is not followed by it; no special token ends a turn here, so nothing is added to "5"
    tok.chat_template = NOT_PREFIX
    ex = tokenize_chat(tok, {"messages": CONV})
    assert ex.mask_method == "rendered-markers"
    assert trained_text(tok, ex) == ["5", "8 [END]"]
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(CONV, tokenize=False)


def test_generation_markers_are_used_when_prefixes_disagree(tok):
    tok.chat_template = GENERATION_NOT_PREFIX
    ex = tokenize_chat(tok, {"messages": CONV})
    assert ex.mask_method == "generation-markers"
    assert trained_text(tok, ex) == ["5<|im_end|>", "<think>\n\n</think>\n\n8<|im_end|>"]
    assert trained_text(tok, tokenize_chat(tok, {"messages": CONV}, "last_assistant")) == [
        "<think>\n\n</think>\n\n8<|im_end|>"
    ]


@pytest.mark.parametrize(
    ("template", "match"),
    [
        (DROPS_CONTENT, "message 2: the chat template renders none of this assistant message"),
        (TRANSFORMS_CONTENT, "differently once the assistant texts are replaced by markers"),
    ],
    ids=["drops-content", "transforms-content"],
)
def test_spans_that_cannot_be_located_are_an_error_not_a_guess(tok, template, match):
    tok.chat_template = template
    with pytest.raises(TemplateError, match=match):
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
