"""The DPO family of offline preference losses, as pure functions of sequence log-probs.

Each pair is a prompt with a chosen and a rejected answer. The policy and the frozen reference
model each give one log-prob per answer (``sequence_logps``: the sum of the answer's token
log-probs). With the implicit reward ``r = beta * (logp_policy - logp_ref)`` of DPO, every loss
here is a function of the logits

    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)        # [B]

    sigmoid  -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
             DPO (Rafailov et al. 2023, arXiv:2305.18290); eps > 0 is cDPO (Mitchell 2023)
    ipo      (h - 1 / (2 * beta))**2           IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17)
    hinge    relu(1 - beta * h)                SLiC (Zhao et al. 2023, arXiv:2305.10425)
    robust   (-(1 - eps) * log sigmoid(beta * h) + eps * log sigmoid(-beta * h)) / (1 - 2 * eps)
             rDPO (Chowdhury et al. 2024, arXiv:2403.00409)

These are the formulas of TRL's ``DPOTrainer.dpo_loss`` for the same ``loss_type`` names.
``chosen_nll_loss`` is RPO's term as TRL computes it (``rpo_alpha``; one token mean over the batch),
``preference_metrics`` the
``rewards/*`` numbers TRL users watch. Torch only: no models, no I/O, no configs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from quartet.rl.masks import masked_mean, masked_sum

__all__ = [
    "DPO_LOSS_TYPES",
    "sequence_logps",
    "dpo_loss",
    "chosen_nll_loss",
    "preference_metric_sums",
    "preference_metrics_from_sums",
    "preference_metrics",
]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
_SMOOTHABLE = ("sigmoid", "robust")  # the loss types where label_smoothing has a meaning


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Log-prob ``[B]`` of each answer: ``sum_t mask * logp_t`` (``average=True``: divided by the valid-token count).

    ``token_logps`` and ``mask`` are ``[B, T]``; the valid tokens may sit anywhere in the row
    (right- or left-padded batches give the same result). A row with no valid token gives 0.
    Masked positions never matter, not even as ``inf``/``nan`` or in the gradient.
    ``average=True`` is the length-normalised log-prob that IPO expects.
    """
    if token_logps.dim() != 2 or token_logps.shape != mask.shape:
        raise ValueError(
            f"sequence_logps needs token_logps and mask of the same [batch, T] shape, "
            f"got {tuple(token_logps.shape)} and {tuple(mask.shape)}"
        )
    if average:
        return masked_mean(token_logps, mask, dim=1)  # [B]
    return masked_sum(token_logps, mask, dim=1)  # [B]


def _check_dpo_args(
    logps: tuple[torch.Tensor, ...], beta: float, loss_type: str, label_smoothing: float
) -> None:
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing must be in [0, 0.5) (the assumed probability that a pair's labels are flipped), "
            f"got {label_smoothing}"
        )
    if label_smoothing > 0 and loss_type not in _SMOOTHABLE:
        raise ValueError(
            f"label_smoothing={label_smoothing} is not defined for loss_type {loss_type!r}; "
            f"use it with {' or '.join(_SMOOTHABLE)}, or set label_smoothing=0"
        )
    shapes = {tuple(x.shape) for x in logps}
    if len(shapes) != 1 or logps[0].dim() != 1:
        names = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
        got = ", ".join(f"{n}={tuple(x.shape)}" for n, x in zip(names, logps))
        raise ValueError(f"dpo_loss needs four [batch] tensors of one shape (one log-prob per answer), got {got}")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO-family losses ``[B]`` and the implicit rewards ``[B]`` (``losses, chosen_rewards, rejected_rewards``).

    Inputs are sequence log-probs ``[B]`` (see ``sequence_logps``) of the policy and the reference
    for the chosen and rejected answers. With ``h`` the logits of the module docstring and
    ``eps = label_smoothing``:

    * ``sigmoid``: ``-(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)``; eps = 0 is
      DPO, eps > 0 is conservative DPO (cDPO): the label is trusted with probability ``1 - eps``.
    * ``ipo``: ``(h - 1 / (2 * beta))**2``, beta is IPO's tau. IPO is defined on length-normalised
      log-probs: the CALLER passes ``sequence_logps(..., average=True)`` for all four inputs (as
      TRL does for ``loss_type="ipo"``); this function cannot tell sums from means.
    * ``hinge``: ``relu(1 - beta * h)`` (SLiC; beta is 1 / margin).
    * ``robust``: ``(-(1 - eps) * logsigmoid(beta * h) + eps * logsigmoid(-beta * h)) / (1 - 2 * eps)``,
      rDPO's unbiased estimate of the clean-label DPO loss under flip rate eps. Unlike the others it
      can be negative and is unbounded below in ``h`` (for eps > 0); eps = 0 equals ``sigmoid``.

    ``chosen_rewards = beta * (policy_chosen - ref_chosen)`` and
    ``rejected_rewards = beta * (policy_rejected - ref_rejected)`` are detached (for metrics).
    Reduce the losses with ``.mean()``. RPO adds ``rpo_alpha`` times an NLL term on the chosen answer;
    ``quartet dpo`` adds it per pair, each chosen answer's mean token NLL
    (``-sequence_logps(..., average=True)``, the paper's normalisation), so every pair weighs the same
    whatever its length; ``chosen_nll_loss`` is TRL's variant, one token mean over the batch.

    Raises ``ValueError`` for an unknown ``loss_type``, ``beta <= 0``, ``label_smoothing`` outside
    ``[0, 0.5)`` (at 0.5 the labels carry no information; robust divides by 0), label smoothing with
    ``ipo`` or ``hinge`` (not defined there; TRL warns and ignores it), and inputs that are not four
    ``[B]`` tensors of one shape (a ``[B, 1]`` would silently broadcast to ``[B, B]``).
    """
    _check_dpo_args((policy_chosen, policy_rejected, ref_chosen, ref_rejected), beta, loss_type, label_smoothing)
    eps = label_smoothing
    chosen_logratios = policy_chosen - ref_chosen  # [B]
    rejected_logratios = policy_rejected - ref_rejected  # [B]
    h = chosen_logratios - rejected_logratios  # [B]

    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # robust
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)

    chosen_rewards = beta * chosen_logratios.detach()  # [B]
    rejected_rewards = beta * rejected_logratios.detach()  # [B]
    return losses, chosen_rewards, rejected_rewards


def chosen_nll_loss(token_logps_chosen: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RPO's NLL term (0-dim): ``-sum(mask * logp) / sum(mask)`` over all chosen tokens of the batch.

    The normalisation is one token mean over the whole batch (each valid chosen token weighs the
    same, so long answers weigh more), like TRL's ``nll_loss`` (a ``cross_entropy`` mean over the
    chosen tokens). The loss of RPO (Pang et al. 2024, arXiv:2404.19733) is
    ``dpo_losses.mean() + alpha * chosen_nll_loss(...)`` (TRL's ``rpo_alpha``). The paper itself
    normalises per answer first; that variant is ``-sequence_logps(lp, mask, average=True).mean()``.
    No valid token gives 0. ``token_logps_chosen`` and ``mask`` are ``[B, T]``.
    """
    if token_logps_chosen.dim() != 2 or token_logps_chosen.shape != mask.shape:
        raise ValueError(
            f"chosen_nll_loss needs token_logps_chosen and mask of the same [batch, T] shape, "
            f"got {tuple(token_logps_chosen.shape)} and {tuple(mask.shape)}"
        )
    return -masked_mean(token_logps_chosen, mask)  # []


_METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@torch.no_grad()
def preference_metric_sums(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Sums behind ``preference_metrics`` plus ``count`` (the number of pairs), in float64.

    Sums add exactly across micro-batches and ranks (add the dicts key by key, then call
    ``preference_metrics_from_sums``); means of means would weigh a short last micro-batch wrong.
    ``rewards/accuracies`` here is the number of pairs with chosen > rejected, a tie counting as half.
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen_rewards and rejected_rewards must have one shape, "
            f"got {tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}"
        )
    chosen = chosen_rewards.detach().to(torch.float64)
    rejected = rejected_rewards.detach().to(torch.float64)
    return {
        "rewards/chosen": chosen.sum().item(),
        "rewards/rejected": rejected.sum().item(),
        "rewards/margins": (chosen - rejected).sum().item(),
        "rewards/accuracies": (chosen > rejected).sum().item() + 0.5 * (chosen == rejected).sum().item(),
        "count": float(chosen.numel()),
    }


def preference_metrics_from_sums(sums: dict[str, float]) -> dict[str, float]:
    """Means from (possibly added-up) ``preference_metric_sums``: each sum divided by ``count``.

    Raises ``ValueError`` for ``count == 0`` (no pairs: the means are undefined).
    """
    count = sums["count"]
    if count <= 0:
        raise ValueError("preference metrics need at least one pair, got count=0")
    return {name: sums[name] / count for name in _METRIC_NAMES}


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """TRL's DPO metrics over ``[B]`` implicit rewards: means of chosen, rejected and margin, and accuracy.

    ``rewards/chosen = mean(c)``, ``rewards/rejected = mean(r)``, ``rewards/margins = mean(c - r)``,
    ``rewards/accuracies = mean(c > r) + mean(c == r) / 2``: the share of pairs whose chosen reward is larger,
    a tie counting as half (TRL counts ties as wrong, so its step 0, where the policy is the reference and
    every pair ties, reads 0; here it reads 0.5, chance).
    For exact aggregation across micro-batches use ``preference_metric_sums``.
    """
    return preference_metrics_from_sums(preference_metric_sums(chosen_rewards, rejected_rewards))
