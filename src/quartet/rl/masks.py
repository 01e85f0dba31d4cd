"""Masked reductions over response tokens, and building the single-turn response mask itself.

Convention for the whole ``quartet.rl`` package: tensors are ``[batch, T]`` and index ``t``
is response token ``t``. ``mask`` (the action mask) is a float or bool ``[batch, T]`` tensor
that is 1 on the action tokens, the tokens the policy sampled, and 0 elsewhere; "valid"
in this package means exactly that. In a single-turn response the action tokens are a prefix
(up to AND including the first EOS, see ``response_mask``). In a multi-turn response they need
not be contiguous: each turn's sampled tokens (its end-of-turn token included) are 1, and the
observation (tool / environment) and chat-template tokens between turns are 0, as is padding.
Every function here counts only action tokens (a response's length is its number of action
tokens) and works on either kind of mask. Values at masked positions never reach a result:
they are replaced by 0 with ``torch.where`` (not multiplied by the mask), so even
``inf``/``nan`` garbage there cannot leak.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["masked_sum", "masked_mean", "masked_var", "response_mask", "last_valid_index"]


def _zero_invalid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with every masked position replaced by 0 (no arithmetic on the masked values)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over valid tokens; ``dim=None`` sums over the whole batch (0-dim result)."""
    x_valid = _zero_invalid(x, mask)  # [batch, T]
    return x_valid.sum() if dim is None else x_valid.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over valid tokens.

    ``dim=None``: one mean over all valid tokens of the batch (token-weighted, 0-dim).
    ``dim=1``: per-row means ``[batch]``. A reduction with no valid token returns 0.
    """
    n_valid = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    n_valid = n_valid.to(x.dtype).clamp(min=1)  # empty -> 0 / 1 = 0, never nan
    return masked_sum(x, mask, dim) / n_valid


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all valid tokens of the batch (0-dim).

    ``unbiased=True`` applies Bessel's correction ``n / (n - 1)`` like TRL's / DeepSpeed-Chat's
    ``masked_var``. With fewer than 2 valid tokens the correction is skipped, so 1 valid token
    gives 0 and no valid token gives 0 (no error, no nan).
    """
    mean = masked_mean(x, mask)  # []
    centered = _zero_invalid(x - mean, mask)  # [batch, T]
    var_biased = masked_mean(centered**2, mask)  # []
    if not unbiased:
        return var_biased
    n_valid = mask.bool().sum().to(x.dtype)  # []
    bessel = torch.where(n_valid > 1, n_valid / (n_valid - 1).clamp(min=1), torch.ones_like(n_valid))
    return var_biased * bessel


def response_mask(
    response_ids: torch.Tensor,
    eos_token_id: int | Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Single-turn action mask ``[batch, T]``: 1 up to and including each row's first EOS, 0 after it;
    all 1 without EOS.

    ``eos_token_id`` may be one id or several (any of them ends the response).
    """
    if isinstance(eos_token_id, int):
        is_eos = response_ids == eos_token_id  # [batch, T]
    else:
        eos_ids = torch.as_tensor(list(eos_token_id), dtype=response_ids.dtype, device=response_ids.device)
        is_eos = torch.isin(response_ids, eos_ids)  # [batch, T]
    is_eos = is_eos.long()
    eos_before = is_eos.cumsum(dim=-1) - is_eos  # [batch, T] number of EOS strictly before t
    return (eos_before == 0).to(dtype)


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index ``[batch]`` (int64) of each row's last action token; ``-1`` for a row with none.

    Holes before it (observation tokens between turns) do not matter: it is the largest
    position whose mask is 1, not a count of the 1s.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)  # [batch, T]
    minus_one = torch.full_like(positions, -1)
    return torch.where(mask.bool(), positions, minus_one).max(dim=-1).values  # [batch]
