"""Off-policy correction (rl/offpolicy.py): importance weights pi_old / pi_sampler against a plain-Python loop on
ragged masks with garbage in the masked positions, exactly 1 where the two agree, and applied by the trainer to
each token's policy-gradient term (decoupled as is, TIS capped)."""

import math

import pytest
import torch

import quartet.rollout.backend as backend
from quartet.config import RLConfig, build_config
from quartet.rl.losses import clipped_policy_objective
from quartet.rl.offpolicy import behaviour_weights
from quartet.runs.metrics import read_metrics
from quartet.stages.rl import run_rl
from rl_helpers import ragged_mask, with_garbage


def _reference(proximal, behaviour, mask, cap):
    weights, ratios, capped = [], [], 0
    for p_row, b_row, m_row in zip(proximal.tolist(), behaviour.tolist(), mask.tolist()):
        row = []
        for p, b, m in zip(p_row, b_row, m_row):
            if not m:
                row.append(0.0)
                continue
            ratio = math.exp(p - b)
            ratios.append(ratio)
            capped += cap is not None and ratio > cap
            row.append(ratio if cap is None else min(ratio, cap))
        weights.append(row)
    return weights, sum(ratios) / len(ratios), max(ratios), capped / len(ratios)


@pytest.mark.parametrize("cap", [None, 1.2])
def test_behaviour_weights_match_a_plain_loop_on_a_ragged_batch(cap):
    mask = ragged_mask()
    g = torch.Generator().manual_seed(0)
    proximal = -torch.rand(mask.shape, generator=g) * 3
    behaviour = proximal + torch.randn(mask.shape, generator=g) * 0.3
    weights, stats = behaviour_weights(with_garbage(proximal, mask), with_garbage(behaviour, mask, -1e6), mask, cap)
    expected, mean, largest, share = _reference(proximal, behaviour, mask, cap)
    torch.testing.assert_close(weights, torch.tensor(expected), atol=1e-6, rtol=1e-6)
    assert float(stats["ratio_mean"]) == pytest.approx(mean, rel=1e-6)
    assert float(stats["ratio_max"]) == pytest.approx(largest, rel=1e-6)
    assert float(stats["capped"]) == pytest.approx(share)
    assert (share > 0) == (cap is not None)  # the draw has ratios above 1.2


def test_equal_log_probs_give_weights_of_exactly_one_and_leave_the_loss_as_it_was():
    mask = ragged_mask()
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(mask.shape, generator=g)
    logp = old + torch.randn(mask.shape, generator=g) * 0.1
    advantages = torch.randn(mask.shape[0], generator=g)
    weights, stats = behaviour_weights(old, old.clone(), mask, cap=2.0)
    assert torch.equal(weights, mask) and float(stats["capped"]) == 0.0 and float(stats["abs_log_ratio"]) == 0.0
    losses, _ = clipped_policy_objective(logp, old, advantages, mask)
    assert torch.equal(losses * weights, losses)


def test_a_cap_must_be_above_one():
    with pytest.raises(ValueError, match="cap must be > 1"):
        behaviour_weights(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), cap=1.0)


def _sampler_twice_as_likely(monkeypatch, factor: float = 2.0):
    """The sampler reports each sampled token `factor` times less likely than the trainer: w = factor everywhere."""
    generate = backend.HFRollout.generate

    def generate_with_other_logprobs(self, *args, **kwargs):
        rollout = generate(self, *args, **kwargs)
        rollout.logprobs = rollout.logprobs - math.log(factor) * rollout.response_mask
        return rollout

    monkeypatch.setattr(backend.HFRollout, "generate", generate_with_other_logprobs)


def _run(fruit, name, correction, **algorithm):
    run_rl(build_config(RLConfig, {
        "run": {"output_dir": str(fruit / name)},
        "models": {"actor": str(fruit / "sft" / "final"), "reward_fn": "rule_rewards:apple_fraction"},
        "data": {"train": str(fruit / "prompts.jsonl")},
        "algorithm": {"name": "grpo", "offpolicy_correction": correction, "loss_aggregation": "token-mean", **algorithm},
        "rollout": {"max_new_tokens": 8, "n": 4, "logprobs_from_generation": False},
        "batch": {"rollout_batch_size": 8, "mini_batch_size": 8}, "optim": {"actor_lr": 3e-4},
        "train": {"steps": 1}}))
    return read_metrics(fruit / name / "metrics.jsonl")[0]


def test_the_trainer_weighs_each_tokens_policy_gradient_decoupled_as_is_and_tis_capped(fruit, monkeypatch):
    plain = _run(fruit, "offpolicy_none", "none")
    assert not any(key.startswith("offpolicy/") for key in plain)
    _sampler_twice_as_likely(monkeypatch)
    decoupled = _run(fruit, "offpolicy_decoupled", "decoupled")
    tis = _run(fruit, "offpolicy_tis", "tis", tis_cap=1.5)
    assert plain["loss/policy"] != 0.0
    # the same rollout (the weights do not change what is sampled); the policy term scaled by w, 2, or the cap
    assert decoupled["score/mean"] == tis["score/mean"] == plain["score/mean"]
    assert decoupled["loss/policy"] == pytest.approx(2.0 * plain["loss/policy"], rel=1e-5)
    assert tis["loss/policy"] == pytest.approx(1.5 * plain["loss/policy"], rel=1e-5)
    for record in (decoupled, tis):
        assert record["offpolicy/ratio_mean"] == pytest.approx(2.0, rel=1e-5)
        assert record["offpolicy/ratio_max"] == pytest.approx(2.0, rel=1e-5)
    assert decoupled["offpolicy/capped"] == 0.0 and tis["offpolicy/capped"] == 1.0
