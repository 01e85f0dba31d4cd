"""The algorithm registry: an online-RL algorithm is a few registered parts, not a trainer.

An *advantage estimator* turns a scored batch into advantages (and returns, when it trains a
critic); a *policy loss* turns log-probs and advantages into per-token losses; an
*aggregation* mode (rl/aggregation.py) averages those. An `Algorithm` names one of each and
where the KL penalty to the reference goes; whether it needs a critic follows from its
estimator (as in verl's core_algos). The trainer asks the registry and branches on nothing else.

Every estimator has one signature, `fn(batch: AdvantageInputs, settings) -> (advantages, returns)`,
and every policy loss `fn(logp, old_logp, advantages, mask, settings) -> (per-token losses, stats)`;
`settings` is the run's algorithm section (quartet.config.AlgorithmConfig: gamma, lam,
cliprange, ...), read by attribute. A new algorithm is a registered function or two and one
`register_algorithm(Algorithm(...))` line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from quartet.rl.advantages import (
    broadcast_to_tokens,
    discounted_returns,
    gae_advantages,
    grpo_advantages,
    rloo_advantages,
    whiten,
)
from quartet.rl.aggregation import LOSS_AGGREGATIONS
from quartet.rl.groups import group_mean
from quartet.rl.losses import clipped_policy_objective
from quartet.rl.masks import last_valid_index, masked_sum

__all__ = ["AdvantageInputs", "Algorithm", "ALGORITHMS", "ADVANTAGE_ESTIMATORS", "POLICY_LOSSES",
           "register_advantage", "register_policy_loss", "register_algorithm", "get_algorithm"]


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may read of the global batch (all `[B, T]` on response tokens unless noted)."""

    rewards: torch.Tensor  # per-token rewards: the score at each row's last token, plus the KL penalty when in the reward
    mask: torch.Tensor  # the action mask: 1 on the tokens the policy sampled (multi-turn: holes between turns)
    scores: torch.Tensor  # [B] the sequence scores as shaped (normalised, EOS-penalised, clipped): those in `rewards`
    values: torch.Tensor | None = None  # V(S_t) of the critic, for estimators that need one
    group_ids: torch.Tensor | None = None  # [B] which prompt each row answers, for group baselines


AdvantageFn = Callable[[AdvantageInputs, Any], tuple[torch.Tensor, torch.Tensor | None]]
PolicyLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any],
                        tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class AdvantageEstimator:
    fn: AdvantageFn
    needs_values: bool  # the estimator reads a critic's values (and returns targets for it)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_advantage(name: str, needs_values: bool = False) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: register an advantage estimator under `name`."""
    def register(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGE_ESTIMATORS[name] = AdvantageEstimator(fn, needs_values)
        return fn
    return register


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: register a per-token policy loss under `name`."""
    def register(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSSES[name] = fn
        return fn
    return register


@dataclass(frozen=True)
class Algorithm:
    """A registered online-RL algorithm: the names of its parts."""

    name: str
    advantage: str  # a key of ADVANTAGE_ESTIMATORS
    policy_loss: str = "clipped"  # a key of POLICY_LOSSES
    loss_aggregation: str = "token-mean"  # one of rl.aggregation.LOSS_AGGREGATIONS
    kl_penalty: Literal["reward", "loss"] = "reward"  # folded into the per-token rewards, or a loss term
    group: bool = False  # compares the samples of one prompt: needs several per prompt
    summary: str = ""

    @property
    def needs_critic(self) -> bool:
        return ADVANTAGE_ESTIMATORS[self.advantage].needs_values

    def advantages(self, batch: AdvantageInputs, settings: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(advantages [B, T], returns [B, T] for the critic or None)."""
        return ADVANTAGE_ESTIMATORS[self.advantage].fn(batch, settings)

    def policy_losses(self, logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      settings: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-token policy losses [B, T] (to aggregate) and detached stats."""
        return POLICY_LOSSES[self.policy_loss](logp, old_logp, advantages, mask, settings)


ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(algorithm: Algorithm) -> Algorithm:
    """Add `algorithm` to the registry, checking that its parts exist."""
    if algorithm.advantage not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"algorithm {algorithm.name!r}: unknown advantage estimator {algorithm.advantage!r}")
    if algorithm.policy_loss not in POLICY_LOSSES:
        raise ValueError(f"algorithm {algorithm.name!r}: unknown policy loss {algorithm.policy_loss!r}")
    if algorithm.loss_aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"algorithm {algorithm.name!r}: unknown loss aggregation {algorithm.loss_aggregation!r}")
    ALGORITHMS[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; registered: {', '.join(sorted(ALGORITHMS))}")
    return ALGORITHMS[name]


# ----------------------------------------------------------------------------- the parts


@register_advantage("gae", needs_values=True)
def gae(batch: AdvantageInputs, settings: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(gamma, lambda) over each row's action tokens, backwards from its last; advantages optionally whitened."""
    advantages, returns = gae_advantages(batch.rewards, batch.values, batch.mask, settings.gamma, settings.lam)
    if settings.whiten_advantages:
        advantages = whiten(advantages, batch.mask)
    return advantages, returns


def _sequence_returns(batch: AdvantageInputs) -> torch.Tensor:
    """Each response's total reward [B]: its score, minus the KL penalty when that is in the reward."""
    return masked_sum(batch.rewards, batch.mask, dim=1)


def _groups(batch: AdvantageInputs) -> torch.Tensor:
    if batch.group_ids is None:
        raise ValueError("a group advantage estimator needs the rows' group ids (several samples per prompt)")
    return batch.group_ids


@register_advantage("grpo")
def grpo(batch: AdvantageInputs, settings: Any) -> tuple[torch.Tensor, None]:
    """GRPO (Shao et al. 2024): (r_i - mean_g) / (std_g + eps) on every token of the answer; the std of
    the group, of the batch, or none (Dr. GRPO) per `scale_rewards`."""
    advantages = grpo_advantages(_sequence_returns(batch), _groups(batch), settings.scale_rewards, settings.advantage_eps)
    return broadcast_to_tokens(advantages, batch.mask), None


@register_advantage("rloo")
def rloo(batch: AdvantageInputs, settings: Any) -> tuple[torch.Tensor, None]:
    """RLOO (Ahmadian et al. 2024): r_i minus the mean of the group's other rewards, on every token."""
    return broadcast_to_tokens(rloo_advantages(_sequence_returns(batch), _groups(batch)), batch.mask), None


@register_advantage("reinforce++")
def reinforce_plus_plus(batch: AdvantageInputs, settings: Any) -> tuple[torch.Tensor, None]:
    """REINFORCE++ (Hu 2025): token-level returns of the KL-shaped rewards (discount gamma), whitened
    over the global batch's valid tokens."""
    return whiten(discounted_returns(batch.rewards, batch.mask, settings.gamma), batch.mask), None


@register_advantage("reinforce++-baseline")
def reinforce_plus_plus_baseline(batch: AdvantageInputs, settings: Any) -> tuple[torch.Tensor, None]:
    """REINFORCE++-baseline: the group's mean score subtracted at each response's last token first,
    then REINFORCE++'s returns and whitening over the batch. The baseline is the mean of the same
    (clipped) scores the rewards carry, so a higher score never ranks lower."""
    last = last_valid_index(batch.mask)  # [B]
    positions = torch.arange(batch.mask.shape[1], device=batch.mask.device)  # [T]
    is_last = (positions.unsqueeze(0) == last.unsqueeze(1)).to(batch.rewards.dtype)  # [B, T]
    baseline = group_mean(batch.scores.to(batch.rewards.dtype), _groups(batch))  # [B]
    rewards = batch.rewards - is_last * baseline.unsqueeze(1)  # [B, T]
    return whiten(discounted_returns(rewards, batch.mask, settings.gamma), batch.mask), None


@register_policy_loss("clipped")
def clipped(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
            settings: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate: range `cliprange` (up to `clip_high` above: DAPO), optional dual clip,
    optional sequence-level ratio (GSPO)."""
    clip_high = settings.clip_high if settings.clip_high is not None else settings.cliprange
    return clipped_policy_objective(logp, old_logp, advantages, mask, settings.cliprange, clip_high,
                                    settings.dual_clip, settings.sequence_ratio)


register_algorithm(Algorithm("ppo", advantage="gae", summary="PPO with a critic: GAE advantages, clipped policy "
                                                           "and value losses, KL penalty in the reward"))
register_algorithm(Algorithm("grpo", advantage="grpo", loss_aggregation="seq-mean-token-mean", kl_penalty="loss",
                             group=True, summary="GRPO: group-normalised outcome advantages, KL as a loss term"))
register_algorithm(Algorithm("rloo", advantage="rloo", loss_aggregation="seq-mean-token-sum-norm", group=True,
                             summary="RLOO: leave-one-out group baseline, KL penalty in the reward"))
register_algorithm(Algorithm("reinforce++", advantage="reinforce++",
                             summary="REINFORCE++: token-level returns of KL-shaped rewards, whitened over the batch"))
register_algorithm(Algorithm("reinforce++-baseline", advantage="reinforce++-baseline", group=True,
                             summary="REINFORCE++ with the group's mean score subtracted first"))
