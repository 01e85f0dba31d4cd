"""Helpers shared by the rl/ tests: ragged masks and garbage in masked positions."""

import torch

LENGTHS = [1, 6, 3, 4]
T = 6


def ragged_mask(lengths=LENGTHS, T=T):
    """[len(lengths), T] float mask with `lengths[i]` leading ones in row i."""
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths])


def with_garbage(x, mask, value=1e6):
    """`x` with every masked-out position replaced by `value` (which must never matter)."""
    return torch.where(mask.bool(), x, torch.full_like(x, value))
