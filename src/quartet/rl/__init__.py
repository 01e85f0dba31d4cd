"""Pure tensor math of RLHF: masks, log-probs, KL, reward shaping, advantages (GAE for PPO;
group-relative for GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++), losses (PPO's, and the per-token
clipped objective with clip-higher, dual clip and GSPO's sequence ratio), loss aggregation and
KL controllers. Torch only; no models, no I/O, no configs.

Convention: ``[batch, T]`` tensors where index ``t`` is response token ``t``; ``mask`` is the
action mask: 1 on the tokens the policy sampled, 0 on padding and, in multi-turn responses, on
the observation and chat-template tokens between turns (so the 1s need not be contiguous; see
``quartet.rl.masks``). Masked positions never influence any result. Group methods take
``group_ids`` ``[batch]``: each sample's prompt group.
"""

from quartet.rl.advantages import (
    GRPO_SCALES,
    broadcast_to_tokens,
    discounted_returns,
    gae_advantages,
    group_baseline,
    grpo_advantages,
    rloo_advantages,
    whiten,
)
from quartet.rl.aggregation import LOSS_AGGREGATIONS, aggregate, loss_units
from quartet.rl.controllers import AdaptiveKLController, FixedKLController
from quartet.rl.groups import group_mean, group_sizes, group_std, groups_with_signal, zero_spread_fraction
from quartet.rl.kl import KL_ESTIMATORS, kl_estimate, sequence_kl
from quartet.rl.logprobs import entropy_from_logits, token_logprobs, token_logprobs_and_entropy, token_logprobs_inplace
from quartet.rl.losses import clipped_policy_objective, explained_variance, pairwise_loss, policy_loss, value_loss
from quartet.rl.masks import last_valid_index, masked_mean, masked_sum, masked_var, response_mask
from quartet.rl.rewards import (
    RunningMeanStd,
    normalize_scores,
    overlong_penalty,
    penalize_missing_eos,
    per_token_rewards,
    place_turn_rewards,
    shape_scores,
    turn_end_positions,
)

__all__ = [
    "masked_sum", "masked_mean", "masked_var", "response_mask", "last_valid_index",
    "token_logprobs", "token_logprobs_inplace", "token_logprobs_and_entropy", "entropy_from_logits",
    "KL_ESTIMATORS", "kl_estimate", "sequence_kl",
    "per_token_rewards", "normalize_scores", "RunningMeanStd", "penalize_missing_eos", "overlong_penalty",
    "shape_scores", "turn_end_positions", "place_turn_rewards",
    "gae_advantages", "whiten",
    "group_sizes", "group_mean", "group_std", "groups_with_signal", "zero_spread_fraction",
    "GRPO_SCALES", "grpo_advantages", "rloo_advantages", "group_baseline", "discounted_returns",
    "broadcast_to_tokens",
    "policy_loss", "value_loss", "pairwise_loss", "explained_variance", "clipped_policy_objective",
    "LOSS_AGGREGATIONS", "aggregate", "loss_units",
    "FixedKLController", "AdaptiveKLController",
]
