"""FSDP2: the trained models' parameters, gradients and optimizer state split over the ranks.

Quartet shards with torch's own FSDP2 (`torch.distributed.fsdp.fully_shard`), the same code on
CPU (gloo) and GPU (NCCL). Accelerate 1.15 sets FSDP up on GPUs only, so Quartet reads the same
switch as Accelerate (`run.fsdp`, or `accelerate launch` with an FSDP config, which sets
ACCELERATE_USE_FSDP) and shards the models itself; `Ranks.prepare` then leaves them alone.

- Units: each transformer block (the blocks a Hugging Face model names in `_no_split_modules`,
  as Accelerate's TRANSFORMER_BASED_WRAP) is one unit; the root unit holds the rest (embeddings,
  final norm, heads). A rank keeps 1/N of every parameter (a DTensor) and gathers one block's
  full weights for its forward and backward; gradients are reduce-scattered to the shards.
- The optimizer is built on the shards, so Adam's moments are sharded too.
- Generation gathers the actor's full weights once for the rollout (`gathered`) and frees them
  after; forwards inside run no collectives, so ranks may stop decoding at different steps.
- Checkpoints hold the shards as written by `torch.distributed.checkpoint` (every rank writes
  its own); loading reshards them for any number of processes, one process included.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

SHARDED_STATE = "sharded"  # the checkpoint subdirectory of torch.distributed.checkpoint files (model + optimizer)

# the reshard_after_forward each unit was built with, restored after `gathered`
_RESHARD_AFTER_FORWARD: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def _flag(environ: Mapping[str, str], name: str, default: bool = False) -> bool:
    return environ.get(name, str(default)).strip().lower() in ("1", "true", "yes")


def launcher_asks_for_fsdp(environ: Mapping[str, str] = os.environ) -> bool:
    """`accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP=true."""
    return _flag(environ, "ACCELERATE_USE_FSDP")


def fsdp_requested(setting: bool | None, environ: Mapping[str, str] = os.environ) -> bool:
    """The one switch: `run.fsdp` when set, else whether the launcher asked for FSDP. The two may not
    contradict each other on several processes (`Ranks` refuses run.fsdp: false under an FSDP config)."""
    return setting if setting is not None else launcher_asks_for_fsdp(environ)


def reshard_after_forward(setting: bool | None, environ: Mapping[str, str] = os.environ) -> bool:
    """`run.fsdp_reshard_after_forward`, else the launcher's fsdp_reshard_after_forward, else true."""
    return setting if setting is not None else _flag(environ, "FSDP_RESHARD_AFTER_FORWARD", default=True)


def check_launcher_settings(environ: Mapping[str, str] = os.environ) -> None:
    """Refuse the FSDP settings of an Accelerate config that Quartet's own sharding does not honour."""
    if not launcher_asks_for_fsdp(environ):
        return
    if _flag(environ, "FSDP_OFFLOAD_PARAMS"):
        raise ValueError("the Accelerate config sets fsdp_offload_params: true, which Quartet's FSDP2 sharding does "
                         "not do; set it to false (parameters stay on the device, sharded over the ranks)")
    if _flag(environ, "FSDP_ACTIVATION_CHECKPOINTING"):
        raise ValueError("the Accelerate config sets fsdp_activation_checkpointing: true; set it to false and use "
                         "the model's gradient_checkpointing setting instead")


@dataclass(frozen=True)
class Sharding:
    """How this run shards: over which ranks (a 1-D device mesh), and when gathered blocks are freed."""

    mesh: object  # torch.distributed.device_mesh.DeviceMesh
    reshard_after_forward: bool
    frozen: bool  # shard the frozen models (reference, reward) too


def make_sharding(device: torch.device, world: int, reshard: bool, frozen: bool) -> Sharding:
    """A 1-D mesh over the `world` ranks of the process group the launcher started."""
    from torch.distributed.device_mesh import init_device_mesh

    return Sharding(init_device_mesh(device.type, (world,)), reshard, frozen)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks: the module classes it names in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no transformer blocks (_no_split_modules) for FSDP to shard "
                         "one by one; run it with DDP (leave run.fsdp unset)")
    return blocks


def shard(root: torch.nn.Module, model: torch.nn.Module, sharding: Sharding, trained: bool = True) -> torch.nn.Module:
    """Shard each transformer block of `model`, then `root` (the module whose forward is called: `model`
    itself or a wrapper of it) for the parameters outside the blocks. Returns `root`, sharded in place.

    Sharding replaces the parameters by DTensors: build the optimizer afterwards.
    """
    from torch.distributed.fsdp import fully_shard

    if hasattr(model, "peft_config"):
        raise ValueError("LoRA adapters are not sharded with FSDP here; train them with DDP (leave run.fsdp unset)")
    for block in transformer_blocks(model):
        fully_shard(block, mesh=sharding.mesh, reshard_after_forward=sharding.reshard_after_forward)
        _RESHARD_AFTER_FORWARD[block] = sharding.reshard_after_forward
    # a trained root keeps its weights gathered from its forward to its backward (FSDP's default for a
    # root); a frozen one has no backward, so it frees them after each forward
    fully_shard(root, mesh=sharding.mesh, reshard_after_forward=not trained)
    _RESHARD_AFTER_FORWARD[root] = not trained
    # a value model returns its score head's output squeezed (a view); Quartet only slices and gathers
    # it, never writes into it, which is what this warning is about
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPTokenValueModel\) returned a view tensor")
    return root


def units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP units in `module`'s tree (itself included)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(module: torch.nn.Module) -> Iterator[int]:
    """Every parameter of `module` gathered on every rank until the block ends, then freed again.

    Yields the bytes gathered (this rank's full copy). Forwards inside run no collectives.
    """
    fsdp_units = units(module)
    for unit in fsdp_units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)  # keep them through every decoding step
    try:
        yield local_bytes(module.parameters())
    finally:
        for unit in fsdp_units:
            unit.reshard()
            unit.set_reshard_after_forward(_RESHARD_AFTER_FORWARD.get(unit, True), recurse=False)


def full_state_dict(module: torch.nn.Module, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The gathered (unsharded) weights on the main rank, in CPU memory; None elsewhere. A collective.

    A tied weight (an LM head that is the embedding) is listed once, under its first name, as in
    the safetensors files `save_pretrained` writes from a whole model.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    tied = {n for n, _ in module.named_parameters(remove_duplicate=False)} - {n for n, _ in module.named_parameters()}
    return {k: v for k, v in state.items() if k not in tied}


def clip_norm_to_plain(norm: torch.Tensor) -> torch.Tensor:
    """The global norm of sharded gradients as a plain tensor (the sum over the shards: an all-reduce)."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ----------------------------------------------------------------------------- checkpoints


def is_sharded_checkpoint(checkpoint: Path) -> bool:
    return (Path(checkpoint) / SHARDED_STATE / ".metadata").is_file()


def save_sharded_state(directory: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of `module`'s weights and `optimizer`'s state into `directory`
    (a collective; a shared filesystem, as for any checkpoint of a multi-process run)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))


def load_sharded_state(directory: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read a `save_sharded_state` checkpoint into `module` and `optimizer` as this run lays them out:
    sharded over any number of ranks, or whole on one process (torch.distributed.checkpoint reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    # the optimizer's state is laid out (zero moments, by a step of learning rate 0) to be read into
    model_state, optimizer_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory), no_dist=not torch.distributed.is_initialized())
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


# ----------------------------------------------------------------------------- memory


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this rank holds of `tensors`: a sharded tensor (DTensor) counts its local shard only."""
    from torch.distributed.tensor import DTensor

    total = 0
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state on this rank (Adam: the two moments and the step counters)."""
    return local_bytes(v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))


def peak_memory(device: torch.device) -> tuple[str, int]:
    """The process's peak memory so far: allocated on the GPU, else the resident set (RSS) of the process."""
    if device.type == "cuda":
        return "peak GPU memory", torch.cuda.max_memory_allocated(device)
    import resource

    return "peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
