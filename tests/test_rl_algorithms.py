"""The algorithm registry: each registered estimator against a plain-Python loop on a ragged batch,
the presets' values, the config errors before any work, and the reward-function contract."""

import asyncio
import math

import pytest
import torch

from quartet.config import RL_PRESETS, ConfigError, RLConfig, load_config
from quartet.rl.algorithms import ALGORITHMS, AdvantageInputs, get_algorithm
from quartet.scoring import RewardFunctions
from rl_helpers import ragged_mask, with_garbage

LENGTHS = [3, 1, 4, 2, 4, 3]  # ragged responses
GROUPS = [5, 5, 9, 9, 9, 2]  # groups of 2, 3 and 1, ids not contiguous
GAMMA = 0.9


class Settings:
    """The algorithm section's attributes an estimator reads."""

    gamma, lam, whiten_advantages, scale_rewards, advantage_eps = GAMMA, 0.95, True, "group", 1e-6


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(3)
    mask = ragged_mask(LENGTHS, T=4).double()
    scores = torch.randn(len(LENGTHS), generator=g, dtype=torch.float64)
    kl_part = 0.1 * torch.randn(len(LENGTHS), 4, generator=g, dtype=torch.float64) * mask
    last = torch.zeros_like(mask)
    for i, n in enumerate(LENGTHS):
        last[i, n - 1] = 1.0
    rewards = kl_part + last * scores[:, None]
    return AdvantageInputs(rewards=with_garbage(rewards, mask), mask=mask, scores=scores,
                           group_ids=torch.tensor(GROUPS))


def groups_of(ids):
    out = {}
    for i, g in enumerate(ids):
        out.setdefault(g, []).append(i)
    return list(out.values())


def returns_loop(rewards, lengths, gamma):
    out = []
    for r, n in zip(rewards, lengths):
        row, running = [0.0] * len(r), 0.0
        for t in range(n - 1, -1, -1):
            running = r[t] + gamma * running
            row[t] = running
        out.append(row)
    return out


def whiten_loop(rows, lengths):
    values = [x for row, n in zip(rows, lengths) for x in row[:n]]
    mean = sum(values) / len(values)
    var = sum((x - mean) ** 2 for x in values) / (len(values) - 1)
    return [[(x - mean) / math.sqrt(var + 1e-8) if t < n else 0.0 for t, x in enumerate(row)]
            for row, n in zip(rows, lengths)]


def valid_rewards(batch):
    return [[float(x) if t < n else 0.0 for t, x in enumerate(row)] for row, n in zip(batch.rewards.tolist(), LENGTHS)]


def test_registry_names_the_parts_and_only_ppo_needs_a_critic():
    assert {"ppo", "grpo", "rloo", "reinforce++", "reinforce++-baseline"} <= set(ALGORITHMS)
    assert [name for name, a in ALGORITHMS.items() if a.needs_critic] == ["ppo"]
    assert get_algorithm("grpo").kl_penalty == "loss" and get_algorithm("ppo").kl_penalty == "reward"
    assert {name for name, a in ALGORITHMS.items() if a.group} == {"grpo", "rloo", "reinforce++-baseline"}
    with pytest.raises(ValueError, match="unknown algorithm 'nope'; registered: grpo, ppo"):
        get_algorithm("nope")


def test_grpo_entry_is_the_group_normalised_sequence_return_on_every_token(batch):
    advantages, returns = get_algorithm("grpo").advantages(batch, Settings())
    totals = [sum(row) for row in valid_rewards(batch)]  # the score plus the KL part, per response
    expected = [0.0] * len(totals)
    for idx in groups_of(GROUPS):
        xs = [totals[i] for i in idx]
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
        for i in idx:
            expected[i] = (totals[i] - mean) / (std + 1e-6)
    assert returns is None
    for i, n in enumerate(LENGTHS):
        assert advantages[i].tolist() == pytest.approx([expected[i]] * n + [0.0] * (4 - n), abs=1e-12)


def test_rloo_entry_subtracts_the_mean_of_the_others(batch):
    advantages, _ = get_algorithm("rloo").advantages(batch, Settings())
    totals = [sum(row) for row in valid_rewards(batch)]
    for idx in groups_of(GROUPS):
        for i in idx:
            others = [totals[j] for j in idx if j != i]
            expected = totals[i] - sum(others) / len(others) if others else 0.0
            assert advantages[i, : LENGTHS[i]].tolist() == pytest.approx([expected] * LENGTHS[i], abs=1e-12)


def test_reinforce_plus_plus_entry_whitens_the_token_returns(batch):
    advantages, _ = get_algorithm("reinforce++").advantages(batch, Settings())
    expected = whiten_loop(returns_loop(valid_rewards(batch), LENGTHS, GAMMA), LENGTHS)
    for i in range(len(LENGTHS)):
        assert advantages[i].tolist() == pytest.approx(expected[i], abs=1e-9)


def test_reinforce_plus_plus_baseline_entry_subtracts_the_group_mean_score_first(batch):
    advantages, _ = get_algorithm("reinforce++-baseline").advantages(batch, Settings())
    rewards = valid_rewards(batch)
    scores = batch.scores.tolist()
    for idx in groups_of(GROUPS):
        mean = sum(scores[i] for i in idx) / len(idx)
        for i in idx:
            rewards[i][LENGTHS[i] - 1] -= mean
    expected = whiten_loop(returns_loop(rewards, LENGTHS, GAMMA), LENGTHS)
    for i in range(len(LENGTHS)):
        assert advantages[i].tolist() == pytest.approx(expected[i], abs=1e-9)


# --------------------------------------------------------------------------- configs

BASE = ["--models.actor", "a", "--models.reward_fn", "m:f"]


def test_choosing_an_algorithm_applies_its_preset_under_your_values():
    grpo = load_config(RLConfig, None, [*BASE, "--algorithm.name", "grpo"])
    assert (grpo.rollout.n, grpo.algorithm.beta, grpo.algorithm.kl_estimator) == (8, 0.04, "k3")
    assert grpo.algorithm.kl_in_loss and grpo.algorithm.aggregation == "seq-mean-token-mean"
    mine = load_config(RLConfig, None, [*BASE, "--algorithm.name", "grpo", "--rollout.n", "4", "--batch.rollout_batch_size", "32"])
    assert mine.rollout.n == 4 and mine.algorithm.beta == 0.04
    dapo = load_config(RLConfig, None, [*BASE, "--preset", "dapo"]).algorithm
    assert (dapo.name, dapo.clip_high, dapo.dynamic_sampling, dapo.overlong_shaping, dapo.beta) == ("grpo", 0.28, True, True, 0.0)
    assert not dapo.uses_reference and dapo.aggregation == "token-mean"
    dr = load_config(RLConfig, None, [*BASE, "--preset", "dr-grpo"]).algorithm
    assert (dr.scale_rewards, dr.aggregation) == ("none", "seq-mean-token-sum-norm")
    assert set(RL_PRESETS) >= {"grpo", "dr-grpo", "dapo", "rloo", "reinforce++", "reinforce++-baseline", "deepspeed-chat"}


@pytest.mark.parametrize("args, message", [
    (["--algorithm.name", "grpo", "--rollout.n", "1"], "compares the samples of a prompt's group: set rollout.n to 2"),
    (["--algorithm.name", "rloo", "--batch.rollout_batch_size", "12", "--batch.mini_batch_size", "4"], r"rollout_batch_size \(12\) counts samples: it must"
                                                                        r" be a multiple of rollout.n \(8\)"),
    (["--algorithm.name", "grpo", "--models.critic", "c"], "algorithm 'grpo' has no critic: leave models.critic unset"),
    (["--algorithm.name", "reinforce++", "--models.shared_trunk", "true"], "has no critic: leave models.shared_trunk"),
])
def test_impossible_algorithm_settings_fail_when_the_config_loads(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RLConfig, None, [*BASE, "--batch.rollout_batch_size", "16", *args])


# --------------------------------------------------------------------------- reward functions

def two_args(prompts, responses):
    return [float(len(r)) for r in responses]


def checks_answer(prompts, responses, answer):
    return [1.0 if r == a else 0.0 for r, a in zip(responses, answer)]


def judges_some(prompts, responses, **columns):
    return [None if c == "skip" else 0.5 for c in columns["kind"]]


async def slow_async(prompts, responses, **columns):
    await asyncio.sleep(0.01)
    return [2.0] * len(responses)


def test_reward_functions_get_the_columns_they_ask_for_with_weights_and_unjudged_rows():
    fns = RewardFunctions([two_args, checks_answer, judges_some, slow_async], weights=[1.0, 2.0, 4.0, 0.5])
    totals, parts = fns(["p"] * 3, ["4", "5", "44"], {"answer": ["4", "4", "4"], "kind": ["a", "skip", "a"]})
    assert parts["checks_answer"] == [1.0, 0.0, 0.0]
    assert math.isnan(parts["judges_some"][1]) and parts["judges_some"][0] == 0.5
    assert totals == [1 + 2 + 2 + 1, 1 + 0 + 0 + 1, 2 + 0 + 2 + 1]  # the unjudged row leaves that share out


@pytest.mark.parametrize("fn, message", [
    (lambda prompts, responses: [1.0], r"returned 1 values for 2 responses"),
    (lambda prompts, responses: [1.0, "good"], r"returned 'good' \(str\) for row 1: return a number, or None"),
    (lambda prompts, responses: 3.0, r"returned float, not one score per response"),
])
def test_a_reward_function_that_breaks_the_contract_is_named(fn, message):
    with pytest.raises(ValueError, match=message):
        RewardFunctions([fn])(["p", "q"], ["a", "b"], {})


def test_a_nan_score_stays_nan_so_the_step_is_skipped_as_non_finite():
    totals, _ = RewardFunctions([lambda prompts, responses: [float("nan"), 1.0]])(["p", "q"], ["a", "b"], {})
    assert math.isnan(totals[0]) and totals[1] == 1.0


def test_a_contract_break_stops_the_run_at_its_first_step_with_the_function_named(fruit, tmp_path, capsys):
    """Reward functions are user code that may count calls or cost money per call: they are not probed
    ahead of the run; the first step's scores are checked before any update."""
    from quartet.cli import main

    out = tmp_path / "run"
    code = main(["grpo", "--models.actor", str(fruit / "sft" / "final"), "--models.reward_fn", "rule_rewards:too_few",
                 "--data.train", str(fruit / "prompts.jsonl"), "--output", str(out)])
    assert code == 2 and "error: reward function too_few returned 1 values for 16 responses" in capsys.readouterr().err
    assert not (out / "checkpoints").exists() and not (out / "final").exists()
