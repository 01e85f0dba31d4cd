"""Generalised advantage estimation (GAE) and masked whitening for PPO.

Each row is one episode: its valid tokens form a prefix (see ``quartet.rl.masks``), and the
state after the last valid token is terminal (value 0). The results are regression /
policy-gradient targets: call under ``torch.no_grad()`` (or pass detached tensors).
"""

from __future__ import annotations

import torch

from quartet.rl.masks import masked_mean, masked_var

__all__ = ["gae_advantages", "whiten"]


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns, both ``[B, T]`` and 0 on invalid positions.

    Backwards from each row's last valid token:
    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``,
    with ``V`` and ``A`` taken as 0 past the last valid token; ``returns = A + V``.
    (An invalid position inside a row would act as an episode end.)
    """
    valid = mask.bool()  # [B, T]
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    r = torch.where(valid, rewards.to(values.dtype), zero)  # [B, T]
    v = torch.where(valid, values, zero)  # [B, T]
    n_steps = v.shape[-1]
    next_value = torch.zeros_like(v[:, 0])  # [B] V_{t+1}
    next_advantage = torch.zeros_like(v[:, 0])  # [B] A_{t+1}
    advantages_reversed = []
    for t in reversed(range(n_steps)):
        delta = r[:, t] + gamma * next_value - v[:, t]  # [B]
        advantage = torch.where(valid[:, t], delta + gamma * lam * next_advantage, zero)  # [B]
        advantages_reversed.append(advantage)
        next_value, next_advantage = v[:, t], advantage
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # [B, T]
    returns = torch.where(valid, advantages + v, zero)  # [B, T]
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` with mean and unbiased var over all valid tokens; 0 on invalid positions.

    ``shift_mean=False`` adds the mean back (rescale only), as in TRL / DeepSpeed-Chat ``masked_whiten``.
    """
    x = torch.where(mask.bool(), x, torch.zeros_like(x))  # [B, T] garbage out before any arithmetic
    mean = masked_mean(x, mask)  # []
    var = masked_var(x, mask, unbiased=True)  # []
    whitened = (x - mean) * torch.rsqrt(var + eps)  # [B, T]
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))
