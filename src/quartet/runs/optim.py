"""Optimizers and learning-rate schedules of every stage."""

from __future__ import annotations

import functools
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from quartet.runs.sharding import is_sharded_checkpoint


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; `params` may be parameter groups (dicts with their own lr)."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**group, "params": [p for p in group["params"] if p.requires_grad]} for group in params]
    else:
        params = [p for p in params if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):  # fused needs support for the parameters' device/dtype
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier at optimizer step `step`: linear from 0 to 1 over `warmup_steps`,
    then half a cosine from 1 down to 0 at `total_steps` (transformers' cosine schedule,
    held at 0 after the end)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))  # stays at 0 after the end
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int,
                           total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`warmup_cosine_factor` as a scheduler. Written here rather than imported from
    transformers.optimization, whose import pulls in peft and the Trainer (13 MiB of peak RSS)."""
    factor = functools.partial(warmup_cosine_factor, warmup_steps=warmup_steps, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any] | None, checkpoint: Path) -> None:
    """Restore Adam moments. An FSDP checkpoint holds them as shards, restored with the weights (the run
    loop); one written under DeepSpeed (config-only, untested) has none."""
    if state is None:
        if is_sharded_checkpoint(checkpoint):
            return
        print(f"warning: {checkpoint} holds no optimizer state (written under DeepSpeed); "
              "the optimizer's moments restart from zero", file=sys.stderr)
        return
    optimizer.load_state_dict(state)


def advance_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Move the schedule one optimizer step on, whether or not the optimizer stepped.

    A step skipped for a non-finite loss still counts: the learning rate stays a function of the step
    number (it ends at 0 on the last step, and resumes where it was). PyTorch warns when the schedule
    moves before the optimizer's first step; here that order is the intended one, so only that warning
    is silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
        scheduler.step()
