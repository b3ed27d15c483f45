"""Agent tools and tool-call parsing as pure functions: schema validation, time-limited calls,
the toy lookups over a small world, user tools loaded by "module:function", and the parser's
handling of well-formed and malformed <tool_call> blocks."""

import json
import sys
import textwrap
import time

import pytest

from posttrain.agent.parse import parse_turn
from posttrain.agent.tools import (
    FLAKY_ERROR,
    Tool,
    ToolResult,
    calculator_tool,
    call,
    flaky_fails,
    flaky_lookup_tool,
    load_tool,
    lookup_tool,
    resolve_tools,
    toy_tools,
    validate_arguments,
)
from posttrain.world import World, WorldConfig
from posttrain.world.lexicon import ATTRIBUTES
from posttrain.world.world import CALCULATOR_TOOL

PICK = Tool(
    "pick",
    "Pick a colour.",
    {
        "type": "object",
        "properties": {
            "colour": {"type": "string", "enum": ["red", "blue"]},
            "weight": {"type": "number"},
            "loud": {"type": "boolean"},
        },
        "required": ["colour"],
    },
    lambda colour, weight=1.0, loud=False: f"{colour} x{weight}" + ("!" if loud else ""),
)


@pytest.fixture(scope="module")
def world():
    return World(WorldConfig(corpus_docs=20, heldout_docs=5, n_train=5, n_rl=5, n_eval=5))


# ---- tools ----------------------------------------------------------------------------------


def test_calculator_reuses_the_worlds_schema():
    assert calculator_tool().schema() == CALCULATOR_TOOL
    assert call(calculator_tool(), {"a": 40, "op": "plus", "b": 2}) == ToolResult("42", False)
    assert call(calculator_tool(), {"a": 40, "op": "-", "b": 2}) == ToolResult("38", False)


@pytest.mark.parametrize(
    "tool, args, error",
    [
        (calculator_tool(), {"a": 1, "op": "plus"}, "calculator: missing required argument 'b'"),
        (calculator_tool(), {"a": "1", "op": "plus", "b": 2},
         "calculator: argument 'a' must be integer, got \"1\" (string)"),
        (calculator_tool(), {"a": True, "op": "plus", "b": 2},  # a bool is not a JSON integer
         "calculator: argument 'a' must be integer, got true (boolean)"),
        (calculator_tool(), {"a": 1.5, "op": "plus", "b": 2},
         "calculator: argument 'a' must be integer, got 1.5 (number)"),
        (calculator_tool(), {"a": 1, "op": "plus", "b": 2, "c": 3},
         "calculator: unknown argument 'c' (expected: a, op, b)"),
        (calculator_tool(), [1, "plus", 2], "arguments of calculator must be a JSON object, got array"),
        (PICK, {"colour": "green"}, "pick: argument 'colour' must be one of ['red', 'blue'], got 'green'"),
        (PICK, {"colour": "red", "loud": 1}, "pick: argument 'loud' must be boolean, got 1 (integer)"),
    ],
)  # fmt: skip
def test_validation_errors(tool, args, error):
    assert validate_arguments(tool, args) == error
    assert call(tool, args) == ToolResult(f"error: {error}", True)  # never runs the function


def test_valid_arguments_run():
    assert validate_arguments(PICK, {"colour": "red", "weight": 2}) is None  # int is a number
    assert call(PICK, {"colour": "blue", "weight": 0.5, "loud": True}).content == "blue x0.5!"


def test_exception_in_a_tool_becomes_an_error_result():
    assert call(calculator_tool(), {"a": 1, "op": "times", "b": 2}) == ToolResult(
        "error: unknown op 'times' (one of: plus, minus)", True
    )
    boom = Tool("boom", "", {"type": "object"}, lambda: 1 / 0)
    assert call(boom, {}) == ToolResult("error: division by zero", True)


def test_a_tool_that_overruns_gives_an_error_within_the_time_limit():
    sleepy = Tool("sleepy", "", {"type": "object"}, lambda: time.sleep(5) or "late")
    t0 = time.perf_counter()
    result = call(sleepy, {}, time_limit_s=0.2)
    assert time.perf_counter() - t0 < 1.0
    assert result == ToolResult("error: sleepy timed out after 0.2 s", True)


def test_bad_schemas_are_errors_naming_the_field():
    with pytest.raises(ValueError, match="tool name 'a b'"):
        Tool("a b", "", {"type": "object"}, print)
    with pytest.raises(ValueError, match="parameters must be a JSON schema with type 'object'"):
        Tool("t", "", {"type": "string"}, print)
    with pytest.raises(ValueError, match=r"required must list names of properties, got \['x'\]"):
        Tool("t", "", {"type": "object", "properties": {}, "required": ["x"]}, print)


def test_lookup_answers_known_and_unknown_entities(world):
    lookup = lookup_tool(world)
    known = next(e for e in world.entities if e.known)
    unknown = next(e for e in world.entities if not e.known)
    for e in (known, unknown):
        for a in ATTRIBUTES:
            assert call(lookup, {"person": e.name, "attribute": a}) == ToolResult(
                e.attributes[a], False
            )
    assert call(lookup, {"person": "Nobodyx", "attribute": "town"}) == ToolResult(
        "error: no person named Nobodyx", True
    )
    assert call(lookup, {"person": known.name, "attribute": "age"}) == ToolResult(
        "error: unknown attribute age (one of: town, occupation, colour, pet)", True
    )


def test_flaky_lookup_fails_on_a_fixed_share_of_argument_sets(world):
    flaky, lookup = flaky_lookup_tool(world, fail_share=0.3), lookup_tool(world)
    args = [{"person": e.name, "attribute": a} for e in world.entities for a in ATTRIBUTES]
    results = [call(flaky, x) for x in args]
    assert results == [call(flaky, x) for x in args]  # deterministic: a retry fails again
    failed = [r.error for r in results]
    assert 0.25 < sum(failed) / len(args) < 0.35  # 960 argument sets, share 0.3
    for x, r, f in zip(args, results, failed, strict=True):
        assert f == flaky_fails(x | {"person": x["person"].lower()}, 0.3)  # the name as read
        assert r == (ToolResult(f"error: {FLAKY_ERROR}", True) if f else call(lookup, x))
    assert not any(call(flaky_lookup_tool(world, 0.0), x).error for x in args[:50])
    # the same person written another way fails (or not) the same way: no free retry
    shouty = [x | {"person": f" {x['person'].upper()} "} for x in args[:100]]
    assert [call(flaky, x).error for x in shouty] == failed[:100]
    assert all(call(flaky_lookup_tool(world, 1.0), x).error for x in args[:50])


def test_toy_tools_by_name(world):
    names = ["lookup", "calculator", "flaky_lookup"]
    assert [t.name for t in toy_tools(world, names)] == names
    assert [t.name for t in toy_tools(None, ["calculator"])] == ["calculator"]
    with pytest.raises(ValueError, match="toy tool 'lookup' needs the toy world"):
        toy_tools(None, ["lookup"])
    with pytest.raises(ValueError, match="unknown toy tool 'search'; known: calculator, lookup"):
        toy_tools(world, ["search"])


USER_TOOLS = """
from posttrain.agent.tools import Tool

def add(a, b):
    return {"sum": a + b}

add.tool_schema = {"description": "Add.", "parameters": {"type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}

def shout(text):
    return text.upper()

SHOUT = Tool("shout", "Upper-case.", {"type": "object",
             "properties": {"text": {"type": "string"}}, "required": ["text"]}, shout)

def bare(x):
    return x

def broken(x):
    return x

broken.tool_schema = {"parameters": {"type": "object", "required": ["y"]}}
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = "agent_user_tools_mod"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_TOOLS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def test_load_a_users_tool(user_module, world):
    add = load_tool(f"{user_module}:add")
    assert add.name == "add" and add.schema()["function"]["description"] == "Add."
    assert call(add, {"a": 2, "b": 3}) == ToolResult('{"sum": 5}', False)
    shout = load_tool(f"{user_module}:SHOUT")
    assert call(shout, {"text": "hi"}) == ToolResult("HI", False)
    tools = resolve_tools(["calculator", f"{user_module}:add", "lookup"], world=world)
    assert [t.name for t in tools] == ["calculator", "add", "lookup"]
    with pytest.raises(ValueError, match="two tools are called 'add'"):
        resolve_tools([f"{user_module}:add", f"{user_module}:add"])


@pytest.mark.parametrize(
    "attr, error",
    [
        ("bare", "tool '{m}:bare': bare has no `tool_schema` attribute"),
        ("broken", r"tool '{m}:broken': invalid tool_schema: tool broken: parameters.required"),
        ("missing", "tool '{m}:missing': {m} has no attribute 'missing'"),
        ("Tool.__name__", r"tool '{m}:Tool.__name__': Tool.__name__ is a str, not a function"),
    ],
)
def test_load_tool_errors_name_the_path(user_module, attr, error):
    with pytest.raises(ValueError, match=error.format(m=user_module)):
        load_tool(f"{user_module}:{attr}")


def test_load_tool_bad_paths():
    with pytest.raises(ValueError, match="tool 'no_colon': expected 'package.module:function'"):
        load_tool("no_colon")
    with pytest.raises(
        ValueError, match="tool 'no_such_mod_xyz:f': cannot import 'no_such_mod_xyz'"
    ):
        load_tool("no_such_mod_xyz:f")


# ---- parsing --------------------------------------------------------------------------------

TOOLS = {"calculator": calculator_tool(), "pick": PICK}


def block(obj) -> str:
    body = obj if isinstance(obj, str) else json.dumps(obj)
    return f"<tool_call>\n{body}\n</tool_call>"


def test_parse_plain_answer():
    parsed = parse_turn("  The answer is 5.\n", TOOLS)
    assert parsed.content == "The answer is 5." and parsed.tool_calls == []


def test_parse_one_and_two_calls():
    one = parse_turn(block({"name": "calculator", "arguments": {"a": 1, "op": "plus", "b": 2}}),
                     TOOLS)  # fmt: skip
    assert one.content == ""
    [c] = one.tool_calls
    assert (c.name, c.arguments, c.valid) == ("calculator", {"a": 1, "op": "plus", "b": 2}, True)
    assert c.message() == {"type": "function", "function": {"name": "calculator",
                           "arguments": {"a": 1, "op": "plus", "b": 2}}}  # fmt: skip
    two = parse_turn(
        block({"name": "pick", "arguments": {"colour": "red"}})
        + "\n"
        + block({"name": "pick", "arguments": '{"colour": "blue"}'}),  # OpenAI's string form
        TOOLS,
    )
    assert [(c.name, c.arguments, c.error) for c in two.tool_calls] == [
        ("pick", {"colour": "red"}, None),
        ("pick", {"colour": "blue"}, None),
    ]


def test_parse_text_around_blocks():
    text = ("Let me compute.\n" + block({"name": "pick", "arguments": {"colour": "red"}})
            + " and then\n" + block({"name": "pick", "arguments": {"colour": "blue"}}) + "\nDone.")  # fmt: skip
    parsed = parse_turn(text, TOOLS)
    assert parsed.content == "Let me compute.\nand then\nDone."
    assert [c.arguments["colour"] for c in parsed.tool_calls] == ["red", "blue"]


@pytest.mark.parametrize(
    "body, name, error",
    [
        ('{"name": "pick", "arguments": {"colour": "red"}', "",
         "tool call is not valid JSON (Expecting ',' delimiter: line 1 column 48 (char 47))"),
        ('["pick"]', "", "tool call must be a JSON object with name and arguments"),
        ('{"arguments": {"colour": "red"}}', "", 'tool call has no "name"'),
        ('{"name": "pick"}', "pick", 'tool call to pick has no "arguments"'),
        ('{"name": "search", "arguments": {"q": "x"}}', "search",
         "unknown tool 'search' (available: calculator, pick)"),
        ('{"name": "pick", "arguments": {"colour": "green"}}', "pick",
         "pick: argument 'colour' must be one of ['red', 'blue'], got 'green'"),
        ('{"name": "calculator", "arguments": {"a": 1}}', "calculator",
         "calculator: missing required argument 'op', 'b'"),
    ],
)  # fmt: skip
def test_parse_malformed_calls_are_invalid_with_the_reason(body, name, error):
    parsed = parse_turn("Hmm.\n" + block(body), TOOLS)
    [c] = parsed.tool_calls
    assert parsed.content == "Hmm." and (c.name, c.error, c.valid) == (name, error, False)


def test_parse_unclosed_block_is_an_invalid_call():
    parsed = parse_turn('ok <tool_call>\n{"name": "pick", "argu', TOOLS)
    [c] = parsed.tool_calls
    assert parsed.content == "ok"
    assert c.error == "unclosed <tool_call> block (no </tool_call>)" and c.arguments == (
        '{"name": "pick", "argu'
    )
