"""Fixed and adaptive (Ziegler et al. 2019) KL controllers."""

import json

import pytest
import torch

from quartet.rl import AdaptiveKLController, FixedKLController


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.1)
    ctl.update(100.0, 1000)
    assert ctl.value == 0.1
    other = FixedKLController(0.5)
    other.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert other.value == 0.1


@pytest.mark.parametrize("current_kl, n_steps, expected_mult", [
    (6.6, 100, 1 + 0.1 * 100 / 1000),    # 10% above target
    (5.4, 100, 1 - 0.1 * 100 / 1000),    # 10% below target
    (6.0, 100, 1.0),                     # on target
    (60.0, 1000, 1.2),                   # far above: error clipped at +20%
    (0.0, 1000, 0.8),                    # far below: error clipped at -20%
    (60.0, 500, 1 + 0.2 * 500 / 1000),
])
def test_adaptive_controller_formula(current_kl, n_steps, expected_mult):
    ctl = AdaptiveKLController(init_beta=0.2, target=6.0, horizon=1000)
    ctl.update(current_kl, n_steps)
    assert ctl.value == pytest.approx(0.2 * expected_mult)


def test_adaptive_controller_direction_and_compounding():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=10)
    ctl.update(2.0, 5)  # KL above target: beta up (clipped error 0.2 -> x1.1)
    assert ctl.value == pytest.approx(0.11)
    ctl.update(0.5, 5)  # KL below target: beta down (clipped error -0.2 -> x0.9)
    assert ctl.value == pytest.approx(0.11 * 0.9)


def test_adaptive_controller_accepts_tensor_and_round_trips_json():
    ctl = AdaptiveKLController(0.1, target=2.0, horizon=100)
    ctl.update(torch.tensor(2.2), 10)
    state = json.loads(json.dumps(ctl.state_dict()))
    other = AdaptiveKLController(1.0, target=1.0, horizon=1)
    other.load_state_dict(state)
    assert (other.value, other.target, other.horizon) == (ctl.value, 2.0, 100.0)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.1 * 10 / 100))


def test_adaptive_controller_rejects_bad_settings():
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=1.0, horizon=0)
