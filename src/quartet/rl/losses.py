"""PPO-RLHF losses: clipped policy surrogate, clipped value loss, the reward model's pairwise
(Bradley-Terry) loss, and the explained-variance diagnostic.

Token-level losses average over all valid tokens of the batch (``masked_mean`` with
``dim=None``), like DeepSpeed-Chat. Invalid positions are replaced by 0 before any
arithmetic, so garbage there cannot reach the loss or its gradient. Stats are detached 0-dim tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quartet.rl.masks import masked_mean, masked_var

__all__ = ["policy_loss", "value_loss", "pairwise_loss", "explained_variance"]


def _valid_or_zero(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x, torch.zeros_like(x))


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate ``masked_mean(max(-A * ratio, -A * clamp(ratio, 1 - c, 1 + c)))``, ``ratio = exp(logp - old_logp)``.

    Stats: ``clipfrac`` (fraction of valid tokens where the clipped term is strictly larger,
    i.e. the gradient is cut off) and ``approx_kl`` (``masked_mean(0.5 * (logp - old_logp)**2)``).
    """
    valid = mask.bool()  # [B, T]
    log_ratio = _valid_or_zero(logp - old_logp, valid)  # [B, T]
    advantages = _valid_or_zero(advantages, valid)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    pg_losses = -advantages * ratio  # [B, T]
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)  # [B, T]
    loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)  # []
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_losses_clipped > pg_losses).to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float | None = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``0.5 * masked_mean(max((V - R)**2, (V_clipped - R)**2))``.

    ``V_clipped = old_values + clamp(values - old_values, -c, c)``; ``cliprange_value=None``
    disables clipping (plain ``0.5 * masked_mean((V - R)**2)``). Stats: ``clipfrac`` (fraction
    of valid tokens where the clipped error is strictly larger).
    """
    valid = mask.bool()  # [B, T]
    values = _valid_or_zero(values, valid)  # [B, T]
    old_values = _valid_or_zero(old_values, valid).to(values.dtype)  # [B, T]
    returns = _valid_or_zero(returns, valid).to(values.dtype)  # [B, T]
    vf_losses = (values - returns) ** 2  # [B, T]
    if cliprange_value is None:
        vf_losses_clipped = vf_losses
    else:
        values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)  # [B, T]
        vf_losses_clipped = (values_clipped - returns) ** 2  # [B, T]
    loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), mask)  # []
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((vf_losses_clipped > vf_losses).to(values.dtype), mask)}
    return loss, stats


def pairwise_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Reward-model ranking loss over ``[B]`` score pairs (0-dim result).

    ``mean(-logsigmoid(chosen - rejected - margin)) + center_coef * mean((chosen + rejected)**2)``.
    ``margin`` (``[B]``, optional) demands the chosen score win by at least that much (Llama 2);
    ``center_coef`` pulls scores toward zero mean (TRL's ``center_rewards_coefficient``).
    """
    diff = chosen_scores - rejected_scores  # [B]
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen_scores + rejected_scores) ** 2).mean()
    return loss


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - var(returns - values) / var(returns)`` over valid tokens (0-dim).

    1 = perfect critic, 0 = no better than a constant, negative = worse; ``nan`` when the
    returns have zero variance (undefined, as in CleanRL).
    """
    valid = mask.bool()
    returns = _valid_or_zero(returns, valid)  # [B, T]
    values = _valid_or_zero(values, valid).to(returns.dtype)  # [B, T]
    var_returns = masked_var(returns, mask)  # []
    var_residual = masked_var(returns - values, mask)  # []
    nan = torch.full_like(var_returns, float("nan"))
    return torch.where(var_returns == 0, nan, 1 - var_residual / var_returns)
