"""Tools: plain Python functions the model may call, their JSON schemas, and running the calls.

A tool is a function (plain or `async def`) with type hints and a Google-style docstring:

    def calculate(expression: str, precision: int = 6) -> str:
        '''Evaluate an arithmetic expression.

        Args:
            expression: The expression, e.g. "2 * (3 + 4)".
            precision: Digits after the decimal point.
        '''

`tool_schema` turns it into the function-calling schema that `apply_chat_template(tools=...)`
takes. `ToolBox` runs calls with a time limit and a bound on how many run at once, turns every
result, bad call and exception into text for the model, and counts them in `ToolStats`.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import types
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from quartet.envs.parse import MalformedCall, ToolCall, render_tool_result
from quartet.envs.timeouts import CallTimedOut, call_with_timeout
from quartet.user_code import function_name, load_callables

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
_SECTION_RE = re.compile(r"^\s*(Args|Arguments|Returns|Yields|Raises|Examples?|Notes?):\s*$", re.MULTILINE)
_ARG_RE = re.compile(r"^(\s*)(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")  # "name (type): text", the "(type)" optional


class ToolSchemaError(ValueError):
    """A tool whose schema cannot be derived: the message names the function and what to fix."""


def tool_schema(fn: Callable) -> dict[str, Any]:
    """{"type": "function", "function": {"name", "description", "parameters"}} from the signature
    and docstring; a parameter with a default is not required."""
    name = function_name(fn)
    description, arg_docs = _parse_docstring(fn, name)
    try:
        hints = get_type_hints(fn)
    except Exception as err:
        raise ToolSchemaError(f"tool {name}: its type hints cannot be read: {err}") from None
    properties: dict[str, Any] = {}
    required = []
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ToolSchemaError(f"tool {name}: parameter '{param.name}' is *args/**kwargs; "
                                  "a tool takes named parameters only")
        if param.name not in hints:
            raise ToolSchemaError(f"tool {name}: parameter '{param.name}' has no type hint; add one, e.g. "
                                  f"'{param.name}: str'")
        try:
            properties[param.name] = _json_type(hints[param.name])
        except TypeError as err:
            raise ToolSchemaError(f"tool {name}: parameter '{param.name}': {err}") from None
        if param.name in arg_docs:
            properties[param.name]["description"] = arg_docs[param.name]
        if param.default is inspect.Parameter.empty:
            required.append(param.name)
    unknown = set(arg_docs) - set(properties)
    if unknown:
        raise ToolSchemaError(f"tool {name}: its docstring's Args describe {', '.join(sorted(unknown))}, "
                              "which it has no parameter for")
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def _parse_docstring(fn: Callable, name: str) -> tuple[str, dict[str, str]]:
    """The description (the text before the first section) and each parameter's text under Args:."""
    doc = inspect.getdoc(fn)
    if not doc or not doc.strip():
        raise ToolSchemaError(f"tool {name} has no docstring: the model reads it to know what the tool does; "
                              "write one, with an 'Args:' section describing each parameter")
    sections = _SECTION_RE.split(doc)  # [description, title, body, title, body, ...]
    description = sections[0].strip()
    arg_docs: dict[str, str] = {}
    for title, body in zip(sections[1::2], sections[2::2]):
        if title not in ("Args", "Arguments"):
            continue
        indent = None
        for line in body.splitlines():
            match = _ARG_RE.match(line)
            if match and (indent is None or len(match.group(1)) <= indent):
                indent, current = len(match.group(1)), match.group(2)
                arg_docs[current] = match.group(3).strip()
            elif line.strip() and indent is not None:  # a continuation line
                arg_docs[current] = f"{arg_docs[current]} {line.strip()}".strip()
    return description, arg_docs


def _json_type(hint: Any) -> dict[str, Any]:
    origin, args = get_origin(hint), get_args(hint)
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    if hint is Any:
        return {}
    if hint in (list, tuple) or origin in (list, tuple, Sequence):
        if origin is tuple and len(args) > 1 and ... not in args:
            return {"type": "array", "prefixItems": [_json_type(a) for a in args]}
        return {"type": "array", "items": _json_type(args[0])} if args else {"type": "array"}
    if hint is dict or origin is dict:
        return {"type": "object", "additionalProperties": _json_type(args[1])} if len(args) == 2 else {"type": "object"}
    if origin is Literal:
        if any(type(a) not in _JSON_TYPES for a in args):
            raise TypeError(f"{hint!r}: a Literal's values must be str, int, float, bool or None")
        kinds = list(dict.fromkeys(_JSON_TYPES[type(a)] for a in args))
        return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": list(args)}
    if origin is Union or origin is getattr(types, "UnionType", Union):
        options = [_json_type(a) for a in args if a is not type(None)]
        if len(options) == 1:
            schema = options[0]
        elif all(set(o) == {"type"} and isinstance(o["type"], str) for o in options):
            kinds = sorted({o["type"] for o in options})
            schema = {"type": kinds[0] if len(kinds) == 1 else kinds}
        else:
            schema = {"anyOf": options}
        if type(None) in args:
            schema["nullable"] = True
        return schema
    raise TypeError(f"type {hint!r} has no JSON schema; use str, int, float, bool, list[...], dict, Optional[...] "
                    "or Literal[...]")


def load_tools(specs: str | Sequence[str], setting: str = "rollout.tools") -> list[Callable]:
    """Tools from 'package.module:function' specs (a list, or one comma-separated string), each
    checked for a schema."""
    tools = load_callables(specs, setting)
    for fn in tools:
        tool_schema(fn)
    return tools


@dataclass
class ToolStats:
    """Per tool: calls, errors (it raised, or was called with bad arguments) and timeouts; and
    calls that could not be read or named no known tool."""

    calls: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    timeouts: dict[str, int] = field(default_factory=dict)
    malformed: int = 0

    def count(self, counter: dict[str, int], name: str) -> None:
        counter[name] = counter.get(name, 0) + 1

    def metrics(self, prefix: str = "tools/") -> dict[str, float]:
        out = {f"{prefix}malformed": float(self.malformed)}
        for name, n in self.calls.items():
            out[f"{prefix}{name}/calls"] = float(n)
            out[f"{prefix}{name}/errors"] = float(self.errors.get(name, 0))
            out[f"{prefix}{name}/timeouts"] = float(self.timeouts.get(name, 0))
        return out


class ToolBox:
    """Tools, the limits their calls run under, and the counts of what happened.

    `tool_timeout` seconds per call; at most `max_concurrent_calls` calls run at once on one event
    loop (the rest wait their turn). A call still running at its time limit is answered with a
    timeout error and stops holding its place (see `quartet.envs.timeouts`).
    """

    def __init__(self, tools: Sequence[Callable], tool_timeout: float = 30.0, max_concurrent_calls: int = 16):
        if tool_timeout <= 0 or max_concurrent_calls < 1:
            raise ValueError(f"tool_timeout must be > 0 and max_concurrent_calls >= 1, got {tool_timeout} "
                             f"and {max_concurrent_calls}")
        self.schemas = [tool_schema(fn) for fn in tools]
        self.tools: dict[str, Callable] = {}
        for fn in tools:
            name = function_name(fn)
            if name in self.tools:
                raise ValueError(f"two tools are named {name}: the model calls tools by name, so names must differ")
            self.tools[name] = fn
        self.tool_timeout, self.max_concurrent_calls = tool_timeout, max_concurrent_calls
        self.stats = ToolStats()
        self._semaphores: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one per event loop

    async def run(self, call: ToolCall | MalformedCall) -> str:
        """The text that answers one call: the tool's result, or an error the model can read."""
        if isinstance(call, MalformedCall):
            self.stats.malformed += 1
            return call.error
        fn = self.tools.get(call.name)
        if fn is None:
            self.stats.malformed += 1
            return f"error: there is no tool named {call.name!r}; the tools are: {', '.join(self.tools)}"
        self.stats.count(self.stats.calls, call.name)
        try:
            inspect.signature(fn).bind(**call.arguments)
        except TypeError as err:
            self.stats.count(self.stats.errors, call.name)
            return f"error: {call.name} was called with bad arguments: {err}"
        async with self._semaphore():
            try:
                value = await call_with_timeout(fn, self.tool_timeout, **call.arguments)
            except CallTimedOut:
                self.stats.count(self.stats.timeouts, call.name)
                return f"error: {call.name} timed out after {self.tool_timeout:g} s"
            except Exception as err:
                self.stats.count(self.stats.errors, call.name)
                return f"error: {call.name} raised {type(err).__name__}: {err}"
        return render_tool_result(value)

    async def run_all(self, calls: Sequence[ToolCall | MalformedCall]) -> list[str]:
        """The answers to several calls (run concurrently), in their order."""
        return list(await asyncio.gather(*(self.run(call) for call in calls)))

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop not in self._semaphores:
            self._semaphores[loop] = asyncio.Semaphore(self.max_concurrent_calls)
        return self._semaphores[loop]
