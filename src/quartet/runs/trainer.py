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
import functools
import math
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

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
    if device.type == "cpu":
        _warn_if_cpu_bf16_is_emulated()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def cpu_has_native_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def _warn_if_cpu_bf16_is_emulated() -> None:
    """Once per process: bf16 on a CPU without native bf16 (AVX512-BF16/AMX) is emulated, and slow."""
    if not cpu_has_native_bf16():
        print("warning: bf16 is set but this CPU has no native bf16 matrix products; autocast emulates "
              "them (a PPO step measured about 65x slower than fp32 on an AVX2 CPU). Turn bf16 off here.",
              file=sys.stderr)


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


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any] | None, checkpoint: Path) -> None:
    """Restore Adam moments; a checkpoint from a sharded (FSDP/DeepSpeed) run has none to restore."""
    if state is None:
        print(f"warning: {checkpoint} holds no optimizer state (written under FSDP/DeepSpeed); "
              "the optimizer's moments restart from zero", file=sys.stderr)
        return
    optimizer.load_state_dict(state)


def batch_order(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled micro-batches of example indices for one epoch, the same for the same (seed, epoch)."""
    order = list(range(n_examples))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]


class SupervisedTrainer:
    """Runs `loss_fn` over `train_data` for the configured number of optimizer steps.

    On several ranks (see quartet.runs.distributed) `cfg.batch_size` is the global micro-batch:
    each rank takes its share of every micro-batch, so one optimizer step sees the same
    examples, and the same exact per-unit mean, on any number of ranks.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        train_data: list,
        eval_data: list,
        collate: Callable[[list], dict[str, Any]],
        loss_fn: Callable[[torch.nn.Module, dict[str, Any]], LossSum],
        count_units: Callable[[dict[str, Any]], int],
        cfg: TrainConfig,
        run: Run,
        seed: int,
        save_model: Callable[[Path, dict[str, torch.Tensor] | None], None],
        module: torch.nn.Module | None = None,
        loss_name: str = "loss",
        postfix_keys: tuple[str, ...] = ("loss",),
        finalize_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None,
    ):
        """`module` (default `model`) is what `loss_fn` runs: e.g. a TokenValueModel around `model`.

        `count_units(batch)` counts the units `loss_fn` sums over (tokens, pairs), known before
        the forward pass so every micro-batch's loss can be scaled to the exact window mean.
        `save_model(directory, state_dict)` writes `model`; `state_dict` holds the gathered
        weights when the trained copy is sharded (FSDP, DeepSpeed ZeRO-3), else None.
        """
        if not train_data:
            raise ValueError("no training examples left after loading and truncation")
        self.model, self.train_data, self.eval_data = model, train_data, eval_data
        self.module = module if module is not None else model
        self.collate, self.loss_fn, self.count_units = collate, loss_fn, count_units
        self.cfg, self.run, self.seed, self.ranks = cfg, run, seed, run.ranks
        self.save_model, self.loss_name, self.postfix_keys = save_model, loss_name, postfix_keys
        # turns per-unit means into the reported metrics (e.g. a std from mean and mean square)
        self.finalize_metrics = finalize_metrics or (lambda metrics: metrics)
        self.device = run.device
        self.batches_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.batches_per_epoch / cfg.grad_accum))
        self.optimizer = make_optimizer(self.module.parameters(), cfg.lr, cfg.weight_decay)
        warmup = int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = warmup_cosine_schedule(self.optimizer, warmup, self.total_steps)
        self.step = 0
        self.micro_batches_done = 0  # position in the global data stream, for resume
        self.first_eval: dict[str, float] = {}
        self.nonfinite = NonFiniteGuard(cfg.max_nonfinite_steps, where=run.stage)
        self.prepared: torch.nn.Module | None = None  # `module` wrapped for the launched backend
        self.metric_names: list[str] = []

    # ------------------------------------------------------------------ data stream

    def _micro_batches(self) -> Iterator[tuple[dict[str, Any], bool]]:
        """This rank's share of each global micro-batch, and whether the share is real.

        A rank whose share is empty (a short last batch) runs one example with zero weight,
        so every rank takes part in every gradient all-reduce.
        """
        index = self.micro_batches_done
        while True:
            epoch, position = divmod(index, self.batches_per_epoch)
            indices = batch_order(len(self.train_data), self.cfg.batch_size, self.seed, epoch)[position]
            start, end = self.ranks.share(indices)
            real = end > start
            yield self.collate([self.train_data[i] for i in (indices[start:end] if real else indices[:1])]), real
            index += 1

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss and metrics over the held-out data (dropout off), summed over ranks."""
        if not self.eval_data:
            return {}
        module = self.prepared if self.prepared is not None else self.module
        was_training = module.training
        module.eval()
        starts = list(range(0, len(self.eval_data), self.cfg.batch_size))
        world, rank = self.ranks.world, self.ranks.rank
        names = self.metric_names
        totals = [0.0, 0.0] + [0.0] * len(names)  # loss, units, metric sums
        for round_start in range(0, len(starts), world):  # equal forward counts on every rank
            mine = round_start + rank
            real = mine < len(starts)
            start = starts[mine] if real else 0
            batch = move_to(self.collate(self.eval_data[start : start + self.cfg.batch_size]), self.device)
            with autocast_context(self.device, self.cfg.bf16):
                out = self.loss_fn(module, batch)
            if real:
                totals[0] += float(out.loss_sum)
                totals[1] += out.n_units
                for i, k in enumerate(names):
                    totals[2 + i] += float(out.metric_sums.get(k, 0.0))
        totals = self.ranks.sum_floats(totals)
        module.train(was_training)
        units = max(totals[1], 1)
        means = self.finalize_metrics({self.loss_name: totals[0] / units,
                                       **{k: totals[2 + i] / units for i, k in enumerate(names)}})
        return {f"eval/{k}": v for k, v in means.items()}

    @torch.no_grad()
    def _find_metric_names(self) -> list[str]:
        """Names of the metric sums `loss_fn` returns, from one example (eval mode: no RNG drawn)."""
        was_training = self.module.training
        self.module.to(self.device).eval()
        sample = move_to(self.collate((self.eval_data or self.train_data)[:1]), self.device)
        with autocast_context(self.device, self.cfg.bf16):
            names = sorted(self.loss_fn(self.module, sample).metric_sums)
        self.module.train(was_training)
        return names

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Full model and training state, written by the main rank; every rank calls this."""
        state_dict = self.ranks.full_state_dict(self.prepared) if self.ranks.shards_parameters else None
        path = self.run.checkpoints_dir / f"step-{self.step}"
        if self.ranks.is_main:
            def write(tmp: Path) -> None:
                self.save_model(tmp / "model", state_dict)
                save_training_state(tmp / "trainer_state.pt", {
                    # a sharded optimizer's state lives on every rank; it is not gathered
                    "optimizer": None if self.ranks.shards_parameters else self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "step": self.step,
                    "micro_batches_done": self.micro_batches_done,
                    "first_eval": self.first_eval,
                    "nonfinite": self.nonfinite.state_dict(),
                    "rng": rng_state(),
                })

            path = save_checkpoint(self.run.checkpoints_dir, self.step, write, keep=self.cfg.keep_checkpoints)
        self.ranks.barrier()
        return path

    def resume(self, checkpoint: Path) -> None:
        load_weights(self.model, checkpoint / "model")
        state = load_training_state(checkpoint / "trainer_state.pt")
        load_optimizer_state(self.optimizer, state["optimizer"], checkpoint)
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
        if self.ranks.rank > 0:  # dropout draws differ between ranks, and are reproducible
            torch.manual_seed(self.seed * 1_000_003 + self.ranks.rank * 7_919 + self.step)
        cfg, ranks = self.cfg, self.ranks
        self.metric_names = names = self._find_metric_names()
        self.prepared, self.optimizer = ranks.prepare(self.module, self.optimizer)
        model = self.prepared
        model.train()
        if self.step == 0:
            self.first_eval = self.evaluate()
            if self.first_eval:
                self.run.metrics.log(0, self.first_eval)
        stream = self._micro_batches()
        bar = progress_bar(self.total_steps, desc=self.run.stage, initial=self.step, disable=not ranks.is_main)
        started = time.perf_counter()
        last_eval: dict[str, float] = self.first_eval
        window: dict[str, float] = {}
        while self.step < self.total_steps:
            shares = [next(stream) for _ in range(cfg.grad_accum)]
            self.micro_batches_done += cfg.grad_accum
            local_units = [self.count_units(batch) if real else 0 for batch, real in shares]
            global_units = ranks.sum_floats([sum(local_units)])[0]
            # DDP averages gradients over ranks: scale each loss sum so the result is the exact
            # mean over every unit of the window, on every rank
            scale = ranks.world / max(global_units, 1.0)
            totals = [0.0] * (1 + len(names))  # loss sum, metric sums
            for i, ((batch, real), units) in enumerate(zip(shares, local_units)):
                batch = move_to(batch, self.device)
                with ranks.micro_batch(model, last=i == cfg.grad_accum - 1):
                    with autocast_context(self.device, cfg.bf16):
                        out = self.loss_fn(model, batch)
                    ranks.backward(out.loss_sum * (scale if real else 0.0))
                if real:
                    totals[0] += float(out.loss_sum.detach())
                    for j, k in enumerate(names):
                        totals[1 + j] += float(out.metric_sums.get(k, 0.0))
            totals = ranks.sum_floats(totals)
            grad_norm = ranks.clip_grad_norm(model.parameters(), cfg.max_grad_norm)
            finite = NonFiniteGuard.finite(totals[0], grad_norm)
            if finite:
                self.optimizer.step()
            self.scheduler.step()  # the schedule and the data stream move on either way
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.nonfinite.record(finite, self.step, lambda: latest_checkpoint(self.run.checkpoints_dir))
            units = max(global_units, 1.0)
            means = self.finalize_metrics({self.loss_name: totals[0] / units,
                                           **{k: totals[1 + j] / units for j, k in enumerate(names)}})
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
                if ranks.any(stop.requested):  # every rank stops after the same step
                    bar.close()
                    raise TrainingInterrupted(stop.signum or signal.SIGTERM, self.step, self.save_checkpoint())
                if cfg.save_every and self.step % cfg.save_every == 0 and finite:
                    self.save_checkpoint()
        bar.close()
        return {"steps": self.step, "seconds": time.perf_counter() - started,
                **{f"initial_{k}": v for k, v in self.first_eval.items()}, **last_eval,
                **{k: v for k, v in window.items() if k.startswith("train/")}}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Gathered weights of a sharded trained model (a collective), else None."""
        return self.ranks.full_state_dict(self.prepared) if self.ranks.shards_parameters else None
