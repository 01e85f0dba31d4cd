"""Pure tensor math of PPO-RLHF (DeepSpeed-Chat step 3): masks, log-probs, KL, reward
shaping, GAE, losses and KL controllers. Torch only; no models, no I/O, no configs.

Convention: ``[batch, T]`` tensors where index ``t`` is response token ``t``; ``mask`` is 1 on
valid response tokens (up to and including the first EOS) and 0 after. Masked positions never
influence any result.
"""

from quartet.rl.advantages import gae_advantages, whiten
from quartet.rl.controllers import AdaptiveKLController, FixedKLController
from quartet.rl.kl import KL_ESTIMATORS, kl_estimate, sequence_kl
from quartet.rl.logprobs import entropy_from_logits, token_logprobs, token_logprobs_and_entropy, token_logprobs_inplace
from quartet.rl.losses import explained_variance, pairwise_loss, policy_loss, value_loss
from quartet.rl.masks import last_valid_index, masked_mean, masked_sum, masked_var, response_mask
from quartet.rl.rewards import RunningMeanStd, normalize_scores, penalize_missing_eos, per_token_rewards

__all__ = [
    "masked_sum", "masked_mean", "masked_var", "response_mask", "last_valid_index",
    "token_logprobs", "token_logprobs_inplace", "token_logprobs_and_entropy", "entropy_from_logits",
    "KL_ESTIMATORS", "kl_estimate", "sequence_kl",
    "per_token_rewards", "normalize_scores", "RunningMeanStd", "penalize_missing_eos",
    "gae_advantages", "whiten",
    "policy_loss", "value_loss", "pairwise_loss", "explained_variance",
    "FixedKLController", "AdaptiveKLController",
]
