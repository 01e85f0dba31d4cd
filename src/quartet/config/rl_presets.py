"""Named RL presets: each algorithm's defaults as its paper or framework sets them.

`algorithm.name: X` applies the preset of the same name, if there is one; `preset: X` names one
outright. A preset goes under the file's values and the command line's.
"""

from __future__ import annotations

import copy
from typing import Any

from quartet.config.sections import ConfigError


def _deep_merge(base: dict, top: dict) -> dict:
    """`top` over `base`, as a new mapping: no section of either is shared with the result (overrides
    are later written into it)."""
    merged = copy.deepcopy(base)
    for key, value in top.items():
        merged[key] = (_deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict)
                       else copy.deepcopy(value))
    return merged


# Named defaults, each following the paper or framework named beside it (docs/concepts.md: "The algorithm family").
# Choosing `algorithm.name: X` applies the preset of the same name, if there is one.
# The group algorithms normalise or centre raw scores, unclipped, as TRL, verl and OpenRLHF do for GRPO and RLOO.
_GROUP = {"rollout": {"n": 8}, "batch": {"ppo_epochs": 1}, "models": {"critic_init": "actor"},
          "algorithm": {"clip_reward_value": None}}
RL_PRESETS: dict[str, dict[str, Any]] = {
    # DeepSpeed-Chat step 3 (applications/DeepSpeed-Chat, ppo_trainer.py defaults)
    "deepspeed-chat": {
        "algorithm": {"name": "ppo", "beta": 0.1, "adaptive_kl": False, "kl_estimator": "k1", "clip_reward_value": 5.0,
                      "gamma": 1.0, "lam": 0.95, "whiten_advantages": False, "cliprange": 0.2, "cliprange_value": 0.2,
                      "score_normalization": "none"},
        "batch": {"ppo_epochs": 1},
        "models": {"critic_init": "reward"},
    },
    # DeepSeekMath (Shao et al. 2024, sec. 4): KL as a loss term with k3 and beta 0.04, group-normalised
    # outcome advantages, per-sequence token means, one update per rollout (their group: 64 samples)
    "grpo": _deep_merge(_GROUP, {"algorithm": {"name": "grpo", "beta": 0.04, "kl_estimator": "k3", "kl_penalty": "loss",
                                               "scale_rewards": "group", "loss_aggregation": "seq-mean-token-mean",
                                               "cliprange": 0.2}}),
    # Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): no std division, per-sequence
    # sums over a constant (max_new_tokens), no KL term
    "dr-grpo": _deep_merge(_GROUP, {"algorithm": {"name": "grpo", "beta": 0.0, "scale_rewards": "none",
                                                  "loss_aggregation": "seq-mean-token-sum-norm", "cliprange": 0.2}}),
    # DAPO (Yu et al. 2025): clip-higher 0.2 / 0.28, token-mean over the mini-batch, dynamic sampling,
    # overlong shaping (a fifth of the length limit), no KL term (their group: 16 samples)
    "dapo": _deep_merge(_GROUP, {"algorithm": {"name": "grpo", "beta": 0.0, "scale_rewards": "group",
                                               "loss_aggregation": "token-mean", "cliprange": 0.2, "clip_high": 0.28,
                                               "dynamic_sampling": True, "overlong_shaping": True}}),
    # RLOO (Ahmadian et al. 2024, "Back to basics"; TRL's RLOOTrainer: beta 0.05, k1 in the reward):
    # whole-sequence REINFORCE with the leave-one-out baseline (token sums over a constant)
    "rloo": _deep_merge(_GROUP, {"algorithm": {"name": "rloo", "beta": 0.05, "kl_estimator": "k1",
                                               "kl_penalty": "reward", "loss_aggregation": "seq-mean-token-sum-norm"}}),
    # REINFORCE++ (Hu 2025; OpenRLHF's --advantage_estimator reinforce, init_kl_coef 0.01, reward_clip_range
    # +-10): k1 in the reward, gamma 1, returns whitened over the batch; one sample per prompt
    "reinforce++": {"algorithm": {"name": "reinforce++", "beta": 0.01, "kl_estimator": "k1", "kl_penalty": "reward",
                                  "gamma": 1.0, "loss_aggregation": "token-mean", "clip_reward_value": 10.0},
                    "batch": {"ppo_epochs": 1}, "models": {"critic_init": "actor"}},
    # REINFORCE++-baseline (Hu 2025; OpenRLHF's reinforce_baseline): the group mean of the clipped scores
    # subtracted first (OpenRLHF centres, then clips at +-10; here one clipped score serves both)
    "reinforce++-baseline": _deep_merge(_GROUP, {"algorithm": {"name": "reinforce++-baseline", "beta": 0.01,
                                                               "kl_estimator": "k1", "kl_penalty": "reward",
                                                               "gamma": 1.0, "loss_aggregation": "token-mean",
                                                               "clip_reward_value": 10.0}}),
}


def apply_rl_preset(data: dict, overrides: dict[str, Any]) -> dict:
    """Put a named preset's values under the file's and the command line's.

    The preset is `preset`, or else the one named like the chosen algorithm (`algorithm.name`).
    """
    name = overrides.get("preset", data.get("preset"))
    if name is None:
        algorithm = overrides.get("algorithm.name", (data.get("algorithm") or {}).get("name"))
        name = algorithm if algorithm in RL_PRESETS else None
    if name is None:
        return data
    if name not in RL_PRESETS:
        raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(RL_PRESETS)}")
    return _deep_merge(RL_PRESETS[name], data)
