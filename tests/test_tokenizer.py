"""Tests for the toy tokenizer and its ChatML chat template (posttrain/models/tokenizer.py)."""

import random

import pytest

from posttrain.models.tokenizer import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    TOOL_CALL_TOKENS,
    end_of_turn_ids,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current temperature in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}

# system, user, assistant (tool call, no content), tool, assistant (content + bare-form call
# with string arguments), tool, assistant.
CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {
        "role": "assistant",
        "content": "And Rome?",
        "tool_calls": [{"name": "get_weather", "arguments": '{"city": "Rome"}'}],
    },
    {"role": "tool", "content": '{"temp": 25}'},
    {"role": "assistant", "content": "Paris 21, Rome 25."},
]

EXPECTED = (
    "<|im_start|>system\nYou are helpful.<|im_end|>\n"
    "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
    "<|im_start|>assistant\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    "<|im_end|>\n"
    '<|im_start|>tool\n{"temp": 21}<|im_end|>\n'
    "<|im_start|>assistant\nAnd Rome?\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    "<|im_end|>\n"
    '<|im_start|>tool\n{"temp": 25}<|im_end|>\n'
    "<|im_start|>assistant\nParis 21, Rome 25.<|im_end|>\n"
)

# The spans the assistant produces: content, tool calls, <|im_end|>; no header, no trailing "\n".
ASSISTANT_SPANS = [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
    'And Rome?\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    "<|im_end|>",
    "Paris 21, Rome 25.<|im_end|>",
]


def _corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    names = ["Alice", "Bob", "Carol", "the robot", "a cat"]
    verbs = ["has", "bought", "sold", "counted", "found"]
    things = ["apples", "coins", "books", "stars", "pebbles"]
    texts = []
    for _ in range(n):
        a, b = rng.randint(0, 99999), rng.randint(0, 999)
        texts.append(
            f"{rng.choice(names)} {rng.choice(verbs)} {a} {rng.choice(things)}, "
            f"then {b} more; total: {a + b}!\nWhat is {a} + {b}? It is {a + b}."
        )
    return texts


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(_corpus(), vocab_size=512)


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize(
    "text",
    [
        "Alice has 12345 apples.",
        "What is 3 + 4? It is 7!",
        "  leading and   multiple   spaces  ",
        "line one\nline two\n\n\ttabbed\r\n",
        "punctuation: ;,.!?-_()[]{}'\"`~@#$%^&*=/\\|",
        "café ✓ naïve 日本語 🙂",
        "literal <| and |> and <|im_end without the bar, <|not_a_token|>",
        "",
    ],
)
def test_round_trip_is_exact(tok, text):
    assert tok.decode(_ids(tok, text)) == text


def test_digits_are_single_tokens(tok):
    ids = _ids(tok, "12345")
    assert len(ids) == 5
    assert [tok.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]


def test_no_tokens_added_automatically(tok):
    # No post-processor: add_special_tokens=True adds no BOS/EOS either.
    assert tok.encode("hi 1", add_special_tokens=True) == _ids(tok, "hi 1")


def test_special_tokens_are_single_ids(tok):
    ids = [_ids(tok, s) for s in SPECIAL_TOKENS.values()]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == len(SPECIAL_TOKENS)
    assert tok.bos_token == SPECIAL_TOKENS["bos"]
    assert tok.eos_token == SPECIAL_TOKENS["eos"]
    assert tok.pad_token == SPECIAL_TOKENS["pad"]
    assert set(SPECIAL_TOKENS.values()) <= set(tok.all_special_tokens)
    # Embedded in text, the special token is still one id, surrounded by ordinary text.
    im_end = tok.convert_tokens_to_ids(SPECIAL_TOKENS["im_end"])
    assert _ids(tok, "ok<|im_end|>") == _ids(tok, "ok") + [im_end]


def test_tool_call_tokens_are_single_but_not_special(tok):
    for t in TOOL_CALL_TOKENS:
        assert len(_ids(tok, t)) == 1
        assert t not in tok.all_special_tokens
    ids = _ids(tok, "<tool_call>x</tool_call><|im_end|>")
    # skip_special_tokens drops <|im_end|> but keeps the tool-call markers (parseable output).
    assert tok.decode(ids, skip_special_tokens=True) == "<tool_call>x</tool_call>"


def test_normal_text_never_produces_special_ids(tok):
    reserved = {tok.convert_tokens_to_ids(t) for t in [*SPECIAL_TOKENS.values(), *TOOL_CALL_TOKENS]}
    for text in [*_corpus(50), "<|im_start", "im_end|>", "< tool_call >", "<|bos |>"]:
        assert not reserved & set(_ids(tok, text)), text


def test_chat_template_renders_exactly(tok):
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED


def test_content_key_absent_equals_none(tok):
    msgs = [dict(m) for m in CONVERSATION]
    del msgs[2]["content"]
    assert tok.apply_chat_template(msgs, tokenize=False) == EXPECTED


def test_tools_are_appended_to_existing_system_message(tok):
    text = tok.apply_chat_template(CONVERSATION, tools=[WEATHER_TOOL], tokenize=False)
    system = (
        "<|im_start|>system\nYou are helpful.\n\nYou can call these tools:\n"
        '{"type": "function", "function": {"name": "get_weather", '
        '"description": "Current temperature in a city.", "parameters": {"type": "object", '
        '"properties": {"city": {"type": "string"}}}}}\n'
        "<|im_end|>\n"
    )
    first_turn = "<|im_start|>system\nYou are helpful.<|im_end|>\n"
    assert text == system + EXPECTED.removeprefix(first_turn)


def test_tools_without_system_message_get_their_own_block(tok):
    msgs = [{"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs, tools=[WEATHER_TOOL, WEATHER_TOOL], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou can call these tools:\n{")
    assert text.count('"name": "get_weather"') == 2  # one tool per line
    assert text.endswith("}\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


def test_add_generation_prompt(tok):
    msgs = [{"role": "user", "content": "2 + 2?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n"


def test_unknown_role_raises(tok):
    with pytest.raises(Exception, match="Unknown role: narrator"):
        tok.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


def test_tokenized_template_equals_encoding_the_text(tok):
    # transformers 5: return_dict defaults to True, so ask for a plain list explicitly.
    ids = tok.apply_chat_template(CONVERSATION, return_dict=False)
    assert ids == _ids(tok, EXPECTED)
    enc = tok.apply_chat_template(CONVERSATION)  # the default is a BatchEncoding
    assert enc["input_ids"] == ids


def test_assistant_mask_covers_exactly_the_assistant_spans(tok):
    enc = tok.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert len(mask) == len(ids)
    # Split the masked tokens into maximal runs; each run decodes to one assistant span.
    runs, current = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert [tok.decode(r) for r in runs] == ASSISTANT_SPANS
    # Everything else (headers, user/system/tool turns, newlines after <|im_end|>) is unmasked.
    unmasked = "".join(tok.decode([i]) for i, m in zip(ids, mask, strict=True) if not m)
    expected_unmasked = EXPECTED
    for span in ASSISTANT_SPANS:
        expected_unmasked = expected_unmasked.replace(span, "", 1)
    assert unmasked == expected_unmasked


def test_save_load_round_trip(tok, tmp_path):
    out = tmp_path / "tokenizer"
    save_tokenizer(tok, out)
    loaded = load_tokenizer(out)
    text = "Bob has 407 coins.\ncafé <|im_end|>"
    assert _ids(loaded, text) == _ids(tok, text)
    assert loaded.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED
    assert loaded.model_max_length == tok.model_max_length
    assert loaded.padding_side == "right"
    assert end_of_turn_ids(loaded) == end_of_turn_ids(tok)
    assert load_tokenizer(str(out)).get_vocab() == tok.get_vocab()


def test_save_replaces_existing_dir_and_leaves_no_temp(tok, tmp_path):
    out = tmp_path / "tokenizer"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_tokenizer(tok, out)
    assert not (out / "stale.txt").exists()
    assert (out / "tokenizer.json").exists()
    save_tokenizer(tok, out)  # and again, over a complete tokenizer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]


def test_load_missing_dir_names_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(missing)


def test_end_of_turn_ids(tok):
    ids = end_of_turn_ids(tok)
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS["im_end"]) in ids
    assert tok.eos_token_id in ids
    assert len(ids) == len(set(ids)) == 2
