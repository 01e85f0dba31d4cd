"""The one run loop of every stage: resume, progress, signals, checkpoints, the non-finite guard.

A stage supplies a `Job`: what one step does, what its checkpoint holds beyond the models, and
how its models are written and read. The loop owns everything a run does the same way:

- resume from the latest complete checkpoint (models, training state, step, RNG), with the
  logs cut back to that step, since the steps after it are redone;
- under FSDP, checkpoints of shards: every rank writes its shards of the trained module and its
  optimizer (torch.distributed.checkpoint) and its own RNG state into the main rank's temporary
  directory, then the main rank completes it; such a checkpoint resumes on any number of ranks;
- a progress bar on the main rank;
- SIGTERM / SIGINT: the step finishes, a checkpoint is written, `TrainingInterrupted` (exit 128 + signal);
- a checkpoint every `save_every` steps after a finite step, the newest `keep_checkpoints` kept;
- the non-finite guard: a step with a NaN/inf loss or gradient was skipped by the job and is
  counted; too many in a row stop the run with the last good checkpoint intact;
- a step the job abandons before changing anything (`StepAbandoned`, e.g. a reward server that
  stays down): a checkpoint of the state before that step (its RNG state as it was) and the error
  stops the run; `--resume` redoes the step.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quartet.config import LoopConfig
from quartet.runs.checkpoint import (
    fresh_temporary,
    latest_checkpoint,
    load_training_state,
    rng_state,
    save_checkpoint,
    save_training_state,
    set_rng_state,
)
from quartet.runs.faults import GracefulStop, NonFiniteGuard, StepAbandoned, TrainingInterrupted
from quartet.runs.metrics import truncate_jsonl_after
from quartet.runs.progress import progress_bar
from quartet.runs.run import Run
from quartet.runs.sharding import (
    SHARDED_STATE,
    is_sharded_checkpoint,
    load_sharded_state,
    local_bytes,
    optimizer_state_bytes,
    peak_memory,
    save_sharded_state,
)


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
    rank_rng_restored = False  # set on resume when this rank's own RNG state came back (ranks after the first)

    def begin(self) -> None:
        """After a resume, before the first step: wrap models for the backend, first evaluation..."""

    def train_step(self) -> StepOutcome:
        """One step; advances `step` by one."""
        raise NotImplementedError

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        """What the progress bar shows of a step's metrics."""
        return {}

    def progress(self) -> tuple[int, int, str]:
        """What the progress bar counts: (done, total, unit); steps unless a job has a tighter measure."""
        return self.step, self.total_steps, "step"

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

    def sharded_parts(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The trained module and its optimizer: what an FSDP checkpoint holds, as shards, instead of
        `model_writer`'s models and the optimizer in `training_state`."""
        raise NotImplementedError

    def frozen_models(self) -> tuple[torch.nn.Module, ...]:
        """Models the job holds but does not train (counted in the memory report)."""
        return ()


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
        done, total, unit = job.progress()
        bar = progress_bar(total, desc=self.run.stage, initial=done, disable=not self.ranks.is_main, unit=unit)
        started = time.perf_counter()
        first_step = job.step + 1
        while job.step < job.total_steps:
            step_before, rng_before = job.step, rng_state()
            try:
                outcome = job.train_step()
            except StepAbandoned as fault:
                bar.close()
                if job.step == step_before:  # nothing of the step was kept: checkpoint the state before it
                    set_rng_state(rng_before)
                    fault.checkpoint = self.save_checkpoint()
                    fault.outcome = (f"; stopped before step {job.step + 1}, checkpoint saved in {fault.checkpoint}; "
                                     "continue with --resume")
                else:  # it failed after its update (e.g. in the evaluation): the last checkpoint stands
                    fault.checkpoint = latest_checkpoint(self.run.checkpoints_dir)
                    fault.outcome = (f"; the last checkpoint is {fault.checkpoint}; continue with --resume"
                                     if fault.checkpoint else "; no checkpoint was written")
                raise
            if job.step == first_step and self.ranks.fsdp_requested:
                self.report_memory()  # after the first step, when the optimizer's moments exist
            self.guard.record(outcome.finite, job.step, lambda: latest_checkpoint(self.run.checkpoints_dir))
            outcome.metrics[job.nonfinite_metric] = self.guard.total
            if outcome.log or job.step % settings.log_every == 0 or job.step == job.total_steps:
                self.run.metrics.log(job.step, outcome.metrics)
            bar.update(job.progress()[0] - bar.n)
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
        """Models and training state, written by the main rank; every rank calls this.

        Under FSDP every rank first writes its shards (and its RNG state) into the main rank's
        temporary directory, which the main rank then completes and renames.
        """
        job, ranks = self.job, self.ranks
        path = self.run.checkpoints_dir / f"step-{job.step}"
        sharded = ranks.fsdp is not None
        write_models = None if sharded else job.model_writer()  # a collective when it gathers weights
        tmp = None
        if sharded:
            tmp = ranks.from_main(fresh_temporary(path) if ranks.is_main else None)
            save_sharded_state(tmp / SHARDED_STATE, *job.sharded_parts())
            if ranks.rank > 0:  # the main rank's RNG state goes into trainer_state.pt
                save_training_state(tmp / f"rng-rank{ranks.rank}.pt", rng_state())
            ranks.barrier()
        if ranks.is_main:
            def write(tmp_dir: Path) -> None:
                if write_models is not None:
                    write_models(tmp_dir)
                save_training_state(tmp_dir / "trainer_state.pt", {
                    **job.training_state(), "step": job.step, "nonfinite": self.guard.state_dict(),
                    "rng": rng_state(), **({"world": ranks.world} if sharded else {})})

            path = save_checkpoint(self.run.checkpoints_dir, job.step, write, keep=self.settings.keep_checkpoints,
                                   tmp_dir=tmp)
        ranks.barrier()
        return path

    def resume(self, checkpoint: Path) -> None:
        job, ranks = self.job, self.ranks
        if is_sharded_checkpoint(checkpoint):  # resharded for this run's ranks (or one process)
            load_sharded_state(checkpoint / SHARDED_STATE, *job.sharded_parts())
        elif ranks.fsdp is not None:
            raise ValueError(f"{checkpoint} holds whole models (written on one process or with DDP), which FSDP does "
                             "not read; resume it on one process or with DDP (run.fsdp: false)")
        else:
            job.load_models(checkpoint)
        state = load_training_state(checkpoint / "trainer_state.pt")
        job.load_training_state(state, checkpoint)
        self.guard.load_state_dict(state["nonfinite"])
        job.step = state["step"]
        set_rng_state(state["rng"])
        own = checkpoint / f"rng-rank{ranks.rank}.pt"  # a sharded checkpoint holds every rank's RNG state
        if ranks.rank > 0 and state.get("world") == ranks.world and own.is_file():
            set_rng_state(load_training_state(own))
            job.rank_rng_restored = True
        if ranks.is_main:  # lines logged after this checkpoint are redone
            for log in job.logs:
                truncate_jsonl_after(self.run.dir / log, job.step)
        self.run.resumed_at = job.step
        ranks.print(f"[{self.run.stage}] resuming from {checkpoint} (step {job.step} of {job.total_steps})")

    def report_memory(self) -> None:
        """Print what each rank holds: trained parameters and optimizer state (their local shards under
        FSDP), frozen models, the most weights gathered at once for generation, and the peak memory."""
        module, optimizer = self.job.sharded_parts()
        parts = {"trained parameters": local_bytes(module.parameters()),
                 "optimizer state": optimizer_state_bytes(optimizer),
                 "frozen models": sum(local_bytes(m.parameters()) for m in self.job.frozen_models()),
                 "gathered for generation": self.ranks.gathered_bytes}
        peak_name, peak = peak_memory(self.ranks.device)
        text = ", ".join(f"{name} {size / 2**20:.3f} MiB" for name, size in parts.items()
                         if size or name in ("trained parameters", "optimizer state"))
        lines = self.ranks.gather_objects([f"  rank {self.ranks.rank}: {text}; {peak_name} {peak / 2**20:.0f} MiB"])
        how = "sharded with FSDP2" if self.ranks.fsdp is not None else "one process: nothing to shard"
        self.ranks.print(f"[{self.run.stage}] memory per rank after step {self.job.step} ({self.ranks.world} ranks, {how}):\n"
                         + "\n".join(lines))

