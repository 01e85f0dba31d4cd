"""Atomic checkpoints: write to a temporary directory, fsync, mark complete, rename.

A checkpoint directory without its completion marker is never loaded, so a crash in the
middle of a write leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    for directory in [path, *sorted(p for p in path.rglob("*") if p.is_dir())]:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomically(final_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)`, then make the result appear at `final_dir` in one rename."""
    tmp_dir = fresh_temporary(final_dir)
    write(tmp_dir)
    return publish(tmp_dir, final_dir)


def fresh_temporary(final_dir: str | Path) -> Path:
    """An empty temporary directory beside `final_dir`, named after it and this process.

    In a sharded checkpoint every rank writes into the main rank's temporary directory.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = final_dir.parent / f".tmp-{final_dir.name}-{os.getpid()}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir()
    return tmp_dir


def publish(tmp_dir: Path, final_dir: str | Path) -> Path:
    """Mark a fully written `tmp_dir` complete, fsync it and rename it to `final_dir` in one step."""
    final_dir = Path(final_dir)
    (tmp_dir / COMPLETE_MARKER).write_text("ok\n")
    _fsync_tree(tmp_dir)
    if final_dir.exists():  # an older copy of the same step: replace it
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    fd = os.open(final_dir.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final_dir


def is_complete(checkpoint_dir: str | Path) -> bool:
    return (Path(checkpoint_dir) / COMPLETE_MARKER).is_file()


def list_checkpoints(checkpoints_root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `checkpoints_root`, oldest first."""
    root = Path(checkpoints_root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(checkpoints_root: str | Path) -> Path | None:
    found = list_checkpoints(checkpoints_root)
    return found[-1][1] if found else None


def prune_checkpoints(checkpoints_root: str | Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older ones and stale temporaries."""
    root = Path(checkpoints_root)
    for _, path in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(checkpoints_root: str | Path, step: int, write: Callable[[Path], None], keep: int,
                    tmp_dir: Path | None = None) -> Path:
    """Write checkpoint `step` atomically and prune old ones; `tmp_dir`: a `fresh_temporary` already
    holding what other ranks wrote (a sharded checkpoint), completed here by `write`."""
    path = Path(checkpoints_root) / f"step-{step}"
    if tmp_dir is None:
        path = write_atomically(path, write)
    else:
        write(tmp_dir)
        path = publish(tmp_dir, path)
    prune_checkpoints(checkpoints_root, keep)
    return path


# ----------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Every random generator a run uses, in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: str | Path, state: dict[str, Any]) -> None:
    torch.save(state, str(path))


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Load optimizer/scheduler/RNG state without unpickling arbitrary objects."""
    return torch.load(str(path), map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- model weights


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
