"""The per-token clipped policy objective (clip-higher, dual clip, GSPO's sequence ratio) against
plain Python, its gradients, and its bit-identity with PPO's `policy_loss`."""

import math

import pytest
import torch

from quartet.rl import aggregate, broadcast_to_tokens, clipped_policy_objective, policy_loss
from rl_helpers import ragged_mask, with_garbage

LENGTHS = [2, 6, 0, 3, 1, 5]  # ragged, one empty row, one full row
T = 6


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    shape = (len(LENGTHS), T)
    old_logp = -2 * torch.rand(shape, generator=g, dtype=torch.float64)
    logp = old_logp + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)  # ratios on both sides of the clip range
    advantages = torch.randn(shape, generator=g, dtype=torch.float64)
    return logp, old_logp, advantages


def dirty(logp, old_logp, adv, mask):
    """The same inputs with garbage at every masked position."""
    return with_garbage(logp, mask, 1e6), with_garbage(old_logp, mask, float("nan")), with_garbage(adv, mask, -1e6)


def reference_objective(logp, old_logp, adv, lengths, clip_low, clip_high, dual_clip=None, sequence_ratio=False):
    """Per-token losses (lists, 0 past each row's length) and the stats, by explicit loops."""
    losses, counts, n_valid = [], dict.fromkeys(["clipfrac", "clipfrac_low", "clipfrac_high", "dual_clipfrac"], 0), 0
    kls, ratios = [], []
    for b, n in enumerate(lengths):
        row = [0.0] * len(logp[b])
        seq_log_ratio = sum(logp[b][t] - old_logp[b][t] for t in range(n)) / n if n else 0.0
        for t in range(n):
            ratio = math.exp(seq_log_ratio) if sequence_ratio else math.exp(logp[b][t] - old_logp[b][t])
            a = adv[b][t]
            unclipped = -a * ratio
            clipped = -a * min(max(ratio, 1 - clip_low), 1 + clip_high)
            loss = max(unclipped, clipped)
            if dual_clip is not None and a < 0:
                counts["dual_clipfrac"] += loss > -a * dual_clip
                loss = min(loss, -a * dual_clip)
            row[t] = loss
            counts["clipfrac"] += clipped > unclipped
            counts["clipfrac_low"] += a < 0 and ratio < 1 - clip_low
            counts["clipfrac_high"] += a > 0 and ratio > 1 + clip_high
            kls.append(0.5 * (logp[b][t] - old_logp[b][t]) ** 2)
            ratios.append(ratio)
            n_valid += 1
        losses.append(row)
    stats = {k: v / n_valid for k, v in counts.items()}
    stats["approx_kl"] = sum(kls) / n_valid
    stats["ratio_mean"] = sum(ratios) / n_valid
    if dual_clip is None:
        del stats["dual_clipfrac"]
    return losses, stats


CONFIGS = [
    dict(clip_low=0.2, clip_high=0.2),
    dict(clip_low=0.2, clip_high=0.28),  # DAPO clip-higher
    dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0),
    dict(clip_low=0.1, clip_high=0.3, dual_clip=1.5),  # a low cap, so the dual clip fires often
    dict(clip_low=0.2, clip_high=0.2, sequence_ratio=True),  # GSPO-token
    dict(clip_low=0.05, clip_high=0.1, dual_clip=1.5, sequence_ratio=True),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_objective_matches_loop_and_ignores_garbage(batch, config):
    logp, old_logp, adv = batch
    mask = ragged_mask(LENGTHS, T)
    losses, stats = clipped_policy_objective(*dirty(logp, old_logp, adv, mask), mask, **config)
    exp_losses, exp_stats = reference_objective(logp.tolist(), old_logp.tolist(), adv.tolist(), LENGTHS, **config)
    assert losses.shape == (len(LENGTHS), T)
    for b in range(len(LENGTHS)):
        assert losses[b].tolist() == pytest.approx(exp_losses[b], abs=1e-12)
    assert set(stats) == set(exp_stats) and all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    for k, v in exp_stats.items():
        assert float(stats[k]) == pytest.approx(v, abs=1e-12), k
    clean_losses, clean_stats = clipped_policy_objective(logp, old_logp, adv, mask, **config)
    assert torch.equal(clean_losses, losses)
    assert all(torch.equal(clean_stats[k], stats[k]) for k in stats)


def test_the_fixture_exercises_every_branch(batch):
    logp, old_logp, adv = batch
    _, stats = reference_objective(logp.tolist(), old_logp.tolist(), adv.tolist(), LENGTHS, 0.1, 0.3, dual_clip=1.5)
    assert all(0 < stats[k] < 0.5 for k in ("clipfrac_low", "clipfrac_high", "dual_clipfrac"))
    assert stats["clipfrac"] == pytest.approx(stats["clipfrac_low"] + stats["clipfrac_high"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cliprange", [0.2, 0.1, 0.3])
def test_symmetric_token_mean_is_policy_loss_bit_for_bit(batch, dtype, cliprange):
    logp, old_logp, adv = (x.to(dtype) for x in batch)
    mask = ragged_mask(LENGTHS, T)
    logp, old_logp, adv = dirty(logp, old_logp, adv, mask)
    x_new, x_old = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    losses, stats = clipped_policy_objective(x_new, old_logp, adv, mask, clip_low=cliprange, clip_high=cliprange)
    new = aggregate(losses, mask, "token-mean")
    old, old_stats = policy_loss(x_old, old_logp, adv, mask, cliprange)
    assert torch.equal(new, old)
    assert torch.equal(stats["clipfrac"], old_stats["clipfrac"]) and torch.equal(stats["approx_kl"], old_stats["approx_kl"])
    new.backward()
    old.backward()
    assert torch.equal(x_new.grad, x_old.grad)


def test_sequence_advantages_broadcast_like_token_advantages(batch):
    logp, old_logp, _ = batch
    mask = ragged_mask(LENGTHS, T)
    seq_adv = torch.tensor([0.5, -1.0, 2.0, -0.3, 1.2, 0.7], dtype=torch.float64)
    a, _ = clipped_policy_objective(logp, old_logp, seq_adv, mask, 0.2, 0.28, dual_clip=3.0)
    b, _ = clipped_policy_objective(logp, old_logp, broadcast_to_tokens(seq_adv, mask), mask, 0.2, 0.28, dual_clip=3.0)
    assert torch.equal(a, b)


def expected_token_grad(logp, old_logp, adv, lengths, clip_low, clip_high, dual_clip=None):
    """d loss_t / d logp_t by hand: -A * ratio where the unclipped term is the active one, else 0."""
    grads = []
    for b, n in enumerate(lengths):
        row = [0.0] * len(logp[b])
        for t in range(n):
            ratio = math.exp(logp[b][t] - old_logp[b][t])
            a = adv[b][t]
            unclipped, clipped = -a * ratio, -a * min(max(ratio, 1 - clip_low), 1 + clip_high)
            active = unclipped >= clipped
            if dual_clip is not None and a < 0 and max(unclipped, clipped) > -a * dual_clip:
                active = False
            row[t] = -a * ratio if active else 0.0
        grads.append(row)
    return grads


@pytest.mark.parametrize("config", CONFIGS[:4])
def test_token_ratio_gradient_is_the_hand_derived_one(batch, config):
    logp, old_logp, adv = batch
    mask = ragged_mask(LENGTHS, T)
    logp_d, old_d, adv_d = dirty(logp, old_logp, adv, mask)
    x = logp_d.clone().requires_grad_()
    losses, _ = clipped_policy_objective(x, old_d, adv_d, mask, **config)
    losses.sum().backward()
    expected = expected_token_grad(logp.tolist(), old_logp.tolist(), adv.tolist(), LENGTHS, **config)
    for b in range(len(LENGTHS)):
        assert x.grad[b].tolist() == pytest.approx(expected[b], abs=1e-12)


def test_aggregated_gradient_matches_finite_differences(batch):
    logp, old_logp, adv = batch
    mask = ragged_mask(LENGTHS, T)
    config = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0)

    def loss_of(x):
        return aggregate(clipped_policy_objective(x, old_logp, adv, mask, **config)[0], mask, "seq-mean-token-mean")

    x = logp.clone().requires_grad_()
    loss_of(x).backward()
    h = 1e-6
    for b, t in [(0, 0), (0, 1), (1, 0), (1, 3), (1, 5), (3, 2), (4, 0), (5, 4), (2, 0), (0, 5)]:
        plus, minus = logp.clone(), logp.clone()
        plus[b, t] += h
        minus[b, t] -= h
        fd = (float(loss_of(plus)) - float(loss_of(minus))) / (2 * h)
        assert float(x.grad[b, t]) == pytest.approx(fd, abs=1e-7), (b, t)


@pytest.mark.parametrize("ratio, advantage, loss, grad_flows", [
    (4.0, -1.0, 3.0, False),   # A < 0, ratio past c = 3: capped at -A * c, no gradient
    (2.5, -1.0, 2.5, True),    # A < 0, ratio under c: the ordinary (unclipped) term
    (0.5, -1.0, 0.8, False),   # A < 0, ratio under 1 - clip_low: ordinary low clip
    (4.0, 1.0, -1.28, False),  # A > 0: the dual clip never applies; clip-higher caps at 1.28
    (1.25, 1.0, -1.25, True),  # inside the clip-higher range
])
def test_dual_clip_and_clip_higher_cases(ratio, advantage, loss, grad_flows):
    old_logp = torch.tensor([[-1.0]], dtype=torch.float64)
    logp = (old_logp + math.log(ratio)).requires_grad_()
    adv = torch.tensor([[advantage]], dtype=torch.float64)
    losses, stats = clipped_policy_objective(logp, old_logp, adv, torch.ones(1, 1), 0.2, 0.28, dual_clip=3.0)
    losses.sum().backward()
    assert float(losses.detach()) == pytest.approx(loss)
    assert float(stats["dual_clipfrac"]) == (1.0 if (advantage < 0 and ratio > 3.0) else 0.0)
    assert float(logp.grad) == (pytest.approx(-advantage * ratio) if grad_flows else 0.0)


def test_gspo_ratio_is_the_sequence_ratio_with_the_sequence_gradient(batch):
    logp, old_logp, _ = batch
    mask = ragged_mask(LENGTHS, T)
    seq_adv = torch.tensor([-0.5, -1.0, 2.0, 0.3, 1.2, 0.7], dtype=torch.float64)  # s_i: .55 .91 - 1.39 .77 1.04
    clip = 0.2

    # GSPO-token, per-token losses, then GSPO's mean over sequences of token means
    x = logp.clone().requires_grad_()
    losses, stats = clipped_policy_objective(
        *dirty(x, old_logp, broadcast_to_tokens(seq_adv, mask), mask), mask, clip, clip, sequence_ratio=True
    )
    aggregate(losses, mask, "seq-mean-token-mean").backward()

    # GSPO written at the sequence level: s_i = exp(mean_t log ratio), loss_i = max(-A s, -A clip(s))
    y = logp.clone().requires_grad_()
    valid = mask.bool()
    log_ratio = torch.where(valid, y - old_logp, torch.zeros_like(y))
    lengths = torch.tensor(LENGTHS, dtype=torch.float64)
    s = torch.exp(log_ratio.sum(-1) / lengths.clamp(min=1))  # [B]
    seq_losses = torch.max(-seq_adv * s, -seq_adv * s.clamp(1 - clip, 1 + clip))
    nonempty = lengths > 0
    seq_losses[nonempty].mean().backward()

    assert torch.allclose(x.grad, y.grad, atol=1e-14, rtol=0)
    losses, seq_losses, s_list = losses.detach(), seq_losses.detach(), s.tolist()
    for b, n in enumerate(LENGTHS):
        for t in range(T):
            assert float(losses[b, t]) == pytest.approx(float(seq_losses[b]) if t < n else 0.0, abs=1e-12)
            # hand-derived: d/dlogp_t = -A_i * s_i / (n_i * rows), or 0 where the clip holds s_i
            a = float(seq_adv[b])
            clipped = (a > 0 and s_list[b] > 1 + clip) or (a < 0 and s_list[b] < 1 - clip)
            expected = -a * s_list[b] / (n * int(nonempty.sum())) if (t < n and not clipped) else 0.0
            assert float(x.grad[b, t]) == pytest.approx(expected, abs=1e-12)
    assert float(stats["clipfrac_low"]) == pytest.approx(2 / sum(LENGTHS))  # row 0, both of its tokens
    assert float(stats["clipfrac_high"]) == pytest.approx(3 / sum(LENGTHS))  # row 3, all three tokens


def test_garbage_never_reaches_the_gradient(batch):
    logp, old_logp, adv = batch
    mask = ragged_mask(LENGTHS, T)
    for config in CONFIGS:
        clean = logp.clone().requires_grad_()
        clipped_policy_objective(clean, old_logp, adv, mask, **config)[0].sum().backward()
        logp_d, old_d, adv_d = dirty(logp, old_logp, adv, mask)
        garbage = with_garbage(logp_d, mask, float("nan")).requires_grad_()
        clipped_policy_objective(garbage, old_d, adv_d, mask, **config)[0].sum().backward()
        assert torch.equal(clean.grad, garbage.grad), config
        assert (garbage.grad[mask == 0] == 0).all()


def test_bad_clip_settings_are_refused(batch):
    logp, old_logp, adv = batch
    mask = ragged_mask(LENGTHS, T)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        clipped_policy_objective(logp, old_logp, adv, mask, dual_clip=0.9)
    with pytest.raises(ValueError, match="clip_low"):
        clipped_policy_objective(logp, old_logp, adv, mask, clip_low=1.0)
    with pytest.raises(ValueError, match="clip_high"):
        clipped_policy_objective(logp, old_logp, adv, mask, clip_high=-0.1)
