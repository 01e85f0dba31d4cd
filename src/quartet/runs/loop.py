"""The one run loop of every stage: resume, progress, signals, checkpoints, the non-finite guard.

A stage supplies a `Job`: what one step does, what its checkpoint holds beyond the models, and
how its models are written and read. The loop owns everything a run does the same way:

- resume from the latest complete checkpoint (models, training state, step, RNG), with the
  logs cut back to that step, since the steps after it are redone;
- a progress bar on the main rank;
- SIGTERM / SIGINT: the step finishes, a checkpoint is written, `TrainingInterrupted` (exit 128 + signal);
- a checkpoint every `save_every` steps after a finite step, the newest `keep_checkpoints` kept;
- the non-finite guard: a step with a NaN/inf loss or gradient was skipped by the job and is
  counted; too many in a row stop the run with the last good checkpoint intact.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quartet.config import LoopConfig
from quartet.runs.checkpoint import (
    latest_checkpoint,
    load_training_state,
    rng_state,
    save_checkpoint,
    save_training_state,
    set_rng_state,
)
from quartet.runs.faults import GracefulStop, NonFiniteGuard, TrainingInterrupted
from quartet.runs.metrics import truncate_jsonl_after
from quartet.runs.progress import progress_bar
from quartet.runs.run import Run


@dataclass
class StepOutcome:
    """What one step reports: its metrics, whether it was finite (updated), and whether to log it regardless."""

    metrics: dict[str, Any]
    finite: bool
    log: bool = False


class Job:
    """One stage's side of the loop. Subclasses set `step`, `total_steps` and override the methods."""

    step: int = 0
    total_steps: int = 0
    nonfinite_metric = "skipped_nonfinite"  # the metric that counts skipped steps
    logs: tuple[str, ...] = ("metrics.jsonl",)  # run-directory JSONL logs cut back to the step on resume

    def begin(self) -> None:
        """After a resume, before the first step: wrap models for the backend, first evaluation..."""

    def train_step(self) -> StepOutcome:
        """One step; advances `step` by one."""
        raise NotImplementedError

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        """What the progress bar shows of a step's metrics."""
        return {}

    def training_state(self) -> dict[str, Any]:
        """The checkpoint's state beyond models, step, RNG and the guard (optimizer, scheduler...)."""
        return {}

    def load_training_state(self, state: dict[str, Any], checkpoint: Path) -> None:
        """The inverse of `training_state`."""

    def model_writer(self) -> Callable[[Path], None]:
        """Called on every rank (gathering sharded weights is a collective); the returned function
        writes the models into a checkpoint directory and runs on the main rank only."""
        raise NotImplementedError

    def load_models(self, checkpoint: Path) -> None:
        raise NotImplementedError


class RunLoop:
    """Runs a `Job` to its last step in a `Run`, with the guarantees in the module docstring."""

    def __init__(self, job: Job, run: Run, settings: LoopConfig):
        self.job, self.run, self.settings, self.ranks = job, run, settings, run.ranks
        self.guard = NonFiniteGuard(settings.max_nonfinite_steps, where=run.stage)

    def run_to_end(self) -> float:
        """Resume if the run asked for it, then step to the end; returns the seconds spent stepping."""
        with GracefulStop() as stop:
            if self.run.resume_from:
                self.resume(self.run.resume_from)
            self.job.begin()
            return self._steps(stop)

    def _steps(self, stop: GracefulStop) -> float:
        job, settings = self.job, self.settings
        bar = progress_bar(job.total_steps, desc=self.run.stage, initial=job.step, disable=not self.ranks.is_main)
        started = time.perf_counter()
        while job.step < job.total_steps:
            outcome = job.train_step()
            self.guard.record(outcome.finite, job.step, lambda: latest_checkpoint(self.run.checkpoints_dir))
            outcome.metrics[job.nonfinite_metric] = self.guard.total
            if outcome.log or job.step % settings.log_every == 0 or job.step == job.total_steps:
                self.run.metrics.log(job.step, outcome.metrics)
            bar.update(1)
            bar.set_postfix(job.postfix(outcome.metrics))
            if job.step < job.total_steps:
                if self.ranks.any(stop.requested):  # every rank stops after the same step
                    bar.close()
                    raise TrainingInterrupted(stop.signum or signal.SIGTERM, job.step, self.save_checkpoint())
                if settings.save_every and job.step % settings.save_every == 0 and outcome.finite:
                    self.save_checkpoint()
        bar.close()
        return time.perf_counter() - started

    def save_checkpoint(self) -> Path:
        """Models and training state, written by the main rank; every rank calls this."""
        write_models = self.job.model_writer()
        path = self.run.checkpoints_dir / f"step-{self.job.step}"
        if self.ranks.is_main:
            def write(tmp: Path) -> None:
                write_models(tmp)
                save_training_state(tmp / "trainer_state.pt", {
                    **self.job.training_state(), "step": self.job.step, "nonfinite": self.guard.state_dict(),
                    "rng": rng_state()})

            path = save_checkpoint(self.run.checkpoints_dir, self.job.step, write, keep=self.settings.keep_checkpoints)
        self.ranks.barrier()
        return path

    def resume(self, checkpoint: Path) -> None:
        self.job.load_models(checkpoint)
        state = load_training_state(checkpoint / "trainer_state.pt")
        self.job.load_training_state(state, checkpoint)
        self.guard.load_state_dict(state["nonfinite"])
        self.job.step = state["step"]
        set_rng_state(state["rng"])
        if self.ranks.is_main:  # lines logged after this checkpoint are redone
            for log in self.job.logs:
                truncate_jsonl_after(self.run.dir / log, self.job.step)

