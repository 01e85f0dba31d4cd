"""The supervised stages' step (SFT and reward model), run by the one run loop (runs/loop.py).

A stage supplies a `loss_fn(model, batch) -> LossSum`; this job owns the rest of a step:
seeded data order, gradient accumulation, clipping, warm-up + cosine schedule, optional
bf16 autocast and evaluation. Progress, checkpoints, resume and signals are the loop's.

Accumulation is exact: each micro-batch returns a *sum* of per-unit losses (tokens for SFT,
pairs for the reward model) and the accumulated gradient is divided by the total number of
units in the window, so a window of uneven micro-batches weighs every unit equally.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from quartet.config import TrainConfig
from quartet.runs.checkpoint import load_weights
from quartet.runs.faults import NonFiniteGuard
from quartet.runs.loop import Job, RunLoop, StepOutcome
from quartet.runs.optim import advance_schedule, load_optimizer_state, make_optimizer, warmup_cosine_schedule
from quartet.runs.precision import autocast_context
from quartet.runs.progress import format_postfix
from quartet.runs.run import Run
from quartet.runs.seeds import derive_seed


@dataclass
class LossSum:
    """Loss of one micro-batch as a sum over its units, plus metric sums over the same units."""

    loss_sum: torch.Tensor
    n_units: int
    metric_sums: dict[str, float] = field(default_factory=dict)


def move_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batch_order(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled micro-batches of example indices for one epoch, the same for the same (seed, epoch)."""
    order = list(range(n_examples))
    random.Random(derive_seed(seed, "data_order", epoch)).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]


class SupervisedTrainer(Job):
    """Runs `loss_fn` over `train_data` for the configured number of optimizer steps.

    On several ranks (see quartet.runs.distributed) `cfg.batch_size` is the global micro-batch:
    each rank takes its share of every micro-batch, so one optimizer step sees the same
    examples, and the same exact per-unit mean, on any number of ranks.
    """

    nonfinite_metric = "train/skipped_nonfinite"

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
        frozen: tuple[torch.nn.Module, ...] = (),
    ):
        """`module` (default `model`) is what `loss_fn` runs: e.g. a TokenValueModel around `model`.

        `count_units(batch)` counts the units `loss_fn` sums over (tokens, pairs), known before
        the forward pass so every micro-batch's loss can be scaled to the exact window mean.
        `save_model(directory, state_dict)` writes `model`; `state_dict` holds the gathered
        weights when the trained copy is sharded (FSDP, DeepSpeed ZeRO-3), else None.
        Under FSDP `module` is sharded here (its transformer blocks and itself), before its optimizer.
        `frozen`: models `loss_fn` runs but nothing trains (DPO's reference), counted in the memory report.
        """
        if not train_data:
            raise ValueError("no training examples left after loading and truncation")
        self.model, self.train_data, self.eval_data = model, train_data, eval_data
        self.module = run.ranks.shard(module if module is not None else model, model)
        self.collate, self.loss_fn, self.count_units = collate, loss_fn, count_units
        self.cfg, self.run, self.seed, self.ranks = cfg, run, seed, run.ranks
        self.save_model, self.loss_name, self.postfix_keys = save_model, loss_name, postfix_keys
        # turns per-unit means into the reported metrics (e.g. a std from mean and mean square)
        self.finalize_metrics = finalize_metrics or (lambda metrics: metrics)
        self.device, self.frozen = run.device, frozen
        self.batches_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.batches_per_epoch / cfg.grad_accum))
        self.optimizer = make_optimizer(self.module.parameters(), cfg.lr, cfg.weight_decay)
        warmup = int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = warmup_cosine_schedule(self.optimizer, warmup, self.total_steps)
        self.step = 0
        self.micro_batches_done = 0  # position in the global data stream, for resume
        self.first_eval: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.window: dict[str, float] = {}  # the last step's train/ metrics
        self.prepared: torch.nn.Module | None = None  # `module` wrapped for the launched backend
        self.metric_names: list[str] = []
        self._stream: Iterator[tuple[dict[str, Any], bool]] | None = None

    # ------------------------------------------------------------------ data stream

    def _micro_batches(self) -> Iterator[tuple[dict[str, Any], bool]]:
        """This rank's share of each global micro-batch, and whether the share is real.

        A rank whose share is empty (a short last batch) runs one example with zero weight,
        so every rank takes part in every gradient all-reduce.
        """
        index = self.micro_batches_done
        epoch_orders: dict[int, list[list[int]]] = {}  # one shuffle per epoch, not one per micro-batch
        while True:
            epoch, position = divmod(index, self.batches_per_epoch)
            if epoch not in epoch_orders:
                epoch_orders = {epoch: batch_order(len(self.train_data), self.cfg.batch_size, self.seed, epoch)}
            indices = epoch_orders[epoch][position]
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

    # ------------------------------------------------------------------ checkpoints (the loop's Job)

    def model_writer(self) -> Callable[[Path], None]:
        state_dict = self.full_state_dict()  # a collective when sharded
        return lambda tmp: self.save_model(tmp / "model", state_dict)

    def training_state(self) -> dict[str, Any]:
        return {
            # a sharded optimizer's state lives on every rank; it is not gathered
            "optimizer": None if self.ranks.shards_parameters else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "micro_batches_done": self.micro_batches_done,
            "first_eval": self.first_eval,
        }

    def load_models(self, checkpoint: Path) -> None:
        load_weights(self.model, checkpoint / "model")

    def sharded_parts(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        return self.module, self.optimizer

    def frozen_models(self) -> tuple[torch.nn.Module, ...]:
        return self.frozen

    def load_training_state(self, state: dict[str, Any], checkpoint: Path) -> None:
        load_optimizer_state(self.optimizer, state["optimizer"], checkpoint)
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro_batches_done = state["micro_batches_done"]
        self.first_eval = state["first_eval"]

    # ------------------------------------------------------------------ training

    def train(self) -> dict[str, float]:
        """Train to `total_steps`; returns the first and last eval metrics and timing."""
        seconds = RunLoop(self, self.run, self.cfg).run_to_end()
        return {"steps": self.step, "seconds": seconds,
                **{f"initial_{k}": v for k, v in self.first_eval.items()}, **self.last_eval,
                **{k: v for k, v in self.window.items() if k.startswith("train/")}}

    def begin(self) -> None:
        if self.ranks.rank > 0 and not self.rank_rng_restored:  # dropout draws differ between ranks, reproducibly
            torch.manual_seed(derive_seed(self.seed, "rank_dropout", self.ranks.rank, self.step))
        self.metric_names = self._find_metric_names()
        self.prepared, self.optimizer = self.ranks.prepare(self.module, self.optimizer)
        self.prepared.train()
        if self.step == 0:
            self.first_eval = self.evaluate()
            if self.first_eval:
                self.run.metrics.log(0, self.first_eval)
        self.last_eval = self.first_eval
        self._stream = self._micro_batches()

    def train_step(self) -> StepOutcome:
        """One optimizer step over `grad_accum` global micro-batches."""
        cfg, ranks, names, model = self.cfg, self.ranks, self.metric_names, self.prepared
        shares = [next(self._stream) for _ in range(cfg.grad_accum)]
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
        advance_schedule(self.scheduler)  # the schedule and the data stream move on either way
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        units = max(global_units, 1.0)
        means = self.finalize_metrics({self.loss_name: totals[0] / units,
                                       **{k: totals[1 + j] / units for j, k in enumerate(names)}})
        window = {**{f"train/{k}": v for k, v in means.items()},
                  "train/lr": self.scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm)}
        self.window = window
        evaluated = self.step % cfg.eval_every == 0 or self.step == self.total_steps
        if evaluated:
            self.last_eval = self.evaluate()
            window.update(self.last_eval)
        return StepOutcome(window, finite, log=evaluated)

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        return format_postfix({k.split("/")[-1]: v for k, v in metrics.items() if k.startswith("train/")},
                              list(self.postfix_keys))

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Gathered weights of a sharded trained model (a collective), else None."""
        return self.ranks.full_state_dict(self.prepared) if self.ranks.shards_parameters else None
