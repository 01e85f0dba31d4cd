"""What a run does when things go wrong: stop signals and numerical faults.

- SIGTERM / SIGINT (pre-emption, Ctrl-C): the current step finishes, a checkpoint is written,
  and the run stops with `TrainingInterrupted`; `--resume` continues from there.
- A non-finite loss or gradient skips that update with a warning and is counted; after
  `max_nonfinite_steps` such steps in a row the run stops with `NumericalFault`, leaving the
  last good checkpoint as it was.
"""

from __future__ import annotations

import math
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch


class TrainingInterrupted(RuntimeError):
    """A stop signal arrived; a checkpoint was saved at `step`."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint saved in {checkpoint}" if checkpoint else "no checkpoint written"
        super().__init__(f"{name} received: stopped after step {step}; {where}; continue with --resume")


class NumericalFault(RuntimeError):
    """Too many non-finite steps in a row."""


class GracefulStop:
    """Context manager that turns SIGTERM/SIGINT into a flag the training loop checks between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 (signal handler signature)
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint",
              file=sys.stderr)

    def __enter__(self) -> "GracefulStop":
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught here
            self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None


class NonFiniteGuard:
    """Counts non-finite steps; raises NumericalFault after `limit` in a row."""

    def __init__(self, limit: int, where: str):
        self.limit, self.where = limit, where
        self.total = 0
        self.in_a_row = 0

    @staticmethod
    def finite(*values: float | torch.Tensor) -> bool:
        return all(math.isfinite(float(v)) for v in values)

    def record(self, ok: bool, step: int, last_checkpoint: Callable[[], Path | None]) -> None:
        """Note whether `step` was finite; warn on a skip and stop after too many in a row.

        `last_checkpoint` is only called when the run stops, to name the checkpoint left intact.
        """
        if ok:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        print(f"warning: {self.where} step {step}: non-finite loss or gradient; update skipped "
              f"({self.in_a_row} in a row, {self.total} in all)", file=sys.stderr)
        if self.in_a_row >= self.limit:
            checkpoint = last_checkpoint()
            kept = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written"
            raise NumericalFault(
                f"{self.where}: {self.in_a_row} non-finite steps in a row (limit {self.limit}); stopped at step {step}; "
                f"{kept}. Lower the learning rate, check the data, or try without bf16.")

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.in_a_row = int(state["total"]), int(state["in_a_row"])
