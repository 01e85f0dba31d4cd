"""The training loop shared by the supervised stages (SFT and reward model).

A stage supplies a `loss_fn(model, batch) -> LossSum`; this loop owns everything else:
seeded data order, gradient accumulation, clipping, warm-up + cosine schedule, optional
bf16 autocast, evaluation, metrics, progress, checkpoints and resume.

Accumulation is exact: each micro-batch returns a *sum* of per-unit losses (tokens for SFT,
pairs for the reward model) and the accumulated gradient is divided by the total number of
units in the window, so a window of uneven micro-batches weighs every unit equally.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel, get_cosine_schedule_with_warmup

from quartet.config import TrainConfig
from quartet.runs.checkpoint import (
    latest_checkpoint,
    load_training_state,
    rng_state,
    save_checkpoint,
    save_training_state,
    set_rng_state,
)
from quartet.runs.faults import GracefulStop, NonFiniteGuard, TrainingInterrupted
from quartet.runs.progress import format_postfix, progress_bar
from quartet.runs.run import Run


@dataclass
class LossSum:
    """Loss of one micro-batch as a sum over its units, plus metric sums over the same units."""

    loss_sum: torch.Tensor
    n_units: int
    metric_sums: dict[str, float] = field(default_factory=dict)


def move_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast_context(device: torch.device, bf16: bool):
    """bf16 autocast when asked for and supported; otherwise a no-op."""
    if not bf16:
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("train.bf16 is set but this GPU does not support bfloat16")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def make_optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):  # fused needs support for the parameters' device/dtype
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def load_weights(model: torch.nn.Module, model_dir: str | Path) -> None:
    """Load safetensors weights written by save_pretrained back into `model` (tied weights allowed).

    A peft (LoRA) model's checkpoint holds only its adapters; they are loaded through peft and
    the frozen base keeps the weights it was built with.
    """
    state = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(str(file)))
    if not state:
        raise ValueError(f"checkpoint {model_dir} holds no .safetensors weights")
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        missing = [k for k in result.missing_keys if k in trainable]
        unexpected = list(result.unexpected_keys)
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
        missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"checkpoint {model_dir} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def batch_order(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled micro-batches of example indices for one epoch, the same for the same (seed, epoch)."""
    order = list(range(n_examples))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]


class SupervisedTrainer:
    """Runs `loss_fn` over `train_data` for the configured number of optimizer steps."""

    def __init__(
        self,
        model: PreTrainedModel,
        train_data: list,
        eval_data: list,
        collate: Callable[[list], dict[str, Any]],
        loss_fn: Callable[[PreTrainedModel, dict[str, Any]], LossSum],
        cfg: TrainConfig,
        run: Run,
        seed: int,
        save_model: Callable[[Path], None],
        loss_name: str = "loss",
        postfix_keys: tuple[str, ...] = ("loss",),
        finalize_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None,
    ):
        if not train_data:
            raise ValueError("no training examples left after loading and truncation")
        self.model, self.train_data, self.eval_data = model, train_data, eval_data
        self.collate, self.loss_fn, self.cfg, self.run, self.seed = collate, loss_fn, cfg, run, seed
        self.save_model, self.loss_name, self.postfix_keys = save_model, loss_name, postfix_keys
        # turns per-unit means into the reported metrics (e.g. a std from mean and mean square)
        self.finalize_metrics = finalize_metrics or (lambda metrics: metrics)
        self.device = run.device
        self.batches_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.batches_per_epoch / cfg.grad_accum))
        self.optimizer = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay)
        warmup = int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup, self.total_steps)
        self.step = 0
        self.micro_batches_done = 0  # position in the data stream, for resume
        self.first_eval: dict[str, float] = {}
        self.nonfinite = NonFiniteGuard(cfg.max_nonfinite_steps, where=run.stage)

    # ------------------------------------------------------------------ data stream

    def _micro_batches(self) -> Iterator[dict[str, Any]]:
        index = self.micro_batches_done
        while True:
            epoch, position = divmod(index, self.batches_per_epoch)
            indices = batch_order(len(self.train_data), self.cfg.batch_size, self.seed, epoch)[position]
            yield self.collate([self.train_data[i] for i in indices])
            index += 1

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss and metrics over the held-out data (dropout off)."""
        if not self.eval_data:
            return {}
        was_training = self.model.training
        self.model.eval()
        total_loss, total_units, sums = 0.0, 0, {}
        for start in range(0, len(self.eval_data), self.cfg.batch_size):
            batch = move_to(self.collate(self.eval_data[start : start + self.cfg.batch_size]), self.device)
            with autocast_context(self.device, self.cfg.bf16):
                out = self.loss_fn(self.model, batch)
            total_loss += float(out.loss_sum)
            total_units += out.n_units
            for k, v in out.metric_sums.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        self.model.train(was_training)
        units = max(total_units, 1)
        means = self.finalize_metrics({self.loss_name: total_loss / units, **{k: v / units for k, v in sums.items()}})
        return {f"eval/{k}": v for k, v in means.items()}

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        def write(tmp: Path) -> None:
            self.save_model(tmp / "model")
            save_training_state(tmp / "trainer_state.pt", {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": self.step,
                "micro_batches_done": self.micro_batches_done,
                "first_eval": self.first_eval,
                "nonfinite": self.nonfinite.state_dict(),
                "rng": rng_state(),
            })

        return save_checkpoint(self.run.checkpoints_dir, self.step, write, keep=self.cfg.keep_checkpoints)

    def resume(self, checkpoint: Path) -> None:
        load_weights(self.model, checkpoint / "model")
        state = load_training_state(checkpoint / "trainer_state.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.micro_batches_done = state["micro_batches_done"]
        self.first_eval = state["first_eval"]
        self.nonfinite.load_state_dict(state["nonfinite"])
        set_rng_state(state["rng"])
        self.run.metrics.truncate_after(self.step)  # lines logged after this checkpoint are redone

    # ------------------------------------------------------------------ training

    def train(self) -> dict[str, float]:
        """Train to `total_steps`; returns the first and last eval metrics and timing."""
        with GracefulStop() as stop:
            return self._train(stop)

    def _train(self, stop: GracefulStop) -> dict[str, float]:
        if self.run.resume_from:
            self.resume(self.run.resume_from)
        cfg, model = self.cfg, self.model
        model.to(self.device)
        model.train()
        if self.step == 0:
            self.first_eval = self.evaluate()
            if self.first_eval:
                self.run.metrics.log(0, self.first_eval)
        stream = self._micro_batches()
        bar = progress_bar(self.total_steps, desc=self.run.stage, initial=self.step)
        started = time.perf_counter()
        last_eval: dict[str, float] = self.first_eval
        window: dict[str, float] = {}
        while self.step < self.total_steps:
            loss_sum, units, sums = 0.0, 0, {}
            for _ in range(cfg.grad_accum):
                batch = move_to(next(stream), self.device)
                self.micro_batches_done += 1
                with autocast_context(self.device, cfg.bf16):
                    out = self.loss_fn(model, batch)
                out.loss_sum.backward()
                loss_sum += float(out.loss_sum.detach())
                units += out.n_units
                for k, v in out.metric_sums.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            for p in model.parameters():  # exact mean over every unit in the window
                if p.grad is not None:
                    p.grad.div_(max(units, 1))
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
            finite = NonFiniteGuard.finite(loss_sum, grad_norm)
            if finite:
                self.optimizer.step()
            self.scheduler.step()  # the schedule and the data stream move on either way
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.nonfinite.record(finite, self.step, lambda: latest_checkpoint(self.run.checkpoints_dir))
            means = self.finalize_metrics({self.loss_name: loss_sum / max(units, 1),
                                           **{k: v / max(units, 1) for k, v in sums.items()}})
            window = {**{f"train/{k}": v for k, v in means.items()},
                      "train/lr": self.scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm),
                      "train/skipped_nonfinite": self.nonfinite.total}
            evaluated = self.step % cfg.eval_every == 0 or self.step == self.total_steps
            if evaluated:
                last_eval = self.evaluate()
                window.update(last_eval)
            if evaluated or self.step % cfg.log_every == 0:
                self.run.metrics.log(self.step, window)
            bar.update(1)
            bar.set_postfix(format_postfix({k.split("/")[-1]: v for k, v in window.items() if k.startswith("train/")},
                                           list(self.postfix_keys)))
            if self.step < self.total_steps:
                if stop.requested:
                    bar.close()
                    raise TrainingInterrupted(stop.signum, self.step, self.save_checkpoint())
                if cfg.save_every and self.step % cfg.save_every == 0 and finite:
                    self.save_checkpoint()
        bar.close()
        return {"steps": self.step, "seconds": time.perf_counter() - started,
                **{f"initial_{k}": v for k, v in self.first_eval.items()}, **last_eval,
                **{k: v for k, v in window.items() if k.startswith("train/")}}
