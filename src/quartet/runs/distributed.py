"""Several processes, one run: a thin layer over Hugging Face Accelerate (torch.distributed).

Every stage runs the same code on one process or many. Launched by `torchrun` or `accelerate
launch`, each process is a rank; Accelerate picks the backend (gloo on CPU, NCCL on GPU) and
wraps trained models for DDP or DeepSpeed. FSDP is Quartet's own (runs/sharding.py: torch's
FSDP2 on CPU and GPU alike), switched on by `run.fsdp` or an Accelerate FSDP config. Quartet's
rules on top of it:

- batch sizes in configs are global: a step sees the same examples on any number of ranks,
  and each rank takes its share of every micro-batch;
- metrics are reduced over ranks before they are logged, so they describe the global batch;
- only the main rank writes to the run directory (config, metrics, samples, final models);
  checkpoints hold full, unsharded state (one process, DDP), or each rank's shards written with
  torch.distributed.checkpoint (FSDP); both resume on any number of ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

from quartet.runs import sharding as fsdp


def make_accelerator(device: str = "auto") -> Accelerator:
    """The Accelerator for `run.device` ('auto', 'cpu', 'cuda' or 'cuda:N').

    The process layout comes from the launcher (torchrun / accelerate launch environment); a
    plain `python` start is one process. Mixed precision stays Quartet's own `bf16` switch.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("run.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    # Accelerate sets up multi-process CPU runs (gloo) only when asked for the CPU explicitly
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_cpu", cpu) != cpu:
        # one process running stages on different devices (tests, notebooks): start afresh
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=cpu)
    if device.startswith("cuda:") and accelerator.num_processes == 1:
        torch.cuda.set_device(torch.device(device))
        accelerator.state.device = torch.device(device)
    return accelerator


def strip_prefix(state_dict: dict[str, torch.Tensor] | None, prefix: str) -> dict[str, torch.Tensor] | None:
    """Keys of a wrapper's state dict without the wrapper's attribute prefix (e.g. 'model.')."""
    if state_dict is None:
        return None
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def clip_grad_norm(parameters: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """torch.nn.utils.clip_grad_norm_, bit for bit, minus the pass over every gradient when it would multiply by 1.

    Returns the total 2-norm before clipping (NaN/inf when a gradient is not finite).
    """
    if not parameters:
        return 0.0
    grads = [p.grad for p in parameters]
    # torch's own operations for a single (device, dtype) group, without regrouping the gradients
    # on every call (about 1 ms of Python per model and optimizer step)
    plain = _one_plain_group(grads)
    norm = (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0) if plain
            else torch.nn.utils.get_total_norm(grads, 2.0))
    norm = fsdp.clip_norm_to_plain(norm)  # sharded gradients: the sum over the shards, the same on every rank
    if max_norm is not None:
        coefficient = max_norm / (norm + 1e-6)  # torch's clip coefficient, before clamping to 1
        if bool(coefficient < 1.0):
            if plain:
                torch._foreach_mul_(grads, coefficient)
            else:
                torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return float(norm)


def _one_plain_group(grads: list[torch.Tensor]) -> bool:
    """Dense, plain tensors of one device and dtype: what torch's foreach norm and multiply take as one group."""
    first = grads[0]
    return all(type(g) is torch.Tensor and g.layout == torch.strided and g.device == first.device
               and g.dtype == first.dtype for g in grads)


class Ranks:
    """Who this process is among the ranks of a run, and the collectives the stages need."""

    def __init__(self, accelerator: Accelerator, fsdp_setting: bool | None = None, fsdp_frozen: bool = False,
                 fsdp_reshard_after_forward: bool | None = None):
        """`fsdp_*`: the run section's FSDP settings (see quartet.runs.sharding)."""
        self.accelerator = accelerator
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.device = accelerator.device
        self.fsdp_requested = fsdp.fsdp_requested(fsdp_setting)
        self.fsdp: fsdp.Sharding | None = None  # FSDP2 sharding of this run (several ranks, asked for)
        self.gathered_bytes = 0  # the most bytes of weights `full_parameters` gathered at once, under FSDP
        if self.fsdp_requested:
            fsdp.check_launcher_settings()
            if self.world > 1:
                self.fsdp = fsdp.make_sharding(self.device, self.world,
                                               fsdp.reshard_after_forward(fsdp_reshard_after_forward), fsdp_frozen)
        elif self.distributed and fsdp.launcher_asks_for_fsdp():
            raise ValueError("the Accelerate config asks for FSDP but run.fsdp is false; drop one of the two")

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def shards_parameters(self) -> bool:
        """FSDP or DeepSpeed: a rank may hold only part of a trained model's parameters."""
        return self.fsdp is not None or self.accelerator.distributed_type == DistributedType.DEEPSPEED

    # ------------------------------------------------------------------ splitting work

    def share(self, items: Sequence, what: str = "batch") -> tuple[int, int]:
        """(start, end) of this rank's contiguous share of `items`; shares differ by at most one."""
        n = len(items)
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def check_divisible(self, value: int, name: str) -> None:
        if value % self.world:
            raise ValueError(f"{name} = {value} must be divisible by the number of processes ({self.world})")

    # ------------------------------------------------------------------ collectives

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of the same-length list of numbers over all ranks (float64)."""
        if not self.distributed:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        return [float(v) for v in self.accelerator.reduce(tensor, reduction="sum")]

    def max_float(self, value: float) -> float:
        """The largest of one number over all ranks."""
        if not self.distributed:
            return float(value)
        return float(self.gather_rows(torch.tensor([float(value)], dtype=torch.float64, device=self.device)).max())

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on at least one (e.g. a stop signal)."""
        if not self.distributed:
            return flag
        return self.sum_floats([1.0 if flag else 0.0])[0] > 0

    def gather_rows(self, tensor: torch.Tensor, pad_value: float = 0, pad_first: bool = False) -> torch.Tensor:
        """Concatenate every rank's rows in rank order; dim 1 is padded to the longest first."""
        if not self.distributed:
            return tensor
        if tensor.dim() > 1:
            tensor = self.accelerator.pad_across_processes(tensor, dim=1, pad_index=pad_value, pad_first=pad_first)
        return self.accelerator.gather(tensor.contiguous())

    def gather_objects(self, items: list) -> list:
        """Concatenate every rank's list of picklable objects (strings) in rank order."""
        if not self.distributed:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(items)

    def print(self, *args, **kwargs) -> None:
        """print() on the main rank only."""
        if self.is_main:
            print(*args, **kwargs)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def from_main(self, value):
        """The main rank's `value` (a picklable object) on every rank."""
        if not self.distributed:
            return value
        objects = [value]
        torch.distributed.broadcast_object_list(objects, src=0)
        return objects[0]

    # ------------------------------------------------------------------ models

    def shard(self, root: torch.nn.Module, model: torch.nn.Module | None = None) -> torch.nn.Module:
        """Under FSDP, shard a trained model's transformer blocks and then `root`, the module whose
        forward runs (default `model`); otherwise `root` as it is. Call before building its optimizer."""
        root = root.to(self.device)
        return root if self.fsdp is None else fsdp.shard(root, model if model is not None else root, self.fsdp)

    def shard_frozen(self, root: torch.nn.Module, model: torch.nn.Module | None = None) -> torch.nn.Module:
        """Under FSDP with `run.fsdp_frozen`, shard a frozen model (`root` as in `shard`); otherwise as it is."""
        if self.fsdp is None or not self.fsdp.frozen:
            return root
        return fsdp.shard(root, model if model is not None else root, self.fsdp, trained=False)

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None):
        """Wrap a trained model and its optimizer for the launched backend (DDP / FSDP / DeepSpeed).

        Quartet does its own micro-batching and loss scaling, so a DeepSpeed config's "auto"
        batch fields are set to one micro-batch per step and no accumulation of its own;
        micro_batch() marks the accumulation boundaries instead. Under FSDP the model was sharded
        by `shard` before its optimizer was built: both come back as they are.
        """
        if self.fsdp is not None or self.accelerator.distributed_type == DistributedType.FSDP:
            return model, optimizer  # Quartet shards itself; Accelerate's FSDP wrapping never runs
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            for key, value in (("train_micro_batch_size_per_gpu", 1), ("gradient_accumulation_steps", 1),
                               ("gradient_clipping", max_grad_norm or 0.0)):
                if config.get(key, "auto") == "auto":
                    config[key] = value
            config["train_batch_size"] = config["train_micro_batch_size_per_gpu"] * self.world
        model, wrapped = self.accelerator.prepare(model, optimizer)
        if (self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.XLA)
                or getattr(wrapped, "scaler", None) is not None):
            return model, wrapped  # the wrapper steps the engine, syncs XLA or scales fp16 losses
        # Otherwise Accelerate's wrapper only adds bookkeeping Quartet does not use (its own gradient
        # accumulation), for about 3 ms of Python per step (package lookups, signature inspection)
        return model, wrapped.optimizer

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    @contextlib.contextmanager
    def micro_batch(self, model: torch.nn.Module, last: bool) -> Iterator[None]:
        """One micro-batch of an accumulation window: gradients are synchronised on the last only
        (FSDP reduce-scatters every micro-batch's gradients to the shards: no full gradient is kept)."""
        if not self.distributed or self.fsdp is not None:
            yield
        elif self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # DeepSpeed reduces and steps at the boundary Accelerate tells it about
            self.accelerator.gradient_state._set_sync_gradients(last)
            try:
                yield
            finally:
                self.accelerator.gradient_state._set_sync_gradients(True)
        elif last:
            yield
        else:
            with self.accelerator.no_sync(model):
                yield

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, parameters, max_norm: float | None) -> float:
        """Global gradient norm before clipping (after the all-reduce, so the same on every rank).

        Under FSDP the norm is summed over every rank's shards. Under DeepSpeed the engine clips
        (its `gradient_clipping`) and reports one norm for the model.
        """
        parameters = [p for p in parameters if p.grad is not None]
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            norm = self.accelerator.clip_grad_norm_(parameters, max_norm or float("inf"))
            return float("nan") if norm is None else float(norm)
        return clip_grad_norm(parameters, max_norm)

    @contextlib.contextmanager
    def full_parameters(self, model: torch.nn.Module, part: str | None = None) -> Iterator[torch.nn.Module]:
        """The plain model with all its parameters present, for generation outside autograd.

        With DDP or one process this is just the unwrapped model. With FSDP the shards of
        `model.<part>` (default: all of `model`) are gathered for the duration and freed after; with
        DeepSpeed ZeRO-3 the partitioned parameters likewise (all of them).
        """
        if self.fsdp is not None:
            with fsdp.gathered(getattr(model, part) if part else model) as gathered_bytes:
                self.gathered_bytes = max(self.gathered_bytes, gathered_bytes)
                yield model
            return
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            import deepspeed

            inner = self.unwrap(model)
            if getattr(self.accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3:
                with deepspeed.zero.GatheredParameters(list(inner.parameters())):
                    yield inner
                return
            yield inner
            return
        yield self.unwrap(model)

    @contextlib.contextmanager
    def scoring_parameters(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The plain model for no-grad forwards that every rank runs alike (scoring its rollouts).

        Under FSDP this is the sharded model itself: each forward gathers one block at a time, a
        collective, so every rank must run the same number of forwards. Otherwise `full_parameters`.
        """
        if self.fsdp is not None:
            yield model
            return
        with self.full_parameters(model) as plain:
            yield plain

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The full (unsharded) state dict on the main rank; None where it is not needed.

        A collective under FSDP/DeepSpeed: every rank must call it.
        """
        if self.fsdp is not None:
            return fsdp.full_state_dict(model, self.is_main)
        if not self.shards_parameters:
            return self.unwrap(model).state_dict() if self.is_main else None
        state = self.accelerator.get_state_dict(model)
        return state if self.is_main else None
