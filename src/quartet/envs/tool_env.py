"""The built-in tool environment: the model calls tools until it answers.

Each model turn is read for tool calls (`quartet.envs.parse`); the calls run in a shared `ToolBox`
and their answers come back as the observation: a list of `tool` messages, one per call in order,
for the chat template to render. A turn without a tool call is the answer and ends the episode.
The environment gives no reward itself (0.0 every step): the reward functions score the answer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from quartet.envs.base import StepResult
from quartet.envs.parse import parse_tool_calls, tool_message
from quartet.envs.tools import ToolBox


class ToolEnvironment:
    """One episode of tool use; many episodes share one `ToolBox` (its limits and its counts)."""

    def __init__(self, toolbox: ToolBox):
        self.toolbox = toolbox

    def reset(self, **columns: Any) -> None:
        return None  # the dataset's prompt is the first message

    async def step(self, action: str) -> StepResult:
        calls = parse_tool_calls(action, self.toolbox.tools)
        if not calls:
            return StepResult(None, 0.0, True)
        answers = await self.toolbox.run_all(calls)
        return StepResult([tool_message(answer, call.name) for answer, call in zip(answers, calls)], 0.0, False)


def tool_environment(tools: Sequence[Callable] | ToolBox, **limits: Any) -> Callable[[], ToolEnvironment]:
    """The factory of tool environments over `tools` (or a ready ToolBox); `limits` are ToolBox's
    `tool_timeout` and `max_concurrent_calls`."""
    toolbox = tools if isinstance(tools, ToolBox) else ToolBox(tools, **limits)
    factory = functools.partial(ToolEnvironment, toolbox)
    factory.__qualname__ = "tools"  # how errors name it
    return factory

