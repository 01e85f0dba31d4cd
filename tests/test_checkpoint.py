"""Atomic checkpoints: a write without its completion marker is never used."""

import random

import numpy as np
import torch

from quartet.runs.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    rng_state,
    save_checkpoint,
    save_training_state,
    set_rng_state,
)


def _write(value: str):
    def write(tmp):
        (tmp / "payload.txt").write_text(value)
    return write


def test_latest_complete_checkpoint_wins_and_old_ones_are_pruned(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, _write(str(step)), keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert (latest_checkpoint(tmp_path) / "payload.txt").read_text() == "3"


def test_checkpoint_without_marker_is_ignored(tmp_path):
    save_checkpoint(tmp_path, 1, _write("good"), keep=3)
    torn = tmp_path / "step-2"  # as if the process died before the marker was written
    torn.mkdir()
    (torn / "payload.txt").write_text("half")
    assert latest_checkpoint(tmp_path).name == "step-1"


def test_failed_write_leaves_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, _write("good"), keep=3)

    def crash(tmp):
        (tmp / "payload.txt").write_text("partial")
        raise OSError("disk full")

    try:
        save_checkpoint(tmp_path, 2, crash, keep=3)
    except OSError:
        pass
    assert latest_checkpoint(tmp_path).name == "step-1"
    assert not (tmp_path / "step-2").exists()


def test_rng_state_round_trip_through_safe_load(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_training_state(tmp_path / "s.pt", {"rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_training_state(tmp_path / "s.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
