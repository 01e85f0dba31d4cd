"""Every random stream a run derives from its seed, in one table.

Each stream mixes the run's seed with its counters (epoch, step, rank) by fixed multipliers, so
two streams never share numbers by accident and a resumed run redraws exactly what the
uninterrupted one drew. The multipliers are part of what a seed means: changing one changes
every run's numbers.
"""

from __future__ import annotations

# stream -> (multiplier of the seed, multipliers of its counters in order)
SEED_STREAMS: dict[str, tuple[int, tuple[int, ...]]] = {
    "data_order": (100_003, (1,)),  # (epoch): the supervised stages' shuffle of one epoch
    "prompt_order": (7_919, (1,)),  # (epoch): online RL's shuffle of the prompt set
    "step": (1_000_003, (7_919, 1)),  # (step, purpose): one RL step's generator, the same on every rank
    "rank_dropout": (1_000_003, (7_919, 1)),  # (rank, step): dropout draws of the ranks after the first
    "evaluation": (999_983, ()),  # (): online RL's held-out samples, the same draws at every evaluation
    # (step, row): an agent environment's random.Random for one episode; seed, step and row each in
    # their own digits, so no two (seed, step, row) share a stream below a million steps and rows
    "episode": (10**12, (10**6, 1)),
}

# purposes of the "step" stream: a step's first rollout, its updates, and further sampling rounds
# (dynamic sampling: STEP_MORE_ROLLOUTS + round - 1)
STEP_ROLLOUT, STEP_UPDATE, STEP_MORE_ROLLOUTS = 0, 1, 2


def derive_seed(seed: int, stream: str, *counters: int) -> int:
    """The seed of `stream` at `counters`, e.g. `derive_seed(run_seed, "step", step, STEP_ROLLOUT)`."""
    if stream not in SEED_STREAMS:
        raise ValueError(f"unknown seed stream {stream!r}; known: {', '.join(SEED_STREAMS)}")
    seed_multiplier, counter_multipliers = SEED_STREAMS[stream]
    if len(counters) != len(counter_multipliers):
        raise ValueError(f"seed stream {stream!r} takes {len(counter_multipliers)} counters, got {len(counters)}")
    return seed * seed_multiplier + sum(c * m for c, m in zip(counters, counter_multipliers))
