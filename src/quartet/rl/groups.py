"""Per-group statistics for critic-free RL (GRPO, RLOO, DAPO): each prompt is sampled several
times, and a sample's baseline comes from the other samples of its prompt group.

A batch holds ``B`` samples; ``group_ids`` is a ``[B]`` int64 tensor naming each sample's
group. Groups may be ragged (different sizes) and ids need not be contiguous or sorted: only
equality of ids matters. Every per-group result is returned per sample (``[B]``), so it lines
up with the scores it came from. Vectorised with ``index_add_`` / ``scatter_reduce``; no Python
loop over groups. A non-finite score only affects its own group.
"""

from __future__ import annotations

import torch

__all__ = ["group_sizes", "group_mean", "group_std", "groups_with_signal", "zero_spread_fraction"]


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Dense group index ``[B]`` in ``0..G-1`` (same id -> same index) and the number of groups ``G``."""
    if group_ids.dim() != 1:
        raise ValueError(f"group_ids must be a [B] tensor of ints, got shape {tuple(group_ids.shape)}")
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(f"group_ids must hold integers, got dtype {group_ids.dtype}")
    unique_ids, index = torch.unique(group_ids, return_inverse=True)
    return index, unique_ids.numel()


def _check_values(values: torch.Tensor, group_ids: torch.Tensor) -> None:
    if values.shape != group_ids.shape:
        raise ValueError(
            f"values has shape {tuple(values.shape)} but group_ids has shape {tuple(group_ids.shape)}; "
            "pass one value per sample ([B])"
        )


def _per_group_sum(values: torch.Tensor, index: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``[G]`` sums of ``values`` ``[B]`` by dense group index."""
    return torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, index, values)


def group_sizes(group_ids: torch.Tensor) -> torch.Tensor:
    """Size ``n_g`` of each sample's group, ``[B]`` int64."""
    index, n_groups = _group_index(group_ids)
    counts = torch.zeros(n_groups, dtype=torch.int64, device=group_ids.device)  # [G]
    counts.index_add_(0, index, torch.ones_like(index))
    return counts[index]  # [B]


def group_mean(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Mean of each sample's group ``[B]``: ``mean_g = sum_{j in g} v_j / n_g``."""
    _check_values(values, group_ids)
    index, n_groups = _group_index(group_ids)
    sums = _per_group_sum(values, index, n_groups)  # [G]
    counts = _per_group_sum(torch.ones_like(values), index, n_groups)  # [G], >= 1 for every group present
    return (sums / counts)[index]  # [B]


def group_std(values: torch.Tensor, group_ids: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Standard deviation of each sample's group ``[B]``.

    ``std_g = sqrt(sum_{j in g} (v_j - mean_g)**2 / (n_g - 1))`` (``unbiased=True``, the
    ``torch.std`` default that TRL and verl use) or ``/ n_g``. A group of one has std 0
    (not nan). Two passes (mean first, then centred squares), so no cancellation.
    """
    _check_values(values, group_ids)
    index, n_groups = _group_index(group_ids)
    counts = _per_group_sum(torch.ones_like(values), index, n_groups)  # [G]
    means = _per_group_sum(values, index, n_groups) / counts  # [G]
    centered = values - means[index]  # [B]
    sq_sums = _per_group_sum(centered * centered, index, n_groups)  # [G]
    divisor = (counts - 1).clamp(min=1) if unbiased else counts  # [G]; a group of one: 0 / 1 = 0
    return torch.sqrt(sq_sums / divisor)[index]  # [B]


def _group_spread(scores: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``max_g - min_g`` per group ``[G]`` and the dense group index ``[B]``."""
    _check_values(scores, group_ids)
    index, n_groups = _group_index(group_ids)
    empty = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device)
    g_max = empty.scatter_reduce(0, index, scores, reduce="amax", include_self=False)  # [G]
    g_min = empty.scatter_reduce(0, index, scores, reduce="amin", include_self=False)  # [G]
    return g_max - g_min, index


def groups_with_signal(scores: torch.Tensor, group_ids: torch.Tensor, atol: float = 0.0) -> torch.Tensor:
    """Bool ``[B]``: True where the sample's group has ``max_g - min_g > atol`` (its scores are not all equal).

    A group whose scores are all equal has zero group-relative advantage for every sample, so
    it carries no learning signal; DAPO's dynamic sampling keeps only the True samples.
    A group of one never has signal; nor does a group with a nan score (it is dropped).
    """
    spread, index = _group_spread(scores, group_ids)
    return (spread > atol)[index]  # [B]


def zero_spread_fraction(scores: torch.Tensor, group_ids: torch.Tensor, atol: float = 0.0) -> float:
    """Fraction of GROUPS (not samples) whose scores are all equal (``max_g - min_g <= atol``).

    The "no learning signal" metric: 1.0 means every advantage is 0 this batch. Exactly the
    groups that ``groups_with_signal`` rejects. An empty batch gives 0.0.
    """
    spread, _ = _group_spread(scores, group_ids)
    if spread.numel() == 0:
        return 0.0
    return float((~(spread > atol)).to(torch.float64).mean())
