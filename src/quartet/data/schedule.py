"""The order in which online RL visits its prompts: seeded shuffles, one epoch after another."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from quartet.runs.seeds import derive_seed

T = TypeVar("T")


class PromptSchedule:
    """`rows(start, count)`: prompts `start ...` of the endless, seeded stream of epochs; `batch(step)`
    the `step`-th batch of `batch_size`. The same for the same seed, after a resume too."""

    def __init__(self, prompts: Sequence[T], batch_size: int, seed: int):
        if not prompts:
            raise ValueError("no prompts to schedule")
        self.prompts, self.batch_size, self.seed = prompts, batch_size, seed
        self._order_epoch, self._order = -1, []  # the cached shuffle of the current epoch

    def batch(self, step: int) -> list[T]:
        return self.rows(step * self.batch_size, self.batch_size)

    def rows(self, start: int, count: int) -> list[T]:
        rows = []
        for position in range(start, start + count):
            epoch, index = divmod(position, len(self.prompts))
            rows.append(self.prompts[self._epoch_order(epoch)[index]])
        return rows

    def _epoch_order(self, epoch: int) -> list[int]:
        """The prompt order of one epoch, shuffled once (not once per row: a large prompt set made
        that cost seconds per step)."""
        if self._order_epoch != epoch:
            order = list(range(len(self.prompts)))
            random.Random(derive_seed(self.seed, "prompt_order", epoch)).shuffle(order)
            self._order_epoch, self._order = epoch, order
        return self._order
