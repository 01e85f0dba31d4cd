"""KL-coefficient (beta) controllers for the per-token KL penalty.

``FixedKLController`` keeps beta constant (DeepSpeed-Chat). ``AdaptiveKLController`` is
Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences"): a proportional
controller steering the measured KL toward ``target``, moving beta by at most 20% per
``horizon`` steps. State dicts hold plain Python floats (JSON-serialisable).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FixedKLController", "AdaptiveKLController"]


class FixedKLController:
    """Constant beta; ``update`` does nothing."""

    def __init__(self, beta: float) -> None:
        self.value: float = float(beta)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive beta (Ziegler et al. 2019).

    ``proportional_error = clip(current_kl / target - 1, -0.2, 0.2)``,
    ``beta *= 1 + proportional_error * n_steps / horizon``. KL above target raises beta,
    below lowers it. ``current_kl`` is the mean per-sequence KL; ``n_steps`` the number of
    samples (or steps) since the last update, in the same unit as ``horizon``.
    """

    def __init__(self, init_beta: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value: float = float(init_beta)
        self.target: float = float(target)
        self.horizon: float = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        mult = 1.0 + proportional_error * n_steps / self.horizon
        self.value *= mult

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))
