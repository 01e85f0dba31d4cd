"""KL divergence estimates between the actor and the frozen reference policy.

Tokens are sampled from the actor, so with ``log_ratio = logp - ref_logp`` Schulman's
estimators of ``KL(actor || ref)`` (http://joschu.net/blog/kl-approx.html) are:

* ``k1 = log_ratio``                                  unbiased, can be negative, high variance
* ``k2 = 0.5 * log_ratio**2``                          biased, always >= 0, low variance
* ``k3 = exp(-log_ratio) - 1 + log_ratio``             unbiased, always >= 0, low variance
  (``= exp(ref_logp - logp) - 1 - (ref_logp - logp)``)
"""

from __future__ import annotations

import torch

__all__ = ["KL_ESTIMATORS", "kl_estimate", "sequence_kl"]

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: str = "k1",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token KL estimate ``[B, T]`` (see module docstring for the estimators).

    With ``mask`` given, invalid positions are 0 and their inputs never enter ``exp``
    (so garbage there cannot produce inf/nan, not even in gradients).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    log_ratio = logp - ref_logp  # [B, T]
    if mask is not None:
        log_ratio = torch.where(mask.bool(), log_ratio, torch.zeros_like(log_ratio))
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    return torch.expm1(-log_ratio) + log_ratio  # k3 = exp(-r) - 1 + r; 0 where r = 0


def sequence_kl(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Per-sequence KL ``[B]``: the per-token estimate (``k1`` by default) summed over valid tokens."""
    return kl_estimate(logp, ref_logp, estimator, mask=mask).sum(dim=-1)  # [B]
