"""Agents and tools: multi-turn episodes in which the model acts and an environment answers.

What you write (no model code; this package imports neither torch nor transformers):

- An environment: a class or factory, named as 'mypkg.envs:GuessNumber'. Quartet makes one
  instance per episode. `reset(**columns)` returns the first user message (None keeps the
  dataset's prompt); `step(action)` gets the model's turn and returns `(observation, reward, done)`
  or a dict of those, the observation a str (the next user message), a list of chat messages, or
  None. Either method may be `async def`. Take `rng` in the constructor (or in `reset`) to get a
  `random.Random` seeded from the run's seed, the step and the row: runs are reproducible.
- Tools: plain functions (or `async def`) with type hints and a Google-style docstring, named as
  'mypkg.tools:calculate,mypkg.tools:lookup'. Their schemas go to the chat template; the built-in
  tool environment runs the calls the model writes as
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` and answers with `tool` messages,
  until a turn without a call: that turn is the answer.

Your code runs under time limits (`tool_timeout` per tool call, `env_timeout` per reset/step). A
tool's exception or a bad call becomes an error message the model reads ("error: calculate raised
ZeroDivisionError: division by zero") and is counted; an environment's exception or timeout stops
the run with an `EnvironmentFailure` that names the environment and the row.
"""

from quartet.envs.base import (
    EnvironmentFailure,
    EnvironmentTimeout,
    Episode,
    StepResult,
    episode_rng,
    load_environment,
)
from quartet.envs.parse import (
    MalformedCall,
    ToolCall,
    parse_tool_calls,
    render_tool_call,
    render_tool_result,
    tool_message,
)
from quartet.envs.runner import EpisodeRunner
from quartet.envs.tool_env import ToolEnvironment, tool_environment
from quartet.envs.tools import ToolBox, ToolSchemaError, ToolStats, load_tools, tool_schema

__all__ = [
    "EnvironmentFailure", "EnvironmentTimeout", "Episode", "EpisodeRunner", "MalformedCall", "StepResult",
    "ToolBox", "ToolCall", "ToolEnvironment", "ToolSchemaError", "ToolStats", "episode_rng", "load_environment",
    "load_tools", "parse_tool_calls", "render_tool_call", "render_tool_result", "tool_environment",
    "tool_message", "tool_schema",
]
