"""What a run does when things go wrong: stop signals and numerical faults.

- SIGTERM / SIGINT (pre-emption, Ctrl-C): the current step finishes, a checkpoint is written,
  and the run stops with `TrainingInterrupted`; `--resume` continues from there. Ctrl-C under
  `quartet ... | tee log` kills the pipe's reader too: from then on a write to the terminal
  goes nowhere instead of raising, so nothing printed can stop the checkpoint.
- A non-finite loss or gradient skips that update with a warning and is counted; after
  `max_nonfinite_steps` such steps in a row the run stops with `NumericalFault`, leaving the
  last good checkpoint as it was.
- A reward server that stays unreachable or keeps answering nonsense past its retries stops the
  run with `RewardServerDown` (exit status 3) before anything of that step is trained: a
  checkpoint of the state before the step is written, and `--resume` redoes the step once the
  server is back, as if nothing had happened.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this module before any stage: no torch at import
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


class StepAbandoned(RuntimeError):
    """A step that could not be completed and changed nothing (no update, the prompt stream and the
    step counter as before it): the run loop writes a checkpoint of the state before the step,
    records it in `checkpoint`, and lets the error stop the run."""

    exit_status = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
        self.checkpoint: Path | None = None  # set by the run loop
        self.outcome = ""  # what the run loop did about it, said after the message

    def __str__(self) -> str:
        return self.message + self.outcome


class RewardServerDown(StepAbandoned):
    """A reward server failed past its retries (unreachable, timing out, refusing, or answering with
    the wrong count or non-finite numbers): the run stops with exit status 3."""

    exit_status = 3

    def __init__(self, url: str, error: str):
        super().__init__(f"reward server {url} failed: {error}")
        self.url, self.error = url, error

    def __reduce__(self):  # raised in a rollout producer's process, re-raised by the trainer's
        return type(self), (self.url, self.error)


def _reader_gone(err: OSError) -> bool:
    return isinstance(err, BrokenPipeError) or err.errno == errno.EPIPE


def _silence(stream) -> None:
    """Point `stream`'s file descriptor at /dev/null: every later write to it, from any holder of the
    stream (progress bars, print, the interpreter's flush at exit), succeeds and goes nowhere."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture): nothing to redirect
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class PipeSafeStream:
    """A text stream (stdout, stderr) whose writes never raise because its reader is gone.

    When the reader of a pipe has died (Ctrl-C reaches `tee` in `quartet ... | tee log` as well),
    the first failing write points the stream at /dev/null and the run carries on; anything else
    is the wrapped stream's own.
    """

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as err:
            if not _reader_gone(err):
                raise
            _silence(self._stream)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as err:
            if not _reader_gone(err):
                raise
            _silence(self._stream)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def say(text: str, stream=None) -> None:
    """Write a line to `stream` (default stderr) and flush stdout and it, never raising because the
    terminal's reader is gone: the last words of a stopped run, after its checkpoint is written."""
    stream = stream if stream is not None else sys.stderr
    for target, line in ((sys.stdout, ""), (stream, text + "\n")):
        safe = target if isinstance(target, PipeSafeStream) else PipeSafeStream(target)
        if line:
            safe.write(line)
        safe.flush()


class GracefulStop:
    """Context manager that turns SIGTERM/SIGINT into a flag the training loop checks between steps.

    Inside it, sys.stdout and sys.stderr are `PipeSafeStream`s, so the output of a run stopped by
    Ctrl-C under `| tee` cannot unwind the step or the checkpoint that follows it.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._streams: tuple | None = None

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 (signal handler signature)
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.signum = signum  # first: whatever happens to the message, the run stops after this step
        message = f"\n{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint\n"
        try:  # sys.stderr is a PipeSafeStream here: a reader that is gone raises nothing
            sys.stderr.write(message)
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - the handler interrupted a write to stderr, whose buffer cannot be entered twice
            try:
                os.write(sys.stderr.fileno(), message.encode())
            except Exception:  # noqa: BLE001 - a signal handler must not raise: the stop flag is what matters
                pass

    def __enter__(self) -> "GracefulStop":
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught here
            self._previous.clear()
            return self
        self._streams = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = (s if isinstance(s, PipeSafeStream) else PipeSafeStream(s) for s in self._streams)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._streams is not None:
            sys.stdout, sys.stderr = self._streams
            self._streams = None

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
