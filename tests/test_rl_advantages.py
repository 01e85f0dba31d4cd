"""GAE, whitening and the group-relative advantages (GRPO, RLOO, REINFORCE++) against plain-Python loops,
with ragged masks, ragged shuffled groups and garbage at masked positions."""

import pytest
import torch

from quartet.rl import (
    GRPO_SCALES,
    broadcast_to_tokens,
    discounted_returns,
    gae_advantages,
    group_baseline,
    grpo_advantages,
    rloo_advantages,
    whiten,
)
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


# ---- critic-free, group-relative advantages ----

# groups of sizes 4 (id 11), 3 (id 7), 2 (id 0) and 1 (id 2), ids neither contiguous nor sorted
GROUP_IDS = [11, 7, 0, 11, 2, 7, 11, 0, 7, 11]


def group_members(group_ids):
    groups = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    return list(groups.values())


def sample_std(xs):
    m = sum(xs) / len(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def reference_grpo(scores, group_ids, scale, eps):
    batch_std = sample_std(scores)
    out = [0.0] * len(scores)
    for idx in group_members(group_ids):
        xs = [scores[i] for i in idx]
        mean = sum(xs) / len(xs)
        for i in idx:
            if scale == "none":
                out[i] = scores[i] - mean
            else:
                out[i] = (scores[i] - mean) / ((sample_std(xs) if scale == "group" else batch_std) + eps)
    return out


@pytest.fixture
def group_scores():
    g = torch.Generator().manual_seed(4)
    return 2.0 + torch.randn(len(GROUP_IDS), generator=g, dtype=torch.float64)


@pytest.mark.parametrize("scale", GRPO_SCALES)
def test_grpo_advantages_match_loop(group_scores, scale):
    ids = torch.tensor(GROUP_IDS)
    adv = grpo_advantages(group_scores, ids, scale=scale, eps=1e-6)
    assert adv.tolist() == pytest.approx(reference_grpo(group_scores.tolist(), GROUP_IDS, scale, 1e-6), abs=1e-12)
    assert float(adv[GROUP_IDS.index(2)]) == 0.0  # alone in its group: no baseline but itself, advantage 0


def test_grpo_group_scale_gives_unit_std_groups_and_batch_uses_the_raw_score_std(group_scores):
    ids = torch.tensor(GROUP_IDS)
    adv = grpo_advantages(group_scores, ids, eps=0.0)
    for idx in group_members(GROUP_IDS):
        if len(idx) > 1:
            assert sum(adv[idx].tolist()) == pytest.approx(0.0, abs=1e-12)
            assert float(adv[idx].std()) == pytest.approx(1.0)
    batch = grpo_advantages(group_scores, ids, scale="batch", eps=0.0)
    none = grpo_advantages(group_scores, ids, scale="none")
    assert torch.allclose(batch * group_scores.std(), none, atol=1e-12, rtol=0)
    assert torch.allclose(none, group_baseline(group_scores, ids), atol=0, rtol=0)


def test_grpo_unknown_scale_is_refused(group_scores):
    with pytest.raises(ValueError, match="valid: group, batch, none"):
        grpo_advantages(group_scores, torch.tensor(GROUP_IDS), scale="token")


def test_rloo_advantages_match_leave_one_out_loop(group_scores):
    ids = torch.tensor(GROUP_IDS)
    scores = group_scores.tolist()
    expected = [0.0] * len(scores)
    for idx in group_members(GROUP_IDS):
        for i in idx:
            others = [scores[j] for j in idx if j != i]
            expected[i] = scores[i] - sum(others) / len(others) if others else 0.0
    adv = rloo_advantages(group_scores, ids)
    assert adv.tolist() == pytest.approx(expected, abs=1e-12)
    n = torch.tensor([4, 3, 2, 4, 1, 3, 4, 2, 3, 4], dtype=torch.float64)  # group sizes
    scaled = n / (n - 1).clamp(min=1) * group_baseline(group_scores, ids)  # the same, as n / (n - 1) * (r - mean)
    assert torch.allclose(torch.where(n > 1, scaled, torch.zeros_like(scaled)), adv, atol=1e-12, rtol=0)


def test_group_baseline_matches_loop(group_scores):
    scores = group_scores.tolist()
    expected = [0.0] * len(scores)
    for idx in group_members(GROUP_IDS):
        mean = sum(scores[i] for i in idx) / len(idx)
        for i in idx:
            expected[i] = scores[i] - mean
    assert group_baseline(group_scores, torch.tensor(GROUP_IDS)).tolist() == pytest.approx(expected, abs=1e-12)


RETURN_LENGTHS = [0, 6, 3, 1, 4]  # an empty row and a full row


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_match_loop(gamma):
    g = torch.Generator().manual_seed(5)
    rewards = torch.randn(len(RETURN_LENGTHS), T, generator=g, dtype=torch.float64)
    mask = ragged_mask(RETURN_LENGTHS, T)
    got = discounted_returns(with_garbage(rewards, mask, float("nan")), mask, gamma)
    for b, n in enumerate(RETURN_LENGTHS):
        expected, running = [0.0] * T, 0.0
        for t in range(n - 1, -1, -1):
            running = float(rewards[b, t]) + gamma * running
            expected[t] = running
        assert got[b].tolist() == pytest.approx(expected, abs=1e-12)
    assert torch.equal(got, discounted_returns(with_garbage(rewards, mask, 1e6), mask, gamma))


def test_broadcast_to_tokens():
    mask = ragged_mask(RETURN_LENGTHS, T)
    values = [1.0, -2.0, 3.0, 0.5, 7.0]
    out = broadcast_to_tokens(torch.tensor(values, dtype=torch.float64), mask)
    assert out.shape == (len(values), T) and out.dtype == torch.float64
    for b, n in enumerate(RETURN_LENGTHS):
        assert out[b].tolist() == [values[b] if t < n else 0.0 for t in range(T)]
    with pytest.raises(ValueError, match="one value per row"):
        broadcast_to_tokens(torch.tensor(values[:3]), mask)
