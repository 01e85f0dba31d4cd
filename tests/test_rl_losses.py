"""PPO policy/value losses, the pairwise reward-model loss and explained variance, against plain Python."""

import math

import pytest
import torch

from quartet.rl import explained_variance, pairwise_loss, policy_loss, value_loss
from rl_helpers import LENGTHS, T, ragged_mask, with_garbage


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    shape = (len(LENGTHS), T)
    old_logp = -2 * torch.rand(shape, generator=g, dtype=torch.float64)
    logp = old_logp + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)  # ratios in and out of [0.8, 1.2]
    advantages = torch.randn(shape, generator=g, dtype=torch.float64)
    return logp, old_logp, advantages


def reference_policy_loss(logp, old_logp, adv, lengths, c):
    losses, clipped, kls = [], [], []
    for b, n in enumerate(lengths):
        for t in range(n):
            ratio = math.exp(logp[b][t] - old_logp[b][t])
            unclipped_term = -adv[b][t] * ratio
            clipped_term = -adv[b][t] * min(max(ratio, 1 - c), 1 + c)
            losses.append(max(unclipped_term, clipped_term))
            clipped.append(1.0 if clipped_term > unclipped_term else 0.0)
            kls.append(0.5 * (logp[b][t] - old_logp[b][t]) ** 2)
    n = len(losses)
    return sum(losses) / n, sum(clipped) / n, sum(kls) / n


@pytest.mark.parametrize("cliprange", [0.2, 0.1])
def test_policy_loss_matches_loop(batch, cliprange):
    logp, old_logp, adv = batch
    mask = ragged_mask()
    loss, stats = policy_loss(
        with_garbage(logp, mask), with_garbage(old_logp, mask, -1e6), with_garbage(adv, mask), mask, cliprange
    )
    exp_loss, exp_clipfrac, exp_kl = reference_policy_loss(logp.tolist(), old_logp.tolist(), adv.tolist(), LENGTHS, cliprange)
    assert 0 < exp_clipfrac < 1  # the fixture exercises both branches
    assert loss.item() == pytest.approx(exp_loss, rel=1e-12)
    assert float(stats["clipfrac"]) == pytest.approx(exp_clipfrac)
    assert float(stats["approx_kl"]) == pytest.approx(exp_kl, rel=1e-12)
    assert set(stats) == {"clipfrac", "approx_kl"} and all(v.dim() == 0 for v in stats.values())


def test_policy_loss_garbage_does_not_reach_gradient(batch):
    logp, old_logp, adv = batch
    mask = ragged_mask()
    clean = logp.clone().requires_grad_()
    dirty = with_garbage(logp, mask, 1e6).requires_grad_()
    policy_loss(clean, old_logp, adv, mask)[0].backward()
    policy_loss(dirty, with_garbage(old_logp, mask, -1e6), with_garbage(adv, mask, float("nan")), mask)[0].backward()
    assert torch.equal(clean.grad, dirty.grad)
    assert (dirty.grad[mask == 0] == 0).all()


@pytest.mark.parametrize("advantage", [1.5, -1.5])
def test_policy_gradient_sign(advantage):
    # one token, ratio 1: raising the log-prob of a positive-advantage token lowers the loss
    logp = torch.tensor([[-1.0]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.tensor([[-1.0]]), torch.tensor([[advantage]]), torch.ones(1, 1))
    loss.backward()
    assert float(logp.grad) == pytest.approx(-advantage)  # d/dlogp of -A * exp(logp - old) at ratio 1
    with torch.no_grad():
        raised, _ = policy_loss(logp + 0.05, torch.tensor([[-1.0]]), torch.tensor([[advantage]]), torch.ones(1, 1))
    assert (float(raised) < loss.item()) == (advantage > 0)


@pytest.mark.parametrize("ratio, advantage, clipped", [
    (1.3, 1.0, True),    # above 1 + c, positive advantage: no further incentive
    (1.3, -1.0, False),  # above 1 + c, negative advantage: still pushed down
    (0.7, -1.0, True),   # below 1 - c, negative advantage: no further incentive
    (0.7, 1.0, False),   # below 1 - c, positive advantage: still pushed up
    (1.1, 1.0, False),   # inside the range: never clipped
    (0.9, -1.0, False),
    (1.3, 0.0, False),   # zero advantage: both terms are 0
])
def test_clipping_activates_exactly_outside_range_with_matching_sign(ratio, advantage, clipped):
    old_logp = torch.tensor([[-1.0]], dtype=torch.float64)
    logp = (old_logp + math.log(ratio)).requires_grad_()
    loss, stats = policy_loss(logp, old_logp, torch.tensor([[advantage]], dtype=torch.float64), torch.ones(1, 1), 0.2)
    loss.backward()
    assert float(stats["clipfrac"]) == (1.0 if clipped else 0.0)
    if clipped:
        assert float(logp.grad) == 0.0
        assert loss.item() == pytest.approx(-advantage * (1.2 if ratio > 1 else 0.8))
    else:
        assert float(logp.grad) == pytest.approx(-advantage * ratio)
        assert loss.item() == pytest.approx(-advantage * ratio)


def reference_value_loss(values, old_values, returns, lengths, c):
    losses, clipped = [], []
    for b, n in enumerate(lengths):
        for t in range(n):
            v, old, ret = values[b][t], old_values[b][t], returns[b][t]
            v_clipped = old + min(max(v - old, -c), c)
            unclipped_err, clipped_err = (v - ret) ** 2, (v_clipped - ret) ** 2
            losses.append(max(unclipped_err, clipped_err))
            clipped.append(1.0 if clipped_err > unclipped_err else 0.0)
    return 0.5 * sum(losses) / len(losses), sum(clipped) / len(clipped)


def test_value_loss_matches_loop():
    g = torch.Generator().manual_seed(1)
    shape = (len(LENGTHS), T)
    old_values = torch.randn(shape, generator=g, dtype=torch.float64)
    values = old_values + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    returns = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = ragged_mask()
    loss, stats = value_loss(
        with_garbage(values, mask), with_garbage(old_values, mask, -1e6), with_garbage(returns, mask), mask, 0.2
    )
    exp_loss, exp_clipfrac = reference_value_loss(values.tolist(), old_values.tolist(), returns.tolist(), LENGTHS, 0.2)
    assert 0 < exp_clipfrac < 1
    assert loss.item() == pytest.approx(exp_loss, rel=1e-12)
    assert float(stats["clipfrac"]) == pytest.approx(exp_clipfrac)
    unclipped_loss, unclipped_stats = value_loss(values, old_values, returns, mask, cliprange_value=None)
    exp_unclipped = 0.5 * sum((float(values[b, t]) - float(returns[b, t])) ** 2 for b, n in enumerate(LENGTHS)
                              for t in range(n)) / sum(LENGTHS)
    assert float(unclipped_loss) == pytest.approx(exp_unclipped) and float(unclipped_stats["clipfrac"]) == 0


def test_value_loss_clip_cases():
    old = torch.tensor([[0.0]])
    ret = torch.tensor([[1.0]])
    one = torch.ones(1, 1)
    # moved past the clip range toward the return: the clipped (larger) error counts and the gradient stops
    v = torch.tensor([[0.5]], requires_grad=True)
    loss, stats = value_loss(v, old, ret, one, 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * 0.8**2) and float(stats["clipfrac"]) == 1 and float(v.grad) == 0
    # moved past the clip range away from the return: the unclipped error is larger, gradient flows
    v = torch.tensor([[-0.5]], requires_grad=True)
    loss, stats = value_loss(v, old, ret, one, 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * 1.5**2) and float(stats["clipfrac"]) == 0
    assert float(v.grad) == pytest.approx(-1.5)
    # inside the range: plain squared error
    loss, stats = value_loss(torch.tensor([[0.1]]), old, ret, one, 0.2)
    assert loss.item() == pytest.approx(0.5 * 0.9**2) and float(stats["clipfrac"]) == 0


def log_sigmoid(x):
    return -math.log(1 + math.exp(-x))


def test_pairwise_loss_hand_computed():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    expected = (-log_sigmoid(1.0) - log_sigmoid(-2.0)) / 2  # = (log(1 + e^-1) + log(1 + e^2)) / 2
    assert expected == pytest.approx((math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2)
    assert float(pairwise_loss(chosen, rejected)) == pytest.approx(expected, rel=1e-6)

    margin = torch.tensor([0.5, 1.0])
    with_margin = (-log_sigmoid(1.0 - 0.5) - log_sigmoid(-2.0 - 1.0)) / 2
    assert float(pairwise_loss(chosen, rejected, margin=margin)) == pytest.approx(with_margin, rel=1e-6)
    assert with_margin > expected  # a margin makes the same scores cost more

    centered = expected + 0.1 * ((1.0 + 0.0) ** 2 + (0.0 + 2.0) ** 2) / 2
    assert float(pairwise_loss(chosen, rejected, center_coef=0.1)) == pytest.approx(centered, rel=1e-6)
    # centering penalises the sum of the scores (not their difference)
    chosen, rejected = torch.tensor([2.0, 1.0]), torch.tensor([1.0, -3.0])
    base = (-log_sigmoid(1.0) - log_sigmoid(4.0)) / 2
    centered = base + 0.5 * ((2.0 + 1.0) ** 2 + (1.0 - 3.0) ** 2) / 2
    assert float(pairwise_loss(chosen, rejected, center_coef=0.5)) == pytest.approx(centered, rel=1e-6)
    assert float(pairwise_loss(chosen + 7, rejected + 7)) == pytest.approx(base, rel=1e-6)  # shift-invariant without it


def test_pairwise_loss_gradient_separates_scores():
    chosen = torch.tensor([0.2, -0.3], requires_grad=True)
    rejected = torch.tensor([0.1, 0.4], requires_grad=True)
    pairwise_loss(chosen, rejected).backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def reference_var(xs):
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def test_explained_variance_matches_loop():
    g = torch.Generator().manual_seed(2)
    shape = (len(LENGTHS), T)
    returns = torch.randn(shape, generator=g, dtype=torch.float64)
    values = returns + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    mask = ragged_mask()
    rets = [float(returns[b, t]) for b, n in enumerate(LENGTHS) for t in range(n)]
    resid = [float(returns[b, t] - values[b, t]) for b, n in enumerate(LENGTHS) for t in range(n)]
    got = explained_variance(with_garbage(values, mask), with_garbage(returns, mask, -1e6), mask)
    assert got.dim() == 0
    assert float(got) == pytest.approx(1 - reference_var(resid) / reference_var(rets), rel=1e-12)
    assert float(explained_variance(returns, returns, mask)) == pytest.approx(1.0)
    assert float(explained_variance(torch.zeros(shape, dtype=torch.float64), returns, mask)) == pytest.approx(0.0)
    assert math.isnan(float(explained_variance(values, torch.ones(shape, dtype=torch.float64), mask)))
