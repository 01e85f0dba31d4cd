"""`EpisodeRunner`: a batch of episodes driven from synchronous code (the rollout loop).

The runner owns one asyncio event loop, running on a background daemon thread for the runner's
whole life, and each call (`start`, `step`) hands it one batch and waits for the answers. One
long-lived loop rather than `asyncio.run` per batch, because:
- async tools and environments may keep loop-bound state across steps (an HTTP client session,
  a queue), which would break once `asyncio.run` closed the loop it was made on;
- it works where a loop is already running in the caller's thread (a notebook), where
  `asyncio.run` refuses;
- nothing at shutdown waits for a timed-out thread (`asyncio.run` joins its default executor).
Within a batch, at most `max_concurrent` environment calls run at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from quartet.envs.base import Episode, StepResult, environment_name, episode_rng

T = TypeVar("T")


class EpisodeRunner:
    """Opens, resets and steps episodes of one environment, a batch at a time.

    `factory` makes one environment per episode (a class, or a function; see `quartet.envs.base`);
    `name` is how errors call it (default: its qualified name); `seed` the run's seed, from which
    each episode's `rng` is derived with the step and row; `env_timeout` seconds bound each
    reset/step call (a step of the tool environment includes its tool calls).
    """

    def __init__(self, factory: Callable[..., Any], *, name: str | None = None, seed: int = 0,
                 env_timeout: float | None = 60.0, max_concurrent: int = 64):
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self.factory, self.name, self.seed = factory, name or environment_name(factory), seed
        self.env_timeout, self.max_concurrent = env_timeout, max_concurrent
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="quartet-envs", daemon=True)
        self._thread.start()

    def start(self, step: int, rows: Sequence[Mapping[str, Any]], row_ids: Sequence[int] | None = None) -> list[Episode]:
        """One reset episode per row of dataset columns; each has `first_message` (None: keep the
        prompt). `row_ids` (default 0, 1, ...) seed the episodes and name them in errors: give the
        samples of one prompt the same id to have them face the same draw (a GRPO group)."""
        row_ids = list(range(len(rows))) if row_ids is None else list(row_ids)
        if len(row_ids) != len(rows):
            raise ValueError(f"{len(row_ids)} row ids for {len(rows)} rows")

        async def open_one(columns: Mapping[str, Any], row: int) -> Episode:
            episode = await Episode.open(self.factory, self.name, row, episode_rng(self.seed, step, row), self.env_timeout)
            await episode.reset(columns)
            return episode

        return self.run(self._bounded([lambda c=c, r=r: open_one(c, r) for c, r in zip(rows, row_ids)]))

    def step(self, episodes: Sequence[Episode], actions: Sequence[str]) -> list[StepResult]:
        """Each episode's step on its action (the model's turn), in order."""
        if len(episodes) != len(actions):
            raise ValueError(f"{len(actions)} actions for {len(episodes)} episodes")
        return self.run(self._bounded([lambda e=e, a=a: e.step(a) for e, a in zip(episodes, actions)]))

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the runner's loop and wait for its result."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("EpisodeRunner.run was called from its own event loop; await the coroutine instead")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. Ctrl-C: stop the batch rather than leave it running
            raise

    async def _bounded(self, calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
        """All calls, at most `max_concurrent` at once; the first failure (in order) is raised
        after the others have finished, so none is left running."""
        limit = asyncio.Semaphore(self.max_concurrent)

        async def one(call: Callable[[], Awaitable[T]]) -> T:
            async with limit:
                return await call()

        results = await asyncio.gather(*(one(call) for call in calls), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)

    def close(self) -> None:
        """Stop the loop. Work still running past its time limit is abandoned, not waited for."""
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> EpisodeRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
