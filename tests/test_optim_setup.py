"""Optimizer set-up: the warm-up + cosine learning-rate schedule against hand-computed values, bf16 autocast."""

import math

import pytest
import torch

from quartet.runs.optim import warmup_cosine_factor, warmup_cosine_schedule


def test_factor_by_hand():
    # 4 warm-up steps, 12 in all: 0, 1/4, 2/4, 3/4, then 1 at step 4 and cos down to 0 at step 12
    assert [warmup_cosine_factor(s, 4, 12) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine_factor(8, 4, 12) == pytest.approx(0.5)  # halfway through the cosine
    assert warmup_cosine_factor(6, 4, 12) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine_factor(12, 4, 12) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine_factor(20, 4, 12) == 0.0  # past the end: stays at 0, never negative


def test_no_warmup_and_single_step():
    assert warmup_cosine_factor(0, 0, 10) == 1.0
    assert warmup_cosine_factor(0, 0, 1) == 1.0 and warmup_cosine_factor(1, 0, 1) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_drives_the_optimizer_and_round_trips_its_state():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = warmup_cosine_schedule(optimizer, 2, 6)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.0, 1.0, 2.0, 2.0 * 0.5 * (1 + math.cos(math.pi / 4))])
    resumed = warmup_cosine_schedule(torch.optim.SGD([param], lr=2.0), 2, 6)
    resumed.load_state_dict(scheduler.state_dict())
    assert resumed.last_epoch == 4 and resumed.get_last_lr() == scheduler.get_last_lr()


@pytest.mark.parametrize("native", [False, True])
def test_cpu_bf16_warns_once_when_emulated(monkeypatch, capsys, native):
    from quartet.runs import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    precision._warn_if_cpu_bf16_is_emulated.cache_clear()
    for _ in range(2):
        with precision.autocast_context(torch.device("cpu"), True):
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    warnings = capsys.readouterr().err.count("no native bf16")
    assert warnings == (0 if native else 1)
    precision._warn_if_cpu_bf16_is_emulated.cache_clear()
