"""Advantages: GAE and masked whitening for PPO, and the critic-free estimators (GRPO,
Dr. GRPO, RLOO, REINFORCE++) whose baseline is the sample's prompt group (see ``quartet.rl.groups``).

Each row is one episode. Its decisions are its action tokens (``mask`` 1, see
``quartet.rl.masks``): a prefix for a single-turn response, or several turns with observation
and chat-template tokens between them (mask 0) in a multi-turn one. The token-level estimators
(GAE, discounted returns) run over the action tokens alone, carrying value and return across
the holes, and the state after the last action token is terminal (value 0). The results are
regression / policy-gradient targets: call under ``torch.no_grad()`` (or pass detached tensors).
"""

from __future__ import annotations

import torch

from quartet.rl.groups import group_mean, group_sizes, group_std
from quartet.rl.masks import masked_mean, masked_var

__all__ = [
    "gae_advantages", "whiten",
    "GRPO_SCALES", "grpo_advantages", "rloo_advantages", "group_baseline", "discounted_returns",
    "broadcast_to_tokens",
]


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns, both ``[B, T]`` and 0 on non-action positions.

    Over each row's action tokens ``t_1 < ... < t_n``, backwards from the last:
    ``delta_k = r_{t_k} + gamma * V_{t_{k+1}} - V_{t_k}``, ``A_k = delta_k + gamma * lam * A_{k+1}``,
    with ``V`` and ``A`` taken as 0 after ``t_n``; ``returns = A + V``. Observation tokens between
    turns are not decisions: they are skipped, so each action token bootstraps from the value of
    the NEXT ACTION token, and ``gamma`` / ``lam`` apply once per action token, not per position
    (as verl's multi-turn GAE). Rewards and values on non-action positions are ignored. On a
    prefix mask this is the textbook per-token GAE.
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
        # a non-action position passes the next action token's value and advantage through unchanged
        next_value = torch.where(valid[:, t], v[:, t], next_value)
        next_advantage = torch.where(valid[:, t], advantage, next_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # [B, T]
    returns = torch.where(valid, advantages + v, zero)  # [B, T]
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` with mean and unbiased var over all action tokens; 0 elsewhere.

    ``shift_mean=False`` adds the mean back (rescale only), as in TRL / DeepSpeed-Chat ``masked_whiten``.
    """
    x = torch.where(mask.bool(), x, torch.zeros_like(x))  # [B, T] garbage out before any arithmetic
    mean = masked_mean(x, mask)  # []
    var = masked_var(x, mask, unbiased=True)  # []
    whitened = (x - mean) * torch.rsqrt(var + eps)  # [B, T]
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# ---- critic-free, group-relative advantages: one scalar per sample ([B]) ----

GRPO_SCALES = ("group", "batch", "none")


def grpo_advantages(
    scores: torch.Tensor, group_ids: torch.Tensor, scale: str = "group", eps: float = 1e-6
) -> torch.Tensor:
    """GRPO advantages ``[B]``: ``A_i = (r_i - mean_g) / (std + eps)``.

    ``scale="group"``: ``std = std_g`` of the sample's group (DeepSeekMath);
    ``"batch"``: ``std`` of all ``B`` raw scores (TRL's ``scale_rewards="batch"``);
    ``"none"``: ``A_i = r_i - mean_g``, no division (Dr. GRPO).
    Stds are unbiased (``torch.std`` default, as TRL and verl). A sample alone in its group
    gets 0 (it has no baseline but itself; verl instead gives it ``r_i / (1 + eps)``).
    """
    if scale not in GRPO_SCALES:
        raise ValueError(f"unknown GRPO advantage scale {scale!r}; valid: {', '.join(GRPO_SCALES)}")
    centered = scores - group_mean(scores, group_ids)  # [B]
    if scale == "none":
        return centered
    if scale == "group":
        std = group_std(scores, group_ids)  # [B]
    else:
        std = group_std(scores, torch.zeros_like(group_ids))  # [B], the whole batch as one group
    return centered / (std + eps)


def rloo_advantages(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """RLOO advantages ``[B]``: ``A_i = r_i - (sum_{j in g, j != i} r_j) / (n_g - 1)``.

    The baseline is the mean of the OTHER samples of the group (leave-one-out, Ahmadian et al.
    2024); equal to ``n_g / (n_g - 1) * (r_i - mean_g)``. A sample alone in its group gets 0.
    """
    n = group_sizes(group_ids).to(scores.dtype)  # [B]
    others_mean = (n * group_mean(scores, group_ids) - scores) / (n - 1).clamp(min=1)  # [B]
    return torch.where(n > 1, scores - others_mean, torch.zeros_like(scores))


def group_baseline(scores: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """``r_i - mean_g`` ``[B]``: the group-mean baseline (REINFORCE++-baseline's first step, Dr. GRPO's advantage)."""
    return scores - group_mean(scores, group_ids)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Token-level returns ``[B, T]`` over each row's action tokens, 0 on the other positions.

    For action tokens ``t_1 < ... < t_n``: ``G_{t_k} = r_{t_k} + gamma * G_{t_{k+1}}``, ``G`` 0
    after ``t_n``. Observation tokens between turns neither end the episode nor count as a step:
    the return is carried across them and ``gamma`` applies once per action token (as in
    ``gae_advantages``); rewards on non-action positions are ignored. REINFORCE++ uses it on
    KL-shaped per-token rewards (``per_token_rewards``) before whitening.
    """
    valid = mask.bool()  # [B, T]
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    r = torch.where(valid, rewards, zero)  # [B, T]
    next_return = torch.zeros_like(r[:, 0])  # [B] G_{t+1}
    returns_reversed = []
    for t in reversed(range(r.shape[-1])):
        action_return = torch.where(valid[:, t], r[:, t] + gamma * next_return, zero)  # [B]
        returns_reversed.append(action_return)
        next_return = torch.where(valid[:, t], action_return, next_return)  # carried across non-action tokens
    if not returns_reversed:
        return r
    return torch.stack(returns_reversed[::-1], dim=1)  # [B, T]


def broadcast_to_tokens(sequence_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` per-sequence values onto every action token of their row ``[B, T]``, 0 elsewhere."""
    if sequence_values.shape != mask.shape[:1]:
        raise ValueError(
            f"sequence_values has shape {tuple(sequence_values.shape)} for a mask of shape {tuple(mask.shape)}; "
            "pass one value per row ([B])"
        )
    zero = torch.zeros((), dtype=sequence_values.dtype, device=sequence_values.device)
    return torch.where(mask.bool(), sequence_values.unsqueeze(-1), zero)  # [B, T]
