"""Off-policy correction: the tokens were sampled by a behaviour policy other than the one the ratio is taken against.

The behaviour policy mu sampled the tokens; its log-probs come from generation. It differs from
the trainer's policy when another engine's kernels, a compiled decode step or lower precision
sampled them, or when the weights that sampled them are older than the trainer's (asynchronous
RL). The proximal policy pi_prox is the trainer's own recomputation of the old log-probs, and the
clipped ratio pi / pi_prox is taken against it. Each token's policy-gradient term is then weighted
by the detached importance weight

    w_t = pi_prox(a_t) / mu(a_t)

- "decoupled": w as it is: the decoupled PPO objective of AReaL (Fu et al. 2025, "AReaL: A
  Large-Scale Asynchronous Reinforcement Learning System for Language Reasoning"; Hilton et al.
  2022, "Batch size-invariance for policy optimization", for the decoupling itself);
- "tis": min(w, cap), truncated importance sampling (Yao et al. 2025, "Your Efficient RL
  Framework Secretly Brings You Off-Policy RL Training"; verl's `tis_imp_ratio_cap`, 2 there).

Where behaviour and proximal log-probs are equal, w is exactly 1 and the loss is unchanged.
"""

from __future__ import annotations

import torch

from quartet.rl.masks import masked_mean

__all__ = ["behaviour_weights"]


def behaviour_weights(proximal_logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor,
                      cap: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights ``w_t = exp(proximal_logp_t - behaviour_logp_t)`` ``[B, T]``, capped at ``cap``
    when given (TIS), 0 on invalid positions; and detached stats over the valid tokens.

    Stats: ``ratio_mean`` and ``ratio_max`` (of w before the cap), ``capped`` (the share of tokens
    whose w exceeded the cap; 0 without one) and ``abs_log_ratio`` (mean ``|log w|``: how far apart
    the two policies are, whatever the sign).
    """
    if cap is not None and not cap > 1.0:
        raise ValueError(f"the importance-weight cap must be > 1 (2 in verl), got {cap}")
    valid = mask.bool()  # [B, T]
    log_ratio = torch.where(valid, proximal_logp - behaviour_logp, torch.zeros_like(proximal_logp)).detach()  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    weights = ratio if cap is None else ratio.clamp(max=cap)  # [B, T]
    weights = torch.where(valid, weights, torch.zeros_like(weights))
    stats = {
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_max": torch.where(valid, ratio, torch.full_like(ratio, float("-inf"))).max() if bool(valid.any())
        else ratio.new_tensor(float("nan")),
        "capped": masked_mean((ratio > cap).to(ratio.dtype), mask) if cap is not None else ratio.new_zeros(()),
        "abs_log_ratio": masked_mean(log_ratio.abs(), mask),
    }
    return weights, stats
