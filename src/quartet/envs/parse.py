"""The tool-call format: reading the model's calls, and writing calls and results the same way.

The format is Hermes / Qwen's, which their chat templates render and their models emit:

    <tool_call>
    {"name": "calculate", "arguments": {"expression": "2 + 3"}}
    </tool_call>

A turn may hold several calls. `arguments` may also be a JSON string holding the object, and may be
left out for a tool without parameters. A call that cannot be run becomes a `MalformedCall`, whose
`error` is written for the model to read and correct.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)
_SHOWN_CHARS = 200  # how much of a malformed call an error message quotes


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MalformedCall:
    error: str  # "error: ...", for the model
    name: str | None = None  # the tool it meant, when that much could be read


def has_tool_call(text: str) -> bool:
    return OPEN in text


def parse_tool_calls(text: str, tool_names: Collection[str] | None = None) -> list[ToolCall | MalformedCall]:
    """The calls in one model turn, in order; [] when it has none. With `tool_names`, a call to
    any other name is malformed."""
    calls: list[ToolCall | MalformedCall] = []
    end = 0
    for match in _CALL_RE.finditer(text):
        calls.append(_parse_one(match.group(1), tool_names))
        end = match.end()
    if OPEN in text[end:]:
        calls.append(MalformedCall(f"error: a {OPEN} tag is not closed: end each call with {CLOSE}"))
    return calls


def _parse_one(body: str, tool_names: Collection[str] | None) -> ToolCall | MalformedCall:
    body = body.strip()
    shown = body if len(body) <= _SHOWN_CHARS else body[:_SHOWN_CHARS] + "..."
    try:
        call = json.loads(body)
    except json.JSONDecodeError as err:
        return MalformedCall(f"error: the tool call is not valid JSON ({err}): {shown}")
    if not isinstance(call, dict):
        return MalformedCall(f'error: the tool call should be a JSON object {{"name": ..., "arguments": {{...}}}}: {shown}')
    name = call.get("name")
    if not isinstance(name, str) or not name:
        return MalformedCall(f'error: the tool call has no "name": {shown}')
    if tool_names is not None and name not in tool_names:
        return MalformedCall(f"error: there is no tool named {name!r}; the tools are: {', '.join(sorted(tool_names))}", name)
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            return MalformedCall(f'error: the "arguments" of {name} are not valid JSON ({err})', name)
    if not isinstance(arguments, dict):
        return MalformedCall(f'error: the "arguments" of {name} should be a JSON object of parameter names to values, '
                             f"not {json.dumps(arguments)}", name)
    return ToolCall(name, arguments)


def render_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """A call as the model should write it: the text Qwen's chat template renders for it."""
    return f'{OPEN}\n{{"name": {json.dumps(name)}, "arguments": {json.dumps(arguments, ensure_ascii=False)}}}\n{CLOSE}'


def render_tool_result(value: Any) -> str:
    """A tool's return value as the text the model reads: a str as it is, else JSON, else str()."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def tool_message(content: str, name: str | None = None) -> dict[str, str]:
    """The chat message that answers one call (the `tool` role of chat templates)."""
    return {"role": "tool", "content": content} if name is None else {"role": "tool", "name": name, "content": content}
