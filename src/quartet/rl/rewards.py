"""Reward shaping for PPO-RLHF: reward-model scores plus a per-token KL penalty.

DeepSpeed-Chat step 3: every action token gets ``-beta * kl_t`` (KL of actor vs the frozen
reference), and the row's last action token additionally gets the (clipped) sequence score
from the reward model. Multi-turn episodes may also reward each turn: ``turn_end_positions``
finds each turn's last action token and ``place_turn_rewards`` puts the turn's reward there.
Also: score normalisation with running statistics, a penalty for responses that never emitted
EOS (truncated at the generation limit), and DAPO's soft overlong punishment.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from quartet.rl.kl import kl_estimate
from quartet.rl.masks import last_valid_index

__all__ = ["per_token_rewards", "turn_end_positions", "place_turn_rewards", "normalize_scores", "RunningMeanStd",
           "penalize_missing_eos", "overlong_penalty", "shape_scores"]


def per_token_rewards(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    beta: float | torch.Tensor,
    clip_reward_value: float | None = 5.0,
    kl_estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shaped per-token rewards ``[B, T]`` and the KL-penalty part of them ``[B, T]``.

    ``kl_penalty[t] = -beta * kl_t`` on action tokens, 0 elsewhere;
    ``rewards = kl_penalty`` plus ``clamp(score, -clip_reward_value, clip_reward_value)`` at each
    row's last action token (``clip_reward_value=None``: no clipping), which in a multi-turn row
    is the final turn's end-of-turn token, never a trailing observation. ``scores`` is ``[B]``.
    A row with no action token gets all zeros (no score placed).
    """
    kl = kl_estimate(logp, ref_logp, kl_estimator, mask=mask)  # [B, T], 0 on invalid tokens
    kl_penalty = -beta * kl  # [B, T]
    scores = scores.reshape(-1).to(kl_penalty.dtype)  # [B]
    if scores.shape[0] != kl_penalty.shape[0]:
        raise ValueError(f"scores has {scores.shape[0]} entries for a batch of {kl_penalty.shape[0]}")
    if clip_reward_value is not None:
        scores = scores.clamp(-clip_reward_value, clip_reward_value)  # [B]
    last = last_valid_index(mask)  # [B], -1 for empty rows
    positions = torch.arange(mask.shape[-1], device=mask.device)  # [T]
    is_last = (positions.unsqueeze(0) == last.unsqueeze(1)).to(kl_penalty.dtype)  # [B, T] one-hot (or all 0)
    rewards = kl_penalty + is_last * scores.unsqueeze(1)  # [B, T]
    return rewards, kl_penalty


def turn_end_positions(turn_ids: torch.Tensor, n_turns: int | None = None) -> torch.Tensor:
    """Position ``[B, K]`` (int64) of each turn's last action token; ``-1`` where a row has no such turn.

    ``turn_ids`` ``[B, T]`` (integers) numbers the turn each action token belongs to, ``0 .. K-1``,
    and is ``-1`` on every non-action position (observations, chat template, padding); so
    ``turn_ids >= 0`` is the action mask. ``K`` is ``n_turns``, or by default one more than the
    largest turn id in the batch.
    """
    if turn_ids.dim() != 2 or turn_ids.is_floating_point() or turn_ids.is_complex():
        raise ValueError(f"turn_ids must be a [batch, T] tensor of integers, got shape {tuple(turn_ids.shape)} "
                         f"and dtype {turn_ids.dtype}")
    turn_ids = turn_ids.long()
    largest = int(turn_ids.max()) if turn_ids.numel() else -1
    if turn_ids.numel() and int(turn_ids.min()) < -1:
        raise ValueError(f"turn_ids must be -1 (not an action token) or a turn number >= 0, got {int(turn_ids.min())}")
    if n_turns is None:
        n_turns = largest + 1
    elif largest >= n_turns:
        raise ValueError(f"turn_ids holds turn {largest} but n_turns is {n_turns}: turns are numbered 0 .. n_turns - 1")
    batch, n_tokens = turn_ids.shape
    positions = torch.arange(n_tokens, device=turn_ids.device).expand(batch, n_tokens)  # [B, T]
    # non-action positions go to an extra column K, dropped after the reduction
    column = torch.where(turn_ids >= 0, turn_ids, torch.full_like(turn_ids, n_turns))  # [B, T]
    ends = torch.full((batch, n_turns + 1), -1, dtype=torch.int64, device=turn_ids.device)  # [B, K + 1]
    ends = ends.scatter_reduce(1, column, positions, reduce="amax", include_self=True)
    return ends[:, :n_turns]  # [B, K]


def place_turn_rewards(turn_rewards: torch.Tensor, turn_ends: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards ``[B, T]``: each turn's reward at its last action token, 0 elsewhere.

    ``turn_rewards`` and ``turn_ends`` are ``[B, K]``: turn ``k`` of row ``b`` earns
    ``turn_rewards[b, k]`` at position ``turn_ends[b, k]`` (``turn_end_positions`` gives these
    from a turn-id tensor). An end of ``-1`` marks a turn the row does not have: its reward is
    ignored, whatever it holds (``nan`` padding included). Two turns ending at the same
    position add up. ``mask`` ``[B, T]`` is the action mask; every end must be an action token.
    Add the result to ``per_token_rewards``'s rewards (it holds no KL penalty and no clipping).
    """
    if turn_rewards.shape != turn_ends.shape or turn_ends.dim() != 2 or turn_ends.shape[0] != mask.shape[0]:
        raise ValueError(f"turn_rewards {tuple(turn_rewards.shape)} and turn_ends {tuple(turn_ends.shape)} must both "
                         f"be [batch, turns] for a mask of shape {tuple(mask.shape)}")
    batch, n_tokens = mask.shape
    turn_ends = turn_ends.long()
    present = turn_ends >= 0  # [B, K]
    if bool((turn_ends < -1).any() | (turn_ends >= n_tokens).any()):
        raise ValueError(f"turn_ends must be -1 (no such turn) or a position in 0 .. {n_tokens - 1}")
    # absent turns point at an extra column T, dropped after the scatter
    column = torch.where(present, turn_ends, torch.full_like(turn_ends, n_tokens))  # [B, K]
    on_action = torch.cat([mask.bool(), torch.ones_like(mask[:, :1], dtype=torch.bool)], dim=1).gather(1, column)
    if not bool(on_action.all()):
        b, k = (~on_action).nonzero()[0].tolist()
        raise ValueError(f"turn {k} of row {b} ends at position {int(turn_ends[b, k])}, which is not an action token "
                         f"(mask 0 there): a turn's reward goes on its last sampled token")
    zero = torch.zeros((), dtype=turn_rewards.dtype, device=turn_rewards.device)
    values = torch.where(present, turn_rewards, zero)  # [B, K]
    rewards = torch.zeros(batch, n_tokens + 1, dtype=turn_rewards.dtype, device=turn_rewards.device)
    return rewards.scatter_add(1, column, values)[:, :n_tokens]  # [B, T]


def normalize_scores(
    scores: torch.Tensor, mean: float | torch.Tensor, std: float | torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """``(scores - mean) / (std + eps)``."""
    return (scores - mean) / (std + eps)


def penalize_missing_eos(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """``scores`` ``[B]`` with every row whose response never emitted EOS (``has_eos`` false) set to ``penalty``."""
    return torch.where(has_eos.bool(), scores, torch.full_like(scores, penalty))


class RunningMeanStd:
    """Running mean and (population) variance of scalar scores, merged batch by batch.

    Each batch's mean/variance is merged with Chan et al.'s parallel algorithm, so after any
    sequence of ``update`` calls ``mean``/``std`` equal ``numpy.mean``/``numpy.std`` (ddof=0) of
    all values seen. Before the first value: ``mean = 0.0``, ``std = 1.0``, ``count = 0``
    (normalising with it is the identity). State is plain Python numbers (JSON-serialisable).
    """

    def __init__(self) -> None:
        self.mean: float = 0.0
        self.var: float = 1.0
        self.count: int = 0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, x: torch.Tensor | Iterable[float] | float) -> None:
        """Merge a batch of scalars (any shape; flattened). An empty batch changes nothing."""
        if isinstance(x, torch.Tensor):
            values = x.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        else:  # a number, a list / tuple / numpy array, or any iterable of numbers
            data = x if isinstance(x, (int, float)) or hasattr(x, "__len__") else list(x)
            values = torch.as_tensor(data, dtype=torch.float64).reshape(-1)
        batch_count = values.numel()
        if batch_count == 0:
            return
        batch_mean = values.mean().item()
        batch_var = values.var(unbiased=False).item()
        total = self.count + batch_count
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.mean = self.mean + delta * batch_count / total
        self.var = m2 / total
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        return {"mean": float(self.mean), "var": float(self.var), "count": int(self.count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.count = int(state["count"])

    def __repr__(self) -> str:
        return f"RunningMeanStd(mean={self.mean:.6g}, std={self.std:.6g}, count={self.count})"


def overlong_penalty(
    lengths: torch.Tensor, max_new_tokens: int, buffer_len: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment ``[B]`` (Yu et al. 2025, eq. 13), to add to the scores.

    With ``L = max_new_tokens`` and the buffer ``L_b = buffer_len``, a response of ``|y|`` tokens gets
    ``0`` when ``|y| <= L - L_b``, ``penalty_factor * ((L - L_b) - |y|) / L_b`` when
    ``L - L_b < |y| <= L`` (a linear ramp down to ``-penalty_factor`` at ``|y| = L``), and
    ``-penalty_factor`` beyond ``L``. Integer lengths give a float result (the default dtype).
    """
    if not 0 < buffer_len <= max_new_tokens:
        raise ValueError(
            f"overlong buffer_len must be in (0, max_new_tokens={max_new_tokens}], got {buffer_len}"
        )
    if not lengths.is_floating_point():
        lengths = lengths.to(torch.get_default_dtype())
    threshold = max_new_tokens - buffer_len
    ramp = (threshold - lengths).clamp(min=-buffer_len, max=0) / buffer_len  # [B] in [-1, 0]
    return ramp * penalty_factor


def shape_scores(raw_scores: torch.Tensor, has_eos: torch.Tensor, normalization: str = "none",
                 stored_stats: tuple[float, float] | None = None, running: RunningMeanStd | None = None,
                 missing_eos_penalty: float | None = None) -> torch.Tensor:
    """Scores ``[B]`` as the rewards use them.

    ``normalization``: ``"none"``; ``"stored"``, with the reward model's saved ``(mean, std)``;
    ``"running"``, with ``running`` after merging this batch into it. Then rows whose response
    never emitted EOS get ``missing_eos_penalty`` (when set).
    """
    scores = raw_scores
    if normalization == "stored":
        scores = normalize_scores(scores, *stored_stats)
    elif normalization == "running":
        running.update(raw_scores)
        scores = normalize_scores(scores, running.mean, running.std)
    elif normalization != "none":
        raise ValueError(f"unknown score normalization {normalization!r}; valid: none, stored, running")
    if missing_eos_penalty is not None:
        scores = penalize_missing_eos(scores, has_eos, missing_eos_penalty)
    return scores
