"""The environment protocol, and `Episode`: one environment instance, called safely.

An environment is a class (or a factory function) with two methods, each plain or `async def`:

    reset(**columns) -> str | None      # the first user message; None keeps the dataset's prompt
    step(action: str) -> (observation, reward, done)   # or {"observation":, "reward":, "done":}

`reset` gets the row's dataset columns it names (all of them if it takes **kwargs). The
observation is a str (the next user message), a list of chat messages, or None. Quartet makes one
instance per episode and hands it a `random.Random` seeded from (run seed, step, row) as `rng=`,
to the factory if it takes `rng`, else to `reset` if that does. Whatever the user's code raises,
or a call that runs past `env_timeout`, surfaces as `EnvironmentFailure` naming the environment
and the row.
"""

from __future__ import annotations

import numbers
import random
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from quartet.envs.timeouts import CallTimedOut, call_with_timeout
from quartet.runs.seeds import derive_seed
from quartet.user_code import function_name, keywords_taken, load_callable

Message = dict[str, str]
Observation = str | list[Message] | None


class EnvironmentFailure(RuntimeError):
    """The user's environment raised, misbehaved or timed out; the message names it and the row."""


class EnvironmentTimeout(EnvironmentFailure):
    """The user's environment ran past its time limit."""


@dataclass(frozen=True)
class StepResult:
    observation: Observation
    reward: float
    done: bool

    @property
    def messages(self) -> list[Message]:
        """The observation as chat messages: a str is the next user message."""
        if self.observation is None:
            return []
        if isinstance(self.observation, str):
            return [{"role": "user", "content": self.observation}]
        return list(self.observation)


def episode_rng(seed: int, step: int, row: int) -> random.Random:
    """The random stream of the episode of `row` at `step`: the same on every run with `seed`."""
    return random.Random(derive_seed(seed, "episode", step, row))


def load_environment(spec: str, setting: str = "rollout.environment") -> Callable[..., Any]:
    """The class or factory named by 'package.module:Name'."""
    return load_callable(spec, setting)


class Episode:
    """One environment instance for one episode: its calls time-limited and their results checked."""

    def __init__(self, env: Any, name: str, row: int, rng: random.Random, rng_to_reset: bool, timeout: float | None):
        for method in ("reset", "step"):
            if not callable(getattr(env, method, None)):
                raise EnvironmentFailure(f"environment {name} has no {method}() method; an environment needs "
                                         "reset(**columns) and step(action)")
        self.env, self.name, self.row, self.rng, self.timeout = env, name, row, rng, timeout
        self._rng_to_reset = rng_to_reset
        self.done = False
        self.first_message: str | None = None  # what reset() returned

    @classmethod
    async def open(cls, factory: Callable[..., Any], name: str, row: int, rng: random.Random,
                   timeout: float | None) -> Episode:
        """A new instance from `factory`, with `rng` if the factory or its `reset` takes it."""
        takes_rng = "rng" in keywords_taken(factory, {"rng": rng})
        env = await _guarded(name, row, "creating it", factory, timeout, **({"rng": rng} if takes_rng else {}))
        rng_to_reset = not takes_rng and "rng" in keywords_taken(getattr(env, "reset", None), {"rng": rng})
        return cls(env, name, row, rng, rng_to_reset, timeout)

    async def reset(self, columns: Mapping[str, Any]) -> str | None:
        kwargs = keywords_taken(self.env.reset, columns, exclude=("rng",))
        if self._rng_to_reset:
            kwargs["rng"] = self.rng
        first = await _guarded(self.name, self.row, "reset", self.env.reset, self.timeout, **kwargs)
        if first is not None and not isinstance(first, str):
            raise EnvironmentFailure(f"environment {self.name} reset() returned a {type(first).__name__} on row "
                                     f"{self.row}: return the first user message as a str, or None to keep the prompt")
        self.first_message = first
        return first

    async def step(self, action: str) -> StepResult:
        if self.done:
            raise RuntimeError(f"environment {self.name} on row {self.row}: step() after the episode was done")
        result = await _guarded(self.name, self.row, "step", self.env.step, self.timeout, action)
        checked = step_result(result, f"environment {self.name} step() on row {self.row}")
        self.done = checked.done
        return checked


async def _guarded(name: str, row: int, what: str, fn: Callable, timeout: float | None, /,
                   *args: Any, **kwargs: Any) -> Any:
    try:
        return await call_with_timeout(fn, timeout, *args, **kwargs)
    except CallTimedOut:
        raise EnvironmentTimeout(f"environment {name} did not finish {what} within {timeout:g} s on row {row}") from None
    except Exception as err:
        last_line = traceback.format_exception_only(type(err), err)[-1].strip()
        raise EnvironmentFailure(f"environment {name} failed in {what} on row {row}: {last_line}") from err


def step_result(result: Any, where: str) -> StepResult:
    """`(observation, reward, done)` or a dict of them, checked, as a StepResult."""
    if isinstance(result, StepResult):
        return result
    if isinstance(result, Mapping):
        missing = [k for k in ("observation", "reward", "done") if k not in result]
        if missing:
            raise EnvironmentFailure(f"{where} returned a dict without {', '.join(missing)}")
        observation, reward, done = result["observation"], result["reward"], result["done"]
    elif isinstance(result, (tuple, list)) and len(result) == 3:
        observation, reward, done = result
    else:
        raise EnvironmentFailure(f"{where} returned {type(result).__name__}: return (observation, reward, done) "
                                 "or a dict with those keys")
    if not isinstance(reward, numbers.Real):
        raise EnvironmentFailure(f"{where} returned reward {reward!r} ({type(reward).__name__}): return a number")
    if not (isinstance(done, bool) or getattr(getattr(done, "dtype", None), "kind", None) == "b"):
        raise EnvironmentFailure(f"{where} returned done {done!r} ({type(done).__name__}): return True or False")
    if not (observation is None or isinstance(observation, str) or _are_messages(observation)):
        raise EnvironmentFailure(f"{where} returned observation of type {type(observation).__name__}: return a str, "
                                 "a list of chat messages {'role': ..., 'content': ...}, or None")
    return StepResult(observation, float(reward), bool(done))


def _are_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def environment_name(factory: Callable) -> str:
    return getattr(factory, "__qualname__", None) or function_name(factory)
