"""The DPO family (sigmoid/cDPO, IPO, hinge, robust), sequence log-probs, the RPO NLL term and
the rewards/* metrics, against plain Python."""

import math

import pytest
import torch

from quartet.rl.dpo import (
    DPO_LOSS_TYPES,
    chosen_nll_loss,
    dpo_loss,
    preference_metric_sums,
    preference_metrics,
    preference_metrics_from_sums,
    sequence_logps,
)
from rl_helpers import LENGTHS, T, ragged_mask, with_garbage

# four pairs of sequence log-probs: policy_chosen, policy_rejected, ref_chosen, ref_rejected
PAIRS = [
    (-12.0, -15.0, -13.0, -14.0),  # h = 1 - (-1) = 2: policy already prefers chosen more than ref
    (-8.0, -7.5, -8.5, -9.0),      # h = 0.5 - 1.5 = -1: policy moved toward the rejected answer
    (-20.0, -20.0, -20.0, -20.0),  # h = 0: policy equals reference
    (-3.0, -30.0, -10.0, -12.0),   # h = 7 - (-18) = 25: far past every margin
]


def tensors(pairs=PAIRS, requires_grad=False):
    cols = [torch.tensor(col, dtype=torch.float64) for col in zip(*pairs)]
    if requires_grad:
        cols[0].requires_grad_()
    return cols


def log_sigmoid(x):
    return -math.log(1 + math.exp(-x))


def reference_loss(pc, pr, rc, rr, beta, loss_type, eps):
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1 - beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps)
    raise AssertionError(loss_type)


CASES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.0), ("robust", 0.2)]


@pytest.mark.parametrize("loss_type, eps", CASES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_every_loss_type_matches_plain_python(loss_type, eps, beta):
    losses, chosen_rewards, rejected_rewards = dpo_loss(*tensors(), beta=beta, loss_type=loss_type, label_smoothing=eps)
    assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == (len(PAIRS),)
    for i, (pc, pr, rc, rr) in enumerate(PAIRS):
        assert float(losses[i]) == pytest.approx(reference_loss(pc, pr, rc, rr, beta, loss_type, eps), rel=1e-12, abs=1e-12)
        assert float(chosen_rewards[i]) == pytest.approx(beta * (pc - rc), rel=1e-12, abs=1e-12)
        assert float(rejected_rewards[i]) == pytest.approx(beta * (pr - rr), rel=1e-12, abs=1e-12)


def test_loss_types_are_the_documented_four():
    assert DPO_LOSS_TYPES == ("sigmoid", "ipo", "hinge", "robust")


def test_sigmoid_by_hand_and_smoothing_zero_is_plain_dpo():
    # one pair with h = 2, beta = 0.5: beta * h = 1
    args = [torch.tensor([x], dtype=torch.float64) for x in (-12.0, -15.0, -13.0, -14.0)]
    plain = math.log(1 + math.exp(-1))  # -log sigmoid(1)
    assert float(dpo_loss(*args, beta=0.5)[0]) == pytest.approx(plain, rel=1e-12)
    assert float(dpo_loss(*args, beta=0.5, label_smoothing=0.0)[0]) == pytest.approx(plain, rel=1e-12)
    assert torch.equal(dpo_loss(*tensors(), beta=0.5, label_smoothing=0.0)[0], dpo_loss(*tensors(), beta=0.5)[0])
    # robust with eps = 0 is plain DPO too
    assert torch.allclose(dpo_loss(*tensors(), beta=0.5, loss_type="robust")[0], dpo_loss(*tensors(), beta=0.5)[0],
                          rtol=1e-14, atol=0)


def test_cdpo_and_robust_by_hand():
    args = [torch.tensor([x], dtype=torch.float64) for x in (-12.0, -15.0, -13.0, -14.0)]  # beta * h = 1
    eps = 0.2
    win, lose = math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))  # -log sigmoid(1), -log sigmoid(-1)
    cdpo = 0.8 * win + 0.2 * lose
    robust = (0.8 * win - 0.2 * lose) / 0.6
    assert float(dpo_loss(*args, beta=0.5, label_smoothing=eps)[0]) == pytest.approx(cdpo, rel=1e-12)
    assert float(dpo_loss(*args, beta=0.5, loss_type="robust", label_smoothing=eps)[0]) == pytest.approx(robust, rel=1e-12)
    assert cdpo > win  # cDPO charges for being sure of a label that may be flipped
    # rDPO can be negative once the pair is confidently right (the flipped term is subtracted)
    far = [torch.tensor([x], dtype=torch.float64) for x in (0.0, -40.0, 0.0, 0.0)]  # beta * h = 20
    assert float(dpo_loss(*far, beta=0.5, loss_type="robust", label_smoothing=eps)[0]) < 0


@pytest.mark.parametrize("loss_type, eps", CASES)
def test_raising_the_chosen_logprob_lowers_the_loss(loss_type, eps):
    # h = 0 (policy equals reference): every loss wants the chosen answer more likely
    pc, pr, rc, rr = [torch.tensor([-5.0], dtype=torch.float64) for _ in range(4)]
    pc.requires_grad_()
    pr.requires_grad_()
    beta = 0.1
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    losses.sum().backward()
    assert float(pc.grad) < 0 and float(pr.grad) > 0
    assert float(pc.grad) == pytest.approx(-float(pr.grad))  # only the difference h matters
    expected_grad = {  # d loss / d h at h = 0
        "sigmoid": -beta * ((1 - eps) * 0.5 - eps * 0.5),
        "ipo": 2 * (0 - 1 / (2 * beta)),
        "hinge": -beta,
        "robust": -beta * 0.5 / (1 - 2 * eps),
    }[loss_type]
    assert float(pc.grad) == pytest.approx(expected_grad, rel=1e-12)
    with torch.no_grad():
        raised, _, _ = dpo_loss(pc + 0.5, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    assert float(raised) < float(losses.detach())


def test_past_the_target_margin_hinge_stops_and_ipo_pulls_back():
    beta = 0.5  # hinge margin: beta * h = 1 at h = 2; IPO target: h = 1 / (2 beta) = 1
    pc = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)  # h = 3
    zero = torch.zeros(1, dtype=torch.float64)
    dpo_loss(pc, zero, zero, zero, beta=beta, loss_type="hinge")[0].sum().backward()
    assert float(pc.grad) == 0.0
    pc.grad = None
    dpo_loss(pc, zero, zero, zero, beta=beta, loss_type="ipo")[0].sum().backward()
    assert float(pc.grad) == pytest.approx(2 * (3 - 1))  # IPO regularises: it pushes h back to 1


def test_implicit_rewards_are_detached():
    pc, pr, rc, rr = tensors()
    pc.requires_grad_()
    pr.requires_grad_()
    for loss_type in DPO_LOSS_TYPES:
        losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, loss_type=loss_type)
        assert losses.requires_grad
        assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
        assert chosen_rewards.grad_fn is None and rejected_rewards.grad_fn is None


def left_padded(x, lengths=LENGTHS, T=T):
    """Row b of `x` right-aligned: its first lengths[b] entries moved to the end."""
    out = torch.zeros_like(x)
    for b, n in enumerate(lengths):
        out[b, T - n:] = x[b, :n]
    return out


def left_mask(lengths=LENGTHS, T=T):
    return torch.tensor([[1.0 if t >= T - n else 0.0 for t in range(T)] for n in lengths])


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_right_and_left_padding_with_garbage(average):
    g = torch.Generator().manual_seed(0)
    lengths = LENGTHS + [0]  # a row with no valid token gives 0
    logp = -3 * torch.rand((len(lengths), T), generator=g, dtype=torch.float64)
    expected = []
    for b, n in enumerate(lengths):
        total = sum(float(logp[b, t]) for t in range(n))
        expected.append((total / n if n else 0.0) if average else total)

    right_mask = ragged_mask(lengths)
    right = sequence_logps(with_garbage(logp, right_mask, float("nan")), right_mask, average=average)
    lmask = left_mask(lengths)
    left = sequence_logps(with_garbage(left_padded(logp, lengths), lmask, -float("inf")), lmask, average=average)
    assert right.shape == left.shape == (len(lengths),)
    for b in range(len(lengths)):
        assert float(right[b]) == pytest.approx(expected[b], rel=1e-12, abs=1e-12)
        assert float(left[b]) == pytest.approx(expected[b], rel=1e-12, abs=1e-12)
    assert float(right[-1]) == 0.0 and float(left[-1]) == 0.0


def test_sequence_logps_garbage_does_not_reach_gradient():
    mask = left_mask()
    logp = with_garbage(-torch.rand(len(LENGTHS), T, dtype=torch.float64), mask, float("nan")).requires_grad_()
    sequence_logps(logp, mask).sum().backward()
    assert torch.equal(logp.grad, mask.to(torch.float64))  # 1 on valid tokens, exactly 0 (not nan) elsewhere


def test_sequence_logps_feed_dpo_loss():
    # the intended composition: token log-probs -> sequence log-probs -> per-pair loss
    mask = ragged_mask()
    pol_c, pol_r, ref_c, ref_r = (-torch.rand(len(LENGTHS), T, dtype=torch.float64) for _ in range(4))
    seqs = [sequence_logps(with_garbage(x, mask), mask) for x in (pol_c, pol_r, ref_c, ref_r)]
    losses, _, _ = dpo_loss(*seqs, beta=0.1)
    for b, n in enumerate(LENGTHS):
        s = [sum(float(x[b, t]) for t in range(n)) for x in (pol_c, pol_r, ref_c, ref_r)]
        assert float(losses[b]) == pytest.approx(reference_loss(*s, 0.1, "sigmoid", 0.0), rel=1e-12)


def test_chosen_nll_is_a_token_mean_over_the_batch():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-4.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    nll = chosen_nll_loss(with_garbage(logp, mask, float("nan")), mask)
    assert nll.dim() == 0
    assert float(nll) == pytest.approx((1.0 + 2.0 + 4.0) / 3, rel=1e-12)  # not the mean of per-row means (2.75)
    assert float(-sequence_logps(logp, mask, average=True).mean()) == pytest.approx((1.5 + 4.0) / 2)  # paper's variant
    assert float(chosen_nll_loss(logp, torch.zeros_like(mask))) == 0.0

    grad_in = with_garbage(logp, mask, float("inf")).requires_grad_()
    chosen_nll_loss(grad_in, mask).backward()
    assert torch.equal(grad_in.grad, -mask.to(torch.float64) / 3)


def test_preference_metrics_by_hand():
    chosen = torch.tensor([0.3, -0.1, 0.2, 0.0], requires_grad=True)
    rejected = torch.tensor([0.1, 0.2, 0.2, -0.4])
    metrics = preference_metrics(chosen, rejected)
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["rewards/chosen"] == pytest.approx(0.4 / 4)
    assert metrics["rewards/rejected"] == pytest.approx(0.1 / 4)
    assert metrics["rewards/margins"] == pytest.approx((0.2 - 0.3 + 0.0 + 0.4) / 4)
    assert metrics["rewards/accuracies"] == 0.625  # pairs 0 and 3 win; the tie (pair 2) counts half


def test_accuracy_counts_ties_as_half_like_a_plain_loop_over_ragged_micro_batches():
    chosen = [0.5, 0.0, -0.25, 0.0, 1.0, 0.125, -2.0]
    rejected = [0.25, 0.0, 0.75, 0.0, 1.0, -0.5, 3.0]  # pairs 1, 3 and 4 tie
    expected = 0.0
    for c, r in zip(chosen, rejected):  # the plain-Python reference: win 1, tie 1/2, loss 0
        expected += 1.0 if c > r else 0.5 if c == r else 0.0
    assert expected == 3.5
    c, r = torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)
    parts = [preference_metric_sums(c[a:b], r[a:b]) for a, b in ((0, 3), (3, 4), (4, 7))]
    merged = preference_metrics_from_sums({k: sum(p[k] for p in parts) for k in parts[0]})
    assert merged["rewards/accuracies"] == expected / len(chosen)
    assert preference_metrics(torch.zeros(5), torch.zeros(5))["rewards/accuracies"] == 0.5  # step 0: all ties


def test_preference_metric_sums_aggregate_uneven_micro_batches_exactly():
    g = torch.Generator().manual_seed(3)
    chosen = torch.randn(7, generator=g, dtype=torch.float64)
    rejected = torch.randn(7, generator=g, dtype=torch.float64)
    parts = [preference_metric_sums(chosen[:4], rejected[:4]), preference_metric_sums(chosen[4:], rejected[4:])]
    assert parts[0]["count"] == 4.0 and parts[1]["count"] == 3.0
    total = {k: parts[0][k] + parts[1][k] for k in parts[0]}
    merged = preference_metrics_from_sums(total)
    full = preference_metrics(chosen, rejected)
    assert set(merged) == set(full)
    for k in full:
        assert merged[k] == pytest.approx(full[k], rel=1e-12, abs=1e-15)
    mean_of_means = (preference_metrics(chosen[:4], rejected[:4])["rewards/chosen"]
                     + preference_metrics(chosen[4:], rejected[4:])["rewards/chosen"]) / 2
    assert mean_of_means != pytest.approx(full["rewards/chosen"])  # why the sums exist


def test_unknown_loss_type_names_the_valid_ones():
    with pytest.raises(ValueError, match="'simpo'") as err:
        dpo_loss(*tensors(), loss_type="simpo")
    for name in DPO_LOSS_TYPES:
        assert name in str(err.value)


@pytest.mark.parametrize("eps", [-0.1, 0.5, 0.7, float("nan")])
@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
def test_label_smoothing_outside_range(loss_type, eps):
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        dpo_loss(*tensors(), loss_type=loss_type, label_smoothing=eps)


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_label_smoothing_is_refused_where_undefined(loss_type):
    with pytest.raises(ValueError, match=f"not defined for loss_type '{loss_type}'.*sigmoid or robust"):
        dpo_loss(*tensors(), loss_type=loss_type, label_smoothing=0.1)
    dpo_loss(*tensors(), loss_type=loss_type, label_smoothing=0.0)  # 0 is fine


@pytest.mark.parametrize("beta", [0.0, -0.1, float("inf"), float("nan")])
def test_beta_must_be_positive(beta):
    with pytest.raises(ValueError, match="beta must be"):
        dpo_loss(*tensors(), beta=beta)


def test_shape_errors():
    pc, pr, rc, rr = tensors()
    with pytest.raises(ValueError, match=r"ref_rejected=\(4, 1\)"):
        dpo_loss(pc, pr, rc, rr[:, None])  # would broadcast to [4, 4]
    with pytest.raises(ValueError, match="same \\[batch, T\\] shape"):
        sequence_logps(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="same \\[batch, T\\] shape"):
        chosen_nll_loss(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="one shape"):
        preference_metrics(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="at least one pair"):
        preference_metrics(torch.zeros(0), torch.zeros(0))
