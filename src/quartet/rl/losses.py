"""RLHF losses: clipped policy surrogate, clipped value loss, the reward model's pairwise
(Bradley-Terry) loss, the explained-variance diagnostic, and the per-token clipped objective
of the critic-free methods (DAPO clip-higher, dual clip, GSPO's sequence ratio).

Token-level losses average over all valid tokens of the batch (``masked_mean`` with
``dim=None``), like DeepSpeed-Chat; ``clipped_policy_objective`` returns per-token losses
instead and leaves the averaging to ``quartet.rl.aggregation``. Invalid positions are replaced
by 0 before any arithmetic, so garbage there cannot reach the loss or its gradient. Stats are
detached 0-dim tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quartet.rl.masks import masked_mean, masked_var

__all__ = ["policy_loss", "value_loss", "pairwise_loss", "explained_variance", "clipped_policy_objective"]


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


def clipped_policy_objective(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    sequence_ratio: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped surrogate losses ``[B, T]`` (0 on invalid positions) and detached stats.

    ``loss_t = max(-A_t * ratio_t, -A_t * clamp(ratio_t, 1 - clip_low, 1 + clip_high))`` with
    ``ratio_t = exp(logp_t - old_logp_t)``; ``clip_high > clip_low`` is DAPO's clip-higher
    (0.2 / 0.28). ``advantages`` is ``[B, T]``, or ``[B]`` (one per sequence, as GRPO's).

    ``dual_clip=c`` (``c > 1``, typically 3; Ye et al. 2020, verl's ``clip_ratio_c``): where
    ``A_t < 0`` the loss is further capped, ``min(loss_t, -A_t * c)``, so a huge ratio on a bad
    token cannot blow up the update.

    ``sequence_ratio=True`` is GSPO-token (Zheng et al. 2025): the ratio is the row's
    sequence-level ``s_i = exp(mean over its action tokens of (logp - old_logp))``, written as
    ``ratio_t = exp(logp_t - sg(logp_t) + sg(log s_i))``: its value is ``s_i`` and the gradient
    flows through each token's own ``logp_t``. (Pair it with ``seq-mean-token-mean``
    aggregation to get GSPO's sequence objective.)

    Average with ``quartet.rl.aggregation.aggregate``; with ``clip_low == clip_high``, no dual
    clip and token ratios, ``aggregate(loss, mask, "token-mean")`` is ``policy_loss`` bit for bit.

    Stats (fractions of valid tokens): ``clipfrac`` (the clipped term is strictly larger, as in
    ``policy_loss``; before the dual clip), ``clipfrac_low`` (``A < 0`` and
    ``ratio < 1 - clip_low``), ``clipfrac_high`` (``A > 0`` and ``ratio > 1 + clip_high``),
    ``dual_clipfrac`` (with ``dual_clip``: ``A < 0`` and the cap ``-A * c`` took over),
    ``approx_kl`` (``masked_mean(0.5 * (logp - old_logp)**2)``, per token even with
    ``sequence_ratio``) and ``ratio_mean`` (mean ``ratio_t`` as used in the loss).
    """
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (typically 3) or None, got {dual_clip}")
    valid = mask.bool()  # [B, T]
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1).expand_as(logp)  # [B] -> [B, T]
    token_log_ratio = _valid_or_zero(logp - old_logp, valid)  # [B, T]
    advantages = _valid_or_zero(advantages, valid)  # [B, T]
    if sequence_ratio:
        log_s = masked_mean(token_log_ratio, mask, dim=1)  # [B] log s_i; an empty row gives 0
        logp_valid = _valid_or_zero(logp, valid)  # [B, T]
        log_ratio = _valid_or_zero(logp_valid - logp_valid.detach() + log_s.detach().unsqueeze(-1), valid)  # [B, T]
    else:
        log_ratio = token_log_ratio
    ratio = torch.exp(log_ratio)  # [B, T]
    pg_losses = -advantages * ratio  # [B, T]
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    clipped_max = torch.max(pg_losses, pg_losses_clipped)  # [B, T]
    if dual_clip is None:
        losses = clipped_max
    else:
        capped = torch.min(clipped_max, -advantages * dual_clip)  # [B, T]
        losses = torch.where(advantages < 0, capped, clipped_max)  # [B, T]
    losses = _valid_or_zero(losses, valid)  # [B, T]
    with torch.no_grad():
        stats = {
            "clipfrac": _fraction(pg_losses_clipped > pg_losses, mask, ratio.dtype),
            "clipfrac_low": _fraction((advantages < 0) & (ratio < 1.0 - clip_low), mask, ratio.dtype),
            "clipfrac_high": _fraction((advantages > 0) & (ratio > 1.0 + clip_high), mask, ratio.dtype),
            "approx_kl": masked_mean(0.5 * token_log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
        if dual_clip is not None:
            dual_clipped = (advantages < 0) & (clipped_max > -advantages * dual_clip)  # [B, T]
            stats["dual_clipfrac"] = _fraction(dual_clipped, mask, ratio.dtype)
    return losses, stats


def _fraction(condition: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Fraction (0-dim) of valid tokens where the bool ``condition`` ``[B, T]`` holds."""
    return masked_mean(condition.to(dtype), mask)
