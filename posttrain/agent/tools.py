"""Tools an agent can call: a schema, argument validation, a time-limited call, the toy tools.

A `Tool` is a name, a description, a JSON-schema `parameters` object and a Python function;
`tool.schema()` is the OpenAI / Hugging Face `{"type": "function", "function": {...}}` dict
that chat templates take as `tools=`. `call(tool, arguments, time_limit_s)` never raises and
never hangs: a bad argument, an exception inside the tool or an overrun all come back as a
`ToolResult` with `error=True` and content "error: <why>", which is what the model then reads.

A user's own tool, named "package.module:attribute" (`load_tool`), is either
- a `Tool` instance (the dataclass below): `my_tool = Tool("name", "what it does", {...}, fn)`;
- or a function with a `tool_schema` attribute: the OpenAI dict, or just its "function" part
  (`{"name"?, "description"?, "parameters"}`; the name defaults to the function's).

    def add(a: int, b: int) -> int:
        return a + b
    add.tool_schema = {"description": "Add two integers.", "parameters": {"type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}

Toy tools over the world (`toy_tools(world, names)`): `calculator` (the world's SFT schema),
`lookup` (an attribute of any entity, known or unknown: with the tool, "I don't know" is no
longer the right answer) and `flaky_lookup` (the same, but a fixed share of argument sets always
fails, so a model must cope with a tool error).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # what OpenAI allows in a function name


@dataclass(frozen=True)
class ToolResult:
    content: str  # what the tool message says; "error: <why>" when error
    error: bool


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # a JSON schema of type "object": properties, required
    fn: Callable[..., Any]

    def __post_init__(self):
        check_schema({"name": self.name, "description": self.description,
                      "parameters": self.parameters})  # fmt: skip

    def schema(self) -> dict:
        """The OpenAI / Hugging Face tool dict that `apply_chat_template(tools=...)` takes."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    @classmethod
    def from_schema(cls, schema: dict, fn: Callable[..., Any], default_name: str = "") -> Tool:
        """A tool from an OpenAI tool dict, or its "function" part, and the function to run."""
        if not isinstance(schema, dict):
            raise ValueError(f"a tool schema must be a dict, got {type(schema).__name__}")
        if schema.get("type") == "function" and "function" in schema:
            schema = schema["function"]
        schema = {"name": default_name, "description": "", **schema}
        check_schema(schema)
        return cls(schema["name"], schema["description"], schema["parameters"], fn)


def check_schema(fn_schema: dict) -> None:
    """Raise ValueError naming the field if `fn_schema` ({name, description, parameters}) is not
    a usable function schema."""
    name = fn_schema.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"tool name {name!r} must be 1-64 of letters, digits, '_', '.', '-'")
    if not isinstance(fn_schema.get("description"), str):
        raise ValueError(f"tool {name}: description must be a string")
    params = fn_schema.get("parameters")
    if not isinstance(params, dict) or params.get("type") != "object":
        raise ValueError(f"tool {name}: parameters must be a JSON schema with type 'object'")
    props = params.get("properties", {})
    if not isinstance(props, dict) or not all(isinstance(p, dict) for p in props.values()):
        raise ValueError(f"tool {name}: parameters.properties must map names to schemas")
    required = params.get("required", [])
    if not isinstance(required, list) or not set(required) <= set(props):
        raise ValueError(
            f"tool {name}: parameters.required must list names of properties, got {required!r}"
        )


def _json_type(v: Any) -> str:
    for t in ("boolean", "integer", "number", "string", "array", "object", "null"):
        if JSON_TYPES[t](v):
            return t
    return type(v).__name__


def validate_arguments(tool: Tool, arguments: Any) -> str | None:
    """Why `arguments` do not fit the tool's schema (one clear sentence), or None if they do.

    Checks: a JSON object; every required key; no key outside `properties` (unless
    additionalProperties is true); each value's type (integer, number, string, boolean, array,
    object, null, or a list of them) and enum."""
    if not isinstance(arguments, dict):
        return f"arguments of {tool.name} must be a JSON object, got {_json_type(arguments)}"
    props = tool.parameters.get("properties", {})
    missing = [k for k in tool.parameters.get("required", []) if k not in arguments]
    if missing:
        return f"{tool.name}: missing required argument {', '.join(map(repr, missing))}"
    if tool.parameters.get("additionalProperties") is not True:
        extra = [k for k in arguments if k not in props]
        if extra:
            expected = ", ".join(props) or "none"
            return f"{tool.name}: unknown argument {extra[0]!r} (expected: {expected})"
    for key, value in arguments.items():
        spec = props.get(key, {})
        types = spec.get("type")
        types = [types] if isinstance(types, str) else types or []
        known = [t for t in types if t in JSON_TYPES]
        if known and not any(JSON_TYPES[t](value) for t in known):
            want = " or ".join(known)
            return (f"{tool.name}: argument {key!r} must be {want}, got "
                    f"{json.dumps(value)} ({_json_type(value)})")  # fmt: skip
        if "enum" in spec and value not in spec["enum"]:
            return f"{tool.name}: argument {key!r} must be one of {spec['enum']}, got {value!r}"
    return None


def format_value(value: Any) -> str:
    """A tool's return value as the text of its tool message."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def call(tool: Tool, arguments: Any, time_limit_s: float = 5.0) -> ToolResult:
    """Validate, then run tool.fn(**arguments) in a worker thread for at most time_limit_s.

    Never raises. Python cannot stop a thread: a tool that overruns is left running in the
    background (a daemon thread, so it never holds up the process's exit) and its eventual
    result is dropped; a tool that may hang for good should bound itself (a subprocess, a
    socket timeout)."""
    problem = validate_arguments(tool, arguments)
    if problem is not None:
        return ToolResult(f"error: {problem}", True)
    box: dict[str, Any] = {}

    def work():
        try:
            box["value"] = tool.fn(**arguments)
        except BaseException as e:  # noqa: BLE001 - whatever the tool raises is its result
            box["exception"] = e

    worker = threading.Thread(target=work, name=f"tool:{tool.name}", daemon=True)
    worker.start()
    worker.join(time_limit_s)
    if worker.is_alive():
        return ToolResult(f"error: {tool.name} timed out after {time_limit_s:g} s", True)
    if "exception" in box:
        e = box["exception"]
        return ToolResult(f"error: {str(e) or type(e).__name__}", True)
    return ToolResult(format_value(box["value"]), False)


# ---- toy tools ------------------------------------------------------------------------------


def calculator(a: int, op: str, b: int) -> int:
    """The toy world's calculator: op is "plus" or "minus" (as in its prompts), or "+" / "-"."""
    if op in ("plus", "+"):
        return a + b
    if op in ("minus", "-"):
        return a - b
    raise ValueError(f"unknown op {op!r} (one of: plus, minus)")


def calculator_tool() -> Tool:
    from posttrain.world.agent_tasks import CALCULATOR_TOOL

    return Tool.from_schema(CALCULATOR_TOOL, calculator)


def _entities(world) -> dict:
    entities = world.entities if hasattr(world, "entities") else world
    return {e.name.lower(): e for e in entities}


def _lookup_fn(world) -> Callable[[str, str], str]:
    from posttrain.world.lexicon import ATTRIBUTES

    by_name = _entities(world)

    def lookup(person: str, attribute: str) -> str:
        entity = by_name.get(person.strip().lower())
        if entity is None:
            raise LookupError(f"no person named {person}")
        if attribute not in ATTRIBUTES:
            raise LookupError(f"unknown attribute {attribute} (one of: {', '.join(ATTRIBUTES)})")
        return entity.attributes[attribute]

    return lookup


def lookup_tool(world) -> Tool:
    """lookup(person, attribute) over a World's entities (or a list of Entity), known or not:
    the schema the world's agent SFT conversations show (world.agent_tasks.LOOKUP_TOOL)."""
    from posttrain.world.agent_tasks import LOOKUP_TOOL

    return Tool.from_schema(LOOKUP_TOOL, _lookup_fn(world))


def flaky_fails(arguments: dict, fail_share: float, salt: str = "flaky") -> bool:
    """Whether flaky_lookup fails for these arguments: a hash of them, as a number in [0, 1),
    falls below fail_share (the same arguments always give the same answer)."""
    key = json.dumps([salt, arguments], sort_keys=True, ensure_ascii=False).encode()
    u = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
    return u < fail_share


FLAKY_ERROR = "the directory service is unavailable for this request"


def flaky_lookup_tool(world, fail_share: float = 0.3) -> Tool:
    """lookup, but the calls whose arguments hash into a `fail_share` of [0, 1) fail with
    FLAKY_ERROR: deterministic, so a retry with the same arguments fails again."""
    if not 0 <= fail_share <= 1:
        raise ValueError(f"flaky_lookup: fail_share={fail_share} must be in [0, 1]")
    lookup = _lookup_fn(world)

    def flaky_lookup(person: str, attribute: str) -> str:
        # the arguments as the lookup reads them: "jorpim " fails when "Jorpim" does
        key = {"person": person.strip().lower(), "attribute": attribute}
        if flaky_fails(key, fail_share):
            raise ConnectionError(FLAKY_ERROR)
        return lookup(person, attribute)

    base = lookup_tool(world)
    description = base.description + " May fail; then say you could not find out."
    return Tool("flaky_lookup", description, base.parameters, flaky_lookup)


TOY_TOOLS: dict[str, Callable[[Any], Tool]] = {
    "calculator": lambda world: calculator_tool(),
    "lookup": lookup_tool,
    "flaky_lookup": flaky_lookup_tool,
}
NEEDS_WORLD = ("lookup", "flaky_lookup")


def toy_tools(world, names: Iterable[str]) -> list[Tool]:
    """The toy tools called `names`, in that order (lookups need the world)."""
    out = []
    for name in names:
        if name not in TOY_TOOLS:
            raise ValueError(f"unknown toy tool {name!r}; known: {', '.join(TOY_TOOLS)}")
        if world is None and name in NEEDS_WORLD:
            raise ValueError(f"toy tool {name!r} needs the toy world (world=None)")
        out.append(TOY_TOOLS[name](world))
    return out


def load_tool(spec: str) -> Tool:
    """A user's tool from "package.module:attribute" (see the module docstring for the two
    forms it may take). Every failure is a ValueError that names `spec`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"tool {spec!r}: expected 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"tool {spec!r}: cannot import {module_name!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"tool {spec!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, Tool):
        return obj
    if not callable(obj):
        raise ValueError(f"tool {spec!r}: {attr} is a {type(obj).__name__}, not a function")
    schema = getattr(obj, "tool_schema", None)
    if schema is None:
        raise ValueError(
            f"tool {spec!r}: {attr} has no `tool_schema` attribute: set {attr}.tool_schema = "
            "{'description': ..., 'parameters': {JSON schema}}, or make it a "
            "posttrain.agent.tools.Tool"
        )
    try:
        return Tool.from_schema(schema, obj, default_name=getattr(obj, "__name__", ""))
    except ValueError as e:
        raise ValueError(f"tool {spec!r}: invalid tool_schema: {e}") from e


def resolve_tools(specs: Iterable[str], world=None) -> list[Tool]:
    """Tools from names of toy tools and "module:function" strings; names must be unique."""
    tools = [load_tool(s) if ":" in s else toy_tools(world, [s])[0] for s in specs]
    names = [t.name for t in tools]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"two tools are called {dupes[0]!r}: tool names must be unique")
    return tools
