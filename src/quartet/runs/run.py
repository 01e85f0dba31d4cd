"""One run of one stage: its output directory, config, metrics, device and seed."""

from __future__ import annotations

import json
import multiprocessing
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from quartet.config import dump_config
from quartet.config.loading import RUN_CONFIG
from quartet.models.loading import save_model
from quartet.runs.checkpoint import latest_checkpoint, write_atomically
from quartet.runs.distributed import Ranks, make_accelerator
from quartet.runs.metrics import MetricsLogger


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


ROLLOUT_PRODUCER = "quartet-rollout-producer"  # the process name of asynchronous RL's producer (stages/rl_async.py)


def _refuse_inside_a_rollout_producer() -> None:
    """A spawned process imports the script that started it again: an unguarded script would start its run
    a second time inside the rollout producer."""
    if multiprocessing.current_process().name == ROLLOUT_PRODUCER:
        raise RuntimeError("a run was started inside the rollout producer of rollout.max_staleness: the producer is "
                           "a spawned process, which imports the script that started the run again; put the "
                           "script's run behind `if __name__ == \"__main__\":`")


class Run:
    """The output directory of a stage run.

    Layout: config.yaml, metrics.jsonl, tensorboard/, checkpoints/step-N/, final/, summary.json.
    Under a multi-process launch every rank holds a Run; only the main rank writes (`ranks`).
    """

    def __init__(self, output_dir: str | Path, config: BaseModel, stage: str, resume: bool = False):
        """Check the output directory and device; nothing is written until `start()`.

        Stages build a Run first (cheap checks), then load data and models, then call `start()`,
        so a bad input stops the run before it touches a directory that already holds work.
        """
        _refuse_inside_a_rollout_producer()
        self.dir = Path(output_dir)
        self.stage = stage
        self.config = config
        self.resume = resume
        if self.dir.exists() and not self.dir.is_dir():
            raise NotADirectoryError(f"run.output_dir {self.dir} is a file, not a directory")
        if not resume and self.final_dir.exists():
            raise FileExistsError(
                f"{self.dir} already holds a finished {stage} run (final/ exists); "
                "choose another --output, or delete it"
            )
        if resume and (self.dir / "summary.json").exists():
            raise FileExistsError(f"{self.dir} holds a {stage} run that already finished; nothing to resume")
        latest = latest_checkpoint(self.checkpoints_dir)
        if latest is not None and not resume:  # a fresh start would rotate its checkpoints out
            raise FileExistsError(
                f"{self.dir} holds an interrupted {stage} run (its checkpoint {latest}); continue it with "
                "--resume, or choose another --output")
        self.resume_from = latest if resume else None
        self.resumed_at: int | None = None  # the step the run loop resumed at, once it has
        run_cfg = getattr(config, "run", None)
        self.ranks = Ranks(make_accelerator(getattr(run_cfg, "device", "auto")), getattr(run_cfg, "fsdp", None),
                           getattr(run_cfg, "fsdp_frozen", False), getattr(run_cfg, "fsdp_reshard_after_forward", None))
        self.device = self.ranks.device
        self._metrics: MetricsLogger | None = None
        if resume and latest is None:
            self.ranks.print(f"[{stage}] no checkpoint in {self.dir}: starting fresh")

    def start(self) -> "Run":
        """Create the directory, write config.yaml and open the metrics log (main rank only)."""
        if self.ranks.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not self.resume_from:  # a fresh start: drop logs of an earlier, unfinished attempt
                for log in ("metrics.jsonl", "samples.jsonl"):
                    (self.dir / log).unlink(missing_ok=True)
            dump_config(self.config, self.dir / RUN_CONFIG)
        self._metrics = MetricsLogger(self.dir, enabled=self.ranks.is_main)
        self.ranks.barrier()  # the directory exists for every rank from here on
        return self

    @property
    def metrics(self) -> MetricsLogger:
        if self._metrics is None:
            raise RuntimeError("Run.start() must be called before logging metrics")
        return self._metrics

    @property
    def checkpoints_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def final_dir(self) -> Path:
        return self.dir / "final"

    def steps_done(self, steps: int, seconds: float) -> str:
        """What this process ran, for a stage's closing line: '30 steps in 5.6s', or after a resume
        at step 20, '10 steps in 1.9s (resumed at step 20)' (`steps`: the run's count, `seconds`: this
        process's time stepping)."""
        if not self.resumed_at:
            return f"{steps} steps in {seconds:.1f}s"
        return f"{steps - self.resumed_at} steps in {seconds:.1f}s (resumed at step {self.resumed_at})"

    def save_final(self, model: Any, tokenizer: Any, name: str = "final",
                   state_dict: dict[str, Any] | None = None) -> Path:
        """Write a Hugging Face model directory atomically: a crash leaves no half-written final/.

        Called on every rank; the main rank writes (`state_dict`: the full weights when the
        trained copy is sharded), the others wait until it is there.
        """
        path = self.dir / name
        if self.ranks.is_main:
            write_atomically(path, lambda tmp: save_model(model, tokenizer, tmp, state_dict=state_dict))
        self.ranks.barrier()
        return path

    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.dir / "summary.json"  # written last: its presence means the stage finished
        if self.ranks.is_main:
            tmp = path.with_name("summary.json.tmp")
            tmp.write_text(json.dumps(summary, indent=2, default=float) + "\n", encoding="utf-8")
            tmp.replace(path)
        return path

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
