"""Where scores come from: reward models, reward functions and verifiers, behind one interface.

(Not to be confused with `quartet.rl.rewards`, which shapes scores into per-token rewards.)
"""

from quartet.scoring.sources import (
    MetricFn,
    RewardFn,
    RewardFunctions,
    RewardSource,
    build_reward_source,
    load_callable,
)

__all__ = ["RewardSource", "RewardFunctions", "RewardFn", "MetricFn", "build_reward_source", "load_callable"]
