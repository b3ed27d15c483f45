"""Loss masks on real chat templates (tests/templates/, sources in tests/templates/SOURCES.md).

For every template and conversation the trained runs must decode to exactly the assistant texts
that template renders for that conversation, each with the end-of-turn marker it writes after
the turn; no system, user or tool text is trained; the ids decode to the whole rendering; and
the method that found the spans is the expected one. The expected texts are written by hand from
reading each template (`Spec.reply` and the literals below), never computed by the code under
test; each is also checked to occur, in order, in the rendering.
"""

import copy
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from posttrain.data.chat import tokenize_chat

TEMPLATES = Path(__file__).parent / "templates"
P, M = "prefix", "rendered-markers"


@dataclass(frozen=True)
class Spec:
    bos: str | None
    eos: str
    reply: Callable[[str, bool], str]  # (content, is the last message) -> expected trained text
    methods: str  # expected method for 1, 2 and 3 assistant turns: "p" prefix, "m" markers
    specials: tuple[str, ...] = ()  # role and end-of-turn tokens, special as in the real model
    added: tuple[str, ...] = ()  # added but not special (<think>, <tool_call>, ...)
    methods_with_system: str | None = None  # where a system message changes the method
    system_raises: bool = False  # the template rejects system messages


IM = ("<|im_start|>", "<|im_end|>")
TOOL_TAGS = ("<tool_call>", "</tool_call>")
SPECS = {
    # vLLM's ChatML writes <|im_end|> only after a message that is not the last
    "chatml": Spec(None, "<|im_end|>", lambda c, last: c if last else c + "<|im_end|>", "pmm", IM),
    "qwen2.5": Spec(None, "<|im_end|>", lambda c, last: c + "<|im_end|>", "ppp", IM, TOOL_TAGS),
    # no reasoning given: the last turn (after the last user query) gets an empty think block
    "qwen3": Spec(
        None,
        "<|im_end|>",
        lambda c, last: ("<think>\n\n</think>\n\n" if last else "") + c + "<|im_end|>",
        "pmm",
        IM,
        (*TOOL_TAGS, "<think>", "</think>"),
    ),
    "llama3.1": Spec(
        "<|begin_of_text|>",
        "<|eot_id|>",
        lambda c, last: c + "<|eot_id|>",
        "ppp",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"),
    ),
    # Nemo renders the system message only inside a *last* user message: a conversation that ends
    # with an assistant turn loses it, and its earlier turns no longer render as prefixes
    "mistral-nemo": Spec(
        "<s>",
        "</s>",
        lambda c, last: c + "</s>",
        "ppp",
        (
            "[INST]",
            "[/INST]",
            "[TOOL_CALLS]",
            "[AVAILABLE_TOOLS]",
            "[/AVAILABLE_TOOLS]",
            "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]",
        ),
        methods_with_system="mmm",
    ),
    # no generation prompt, and the reply is " " + content: the model writes the space itself
    "mixtral": Spec("<s>", "</s>", lambda c, last: " " + c + "</s>", "ppp"),
    "gemma2": Spec(
        "<bos>",
        "<eos>",
        lambda c, last: c + "<end_of_turn>",
        "ppp",
        ("<start_of_turn>", "<end_of_turn>"),
        system_raises=True,
    ),
    # eos follows the last message only
    "phi3.5": Spec(
        "<s>",
        "<|endoftext|>",
        lambda c, last: c + "<|end|>" + ("\n<|endoftext|>" if last else ""),
        "pmm",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    ),
    # generation prompt "<｜Assistant｜><think>\n", but a rendered turn is "<｜Assistant｜>" + content
    "deepseek-r1": Spec(
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        lambda c, last: c + "<｜end▁of▁sentence｜>",
        "mmm",
        ("<｜User｜>", "<｜Assistant｜>"),
        ("<think>", "</think>"),
    ),
    # generation prompt "<|start|>assistant": the channel header is the model's to write
    "gpt-oss": Spec(
        "<|startoftext|>",
        "<|return|>",
        lambda c, last: "<|channel|>final<|message|>" + c + ("<|return|>" if last else "<|end|>"),
        "pmm",
        ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|call|>", "<|constrain|>"),
    ),
    "zephyr": Spec("<s>", "</s>", lambda c, last: c + "</s>", "ppp"),
    # no end-of-turn marker at all, and separators that depend on what follows
    "alpaca": Spec("<s>", "</s>", lambda c, last: c, "mmm"),
    "hermes3-tool-use": Spec(
        "<|begin_of_text|>",
        "<|im_end|>",
        lambda c, last: c + "<|im_end|>",
        "ppp",
        IM,
        (*TOOL_TAGS, "<tool_response>", "</tool_response>"),
    ),
}
NEEDS_TOOLS = {"hermes3-tool-use"}  # its template iterates over `tools` unconditionally

SYSTEM = "Be brief and exact."
USERS = ["What is 2 plus 3?", "And 4 plus 4?", "Now 10 plus 1?"]
REPLIES = ["The sum is 5.", "It is 8.\nDone.", "11"]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers.",
          "parameters": {"type": "object", "required": ["a", "b"], "properties": {
              "a": {"type": "integer", "description": "first"},
              "b": {"type": "integer", "description": "second"}}}}}]  # fmt: skip
CALL = {"id": "call12345", "type": "function", "function": {"name": "add", "arguments": {"a": 12, "b": 30}}}  # fmt: skip
TOOL_RESULT = "result: 42"
REASONING = ["Two plus three.", "Add the units.\nNo carry."]


@pytest.fixture(scope="module")
def tokenizers(small_tokenizer):
    """name -> the byte-level test tokenizer with that template and its special tokens."""
    out = {}
    for name, spec in SPECS.items():
        tok = copy.deepcopy(small_tokenizer)
        tokens = {"eos_token": spec.eos, "additional_special_tokens": list(spec.specials)}
        tok.add_special_tokens(tokens | ({"bos_token": spec.bos} if spec.bos else {}))
        tok.add_tokens(list(spec.added))
        tok.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
        out[name] = tok
    return out


def trained_runs(tok, ex) -> list[str]:
    runs, cur = [], []
    for i, m in zip(ex.input_ids, ex.loss_mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


def check(tok, messages, expected: list[str], method: str, tools=None):
    """The full set of checks for one conversation (see the module docstring)."""
    example = {"messages": messages, "tools": tools}
    ex = tokenize_chat(tok, example)
    full = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert tok.decode(ex.input_ids) == full
    at = 0
    for text in expected:  # the hand-written expectation is really in the rendering, in order
        at = full.index(text, at) + len(text)
    runs = trained_runs(tok, ex)
    assert runs == expected
    for m in messages:
        if m["role"] != "assistant" and m.get("content"):
            assert not any(m["content"] in r for r in runs), m
    assert ex.mask_method == method
    last = tokenize_chat(tok, example, train_on="last_assistant")
    assert trained_runs(tok, last) == expected[-1:]
    assert tok.decode(last.input_ids) == full


def conversation(n: int, system: bool) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM}] if system else []
    for k in range(n):
        msgs += [
            {"role": "user", "content": USERS[k]},
            {"role": "assistant", "content": REPLIES[k]},
        ]
    return msgs


@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("name", list(SPECS))
def test_plain_conversations(tokenizers, name, n, system):
    spec, tok = SPECS[name], tokenizers[name]
    msgs = conversation(n, system)
    tools = TOOLS if name in NEEDS_TOOLS else None
    if system and spec.system_raises:  # Gemma 2 rejects system messages: nothing to mask
        from jinja2 import TemplateError

        with pytest.raises(TemplateError, match="System role not supported"):
            tokenize_chat(tok, {"messages": msgs})
        return
    expected = [spec.reply(c, k == n - 1) for k, c in enumerate(REPLIES[:n])]
    methods = (spec.methods_with_system if system else None) or spec.methods
    check(tok, msgs, expected, {"p": P, "m": M}[methods[n - 1]], tools)


@pytest.mark.parametrize("name", ["llama3.1", "gemma2"])
def test_templates_that_trim_do_not_train_the_trimmed_whitespace(tokenizers, name):
    msgs = [{"role": "user", "content": " 2+3? "}, {"role": "assistant", "content": "\n 5 \n"}]
    end = {"llama3.1": "<|eot_id|>", "gemma2": "<end_of_turn>"}[name]
    check(tokenizers[name], msgs, ["5" + end], P)


def qwen3_reasoning(inline: bool) -> list[dict]:
    """Reasoning in a past turn (before the last user query) and in the last turn."""
    msgs = []
    for user, reply, why in zip(USERS, REPLIES[:2], REASONING, strict=False):
        content = f"<think>\n{why}\n</think>\n\n{reply}" if inline else reply
        extra = {} if inline else {"reasoning_content": why}
        msgs += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": content, **extra},
        ]
    return msgs


@pytest.mark.parametrize("inline", [False, True], ids=["reasoning_content", "think-in-content"])
def test_qwen3_reasoning_is_trained_only_where_the_template_renders_it(tokenizers, inline):
    # the past turn's reasoning is dropped; the last turn's is rendered in a think block
    expected = ["The sum is 5.<|im_end|>",
                "<think>\nAdd the units.\nNo carry.\n</think>\n\nIt is 8.\nDone.<|im_end|>"]  # fmt: skip
    check(tokenizers["qwen3"], qwen3_reasoning(inline), expected, M)


def test_qwen3_keeps_reasoning_of_every_turn_after_the_last_user_query(tokenizers):
    msgs = [
        {"role": "user", "content": "What is 12 plus 30?"},
        {"role": "assistant", "content": "", "reasoning_content": "Use the add tool.", "tool_calls": [CALL]},
        {"role": "tool", "content": TOOL_RESULT},
        {"role": "assistant", "content": "It is 42.", "reasoning_content": "The tool said 42."},
    ]  # fmt: skip
    expected = [
        '<think>\nUse the add tool.\n</think>\n\n<tool_call>\n{"name": "add", "arguments": {"a": 12, "b": 30}}\n</tool_call><|im_end|>',
        "<think>\nThe tool said 42.\n</think>\n\nIt is 42.<|im_end|>",
    ]  # fmt: skip
    check(tokenizers["qwen3"], msgs, expected, P, TOOLS)


@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
def test_deepseek_r1_drops_reasoning_from_every_turn(tokenizers, system):
    # content.split('</think>')[-1] keeps the "\n\n" that followed </think>
    msgs = qwen3_reasoning(inline=True)
    msgs = [{"role": "system", "content": SYSTEM}, *msgs] if system else msgs
    expected = [
        "\n\nThe sum is 5.<｜end▁of▁sentence｜>",
        "\n\nIt is 8.\nDone.<｜end▁of▁sentence｜>",
    ]
    check(tokenizers["deepseek-r1"], msgs, expected, M)


def test_gpt_oss_trains_the_analysis_channel_of_the_last_turn_only(tokenizers):
    msgs = qwen3_reasoning(inline=False)
    msgs = [{k: v for k, v in m.items() if k != "reasoning_content"}
            | ({"thinking": m["reasoning_content"]} if "reasoning_content" in m else {})
            for m in msgs]  # fmt: skip
    expected = [
        "<|channel|>final<|message|>The sum is 5.<|end|>",
        "<|channel|>analysis<|message|>Add the units.\nNo carry.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>It is 8.\nDone.<|return|>",
    ]
    check(tokenizers["gpt-oss"], msgs, expected, M)


TOOL_CONVERSATION = [
    {"role": "system", "content": "Use the tools."},
    {"role": "user", "content": "What is 12 plus 30?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call12345", "content": TOOL_RESULT},
    {"role": "assistant", "content": "It is 42."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You are welcome."},
]
QWEN_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 12, "b": 30}}\n</tool_call>'
TOOL_CASES = {  # name -> (rendered tool call turn, end of turn, end of the last turn, method)
    "qwen2.5": (QWEN_CALL + "<|im_end|>", "<|im_end|>", "<|im_end|>", P),
    # the tool response renders "\n</tool_response>\n" unless it is the last message
    "hermes3-tool-use": (QWEN_CALL + "<|im_end|>", "<|im_end|>", "<|im_end|>", M),
    "llama3.1": ('{"name": "add", "parameters": {"a": 12, "b": 30}}<|eot_id|>', "<|eot_id|>", "<|eot_id|>", P),
    "mistral-nemo": ('[TOOL_CALLS][{"name": "add", "arguments": {"a": 12, "b": 30}, "id": "call12345"}]</s>',
                     "</s>", "</s>", M),
    # the turn after the generation prompt "<|start|>assistant" is the recipient and channel
    "gpt-oss": (' to=functions.add<|channel|>commentary json<|message|>{"a": 12, "b": 30}<|call|>',
                "<|end|>", "<|return|>", M),
}  # fmt: skip


@pytest.mark.parametrize("name", list(TOOL_CASES))
def test_tool_calls_are_trained_tool_results_are_not(tokenizers, name):
    call, end, last_end, method = TOOL_CASES[name]
    prefix = "<|channel|>final<|message|>" if name == "gpt-oss" else ""
    expected = [call, prefix + "It is 42." + end, prefix + "You are welcome." + last_end]
    check(tokenizers[name], TOOL_CONVERSATION, expected, method, TOOLS)


def test_data_inspect_json_reports_the_mask_method(tokenizers, tmp_path):
    """End to end through `posttrain data inspect` on a saved tokenizer directory: the reader
    keeps the `thinking` field, and the mask is the one tokenize_chat gives."""
    from posttrain.data.inspect import inspect
    from posttrain.models.tokenizer import save_tokenizer

    save_tokenizer(tokenizers["gpt-oss"], tmp_path / "tok")
    msgs = conversation(2, system=True)
    msgs[-1] = {**msgs[-1], "thinking": REASONING[1]}
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": msgs}) + "\n")
    out = io.StringIO()
    inspect(tmp_path / "tok", data, as_json=True, stream=out)
    rec = json.loads(out.getvalue())
    ex = tokenize_chat(tokenizers["gpt-oss"], {"messages": msgs})
    assert rec == {"input_ids": ex.input_ids, "loss_mask": ex.loss_mask, "mask_method": M}
    assert trained_runs(tokenizers["gpt-oss"], ex)[-1] == (
        "<|channel|>analysis<|message|>Add the units.\nNo carry.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>It is 8.\nDone.<|return|>"
    )
    out = io.StringIO()
    inspect(tmp_path / "tok", data, stream=out)
    assert "(mask method: rendered-markers)" in out.getvalue()
