"""GAE and whitening against plain-Python loops, with ragged masks and garbage at masked positions."""

import pytest
import torch

from quartet.rl import gae_advantages, whiten
from rl_helpers import LENGTHS, T, ragged_mask, with_garbage


def reference_gae(rewards, values, lengths, gamma, lam):
    advantages, returns = [], []
    for r, v, n in zip(rewards, values, lengths):
        adv = [0.0] * len(r)
        next_adv = 0.0
        for t in range(n - 1, -1, -1):
            next_v = v[t + 1] if t + 1 < n else 0.0
            delta = r[t] + gamma * next_v - v[t]
            next_adv = delta + gamma * lam * next_adv
            adv[t] = next_adv
        advantages.append(adv)
        returns.append([adv[t] + v[t] if t < n else 0.0 for t in range(len(r))])
    return advantages, returns


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64)
    values = torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64)
    return rewards, values


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_loop(batch, gamma, lam):
    rewards, values = batch
    mask = ragged_mask()
    adv, ret = gae_advantages(with_garbage(rewards, mask), with_garbage(values, mask, -1e6), mask, gamma, lam)
    exp_adv, exp_ret = reference_gae(rewards.tolist(), values.tolist(), LENGTHS, gamma, lam)
    for b in range(len(LENGTHS)):
        assert adv[b].tolist() == pytest.approx(exp_adv[b], abs=1e-12)
        assert ret[b].tolist() == pytest.approx(exp_ret[b], abs=1e-12)


def test_gae_defaults_and_garbage_invariance(batch):
    rewards, values = batch
    mask = ragged_mask()
    clean = gae_advantages(rewards, values, mask)
    exp_adv, _ = reference_gae(rewards.tolist(), values.tolist(), LENGTHS, 1.0, 0.95)
    assert clean[0][1].tolist() == pytest.approx(exp_adv[1])
    for garbage in (1e6, float("nan")):
        dirty = gae_advantages(with_garbage(rewards, mask, garbage), with_garbage(values, mask, garbage), mask)
        assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])
    assert (clean[0][mask == 0] == 0).all() and (clean[1][mask == 0] == 0).all()


def test_gae_lambda_one_gives_discounted_reward_to_go(batch):
    rewards, values = batch
    mask = ragged_mask()
    gamma = 0.9
    _, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=1.0)
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            to_go = sum(gamma ** (k - t) * float(rewards[b, k]) for k in range(t, n))
            assert float(ret[b, t]) == pytest.approx(to_go, abs=1e-12)


def test_gae_lambda_zero_is_one_step_td(batch):
    rewards, values = batch
    mask = ragged_mask()
    adv, _ = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.0)
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            next_v = float(values[b, t + 1]) if t + 1 < n else 0.0
            assert float(adv[b, t]) == pytest.approx(float(rewards[b, t]) + next_v - float(values[b, t]))


def valid_list(x, mask):
    return [float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t] > 0]


def test_whiten_mean_zero_var_one_on_valid_tokens(batch):
    x = 3.0 + 5.0 * batch[0]
    mask = ragged_mask()
    w = whiten(with_garbage(x, mask), mask)
    vals = valid_list(w, mask)
    n = len(vals)
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    assert mean == pytest.approx(0.0, abs=1e-12)
    assert var == pytest.approx(1.0, abs=1e-8)
    assert (w[mask == 0] == 0).all()


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_loop(batch, shift_mean):
    x = batch[1]
    mask = ragged_mask()
    vals = valid_list(x, mask)
    n = len(vals)
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    w = whiten(with_garbage(x, mask, float("inf")), mask, shift_mean=shift_mean, eps=1e-8)
    for b, length in enumerate(LENGTHS):
        for t in range(T):
            if t < length:
                expected = (float(x[b, t]) - mean) / (var + 1e-8) ** 0.5 + (0.0 if shift_mean else mean)
            else:
                expected = 0.0
            assert float(w[b, t]) == pytest.approx(expected, abs=1e-12)
    if not shift_mean:
        assert sum(valid_list(w, mask)) / n == pytest.approx(mean)
