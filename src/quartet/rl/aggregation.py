"""Loss aggregation: how per-token losses ``[B, T]`` become one number, and how many units
("what the mean is over") a set of rows holds, so micro-batches and ranks combine exactly.

Modes (``LOSS_AGGREGATIONS``):

* ``"token-mean"``: mean over all valid tokens of the rows given (DAPO, verl's token-mean,
  DeepSpeed-Chat; every token weighs the same). Units: valid tokens.
* ``"seq-mean-token-mean"``: each row's mean over its valid tokens, then the mean over rows
  (the GRPO paper; a token of a short response weighs more). Units: rows.
* ``"seq-mean-token-sum-norm"``: each row's SUM over its valid tokens divided by the constant
  ``max_new_tokens``, then the mean over rows (Dr. GRPO; no length bias). Units: rows.

"Valid tokens" are the action tokens (``quartet.rl.masks``): in a multi-turn row the
observation and template tokens between turns count nowhere, neither in a row's mean nor as
units. A row with no valid token (padding) contributes 0 and is not a unit: the seq modes
average over rows with at least one valid token only, and ``loss_units`` counts the same rows.

Gradient accumulation / data parallel: for any split of a mini-batch's rows into micro-batches,
``sum_m aggregate(micro_m) * loss_units(micro_m) / loss_units(whole) == aggregate(whole)``;
the trainer weights each micro-batch's loss by ``loss_units(micro) / loss_units(whole)``
(with the whole's units summed over ranks).
"""

from __future__ import annotations

import torch

from quartet.rl.masks import masked_mean, masked_sum

__all__ = ["LOSS_AGGREGATIONS", "aggregate", "loss_units"]

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _check_mode(mode: str) -> None:
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; valid: {', '.join(LOSS_AGGREGATIONS)}")


def _nonempty_rows(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[B]``: rows with at least one valid token."""
    return mask.bool().any(dim=-1)


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str, max_new_tokens: int | None = None
) -> torch.Tensor:
    """One loss (0-dim) from per-token losses ``[B, T]`` by ``mode`` (see the module docstring).

    ``"token-mean"`` is exactly ``masked_mean(per_token, mask)``; ``max_new_tokens`` is
    required by ``"seq-mean-token-sum-norm"`` (the generation limit, the same for every
    batch) and ignored by the others. No unit at all (no valid token): 0.
    """
    _check_mode(mode)
    if mode == "token-mean":
        return masked_mean(per_token, mask)
    if mode == "seq-mean-token-mean":
        row_losses = masked_mean(per_token, mask, dim=-1)  # [B], 0 for an empty row
    else:
        if max_new_tokens is None or max_new_tokens <= 0:
            raise ValueError(
                f"loss aggregation 'seq-mean-token-sum-norm' needs max_new_tokens > 0 (the generation limit), "
                f"got {max_new_tokens!r}"
            )
        row_losses = masked_sum(per_token, mask, dim=-1) / max_new_tokens  # [B], 0 for an empty row
    n_rows = _nonempty_rows(mask).sum().to(row_losses.dtype).clamp(min=1)  # []
    return row_losses.sum() / n_rows


def loss_units(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """How many units ``mode`` averages over in these rows (0-dim int64): valid tokens for
    ``"token-mean"``, rows with at least one valid token for the seq modes."""
    _check_mode(mode)
    if mode == "token-mean":
        return mask.bool().sum()
    return _nonempty_rows(mask).sum()
