"""KL estimators k1/k2/k3 and sequence_kl against the formulas in plain Python."""

import math

import pytest
import torch

from quartet.rl import kl_estimate, sequence_kl
from rl_helpers import LENGTHS, T, ragged_mask, with_garbage

FORMULAS = {
    "k1": lambda lp, ref: lp - ref,
    "k2": lambda lp, ref: 0.5 * (lp - ref) ** 2,
    "k3": lambda lp, ref: math.exp(ref - lp) - 1 - (ref - lp),
}


@pytest.fixture
def logps():
    g = torch.Generator().manual_seed(0)
    logp = -2 * torch.rand(len(LENGTHS), T, generator=g, dtype=torch.float64)
    ref_logp = -2 * torch.rand(len(LENGTHS), T, generator=g, dtype=torch.float64)
    return logp, ref_logp


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_estimators_match_formulas(logps, estimator):
    logp, ref_logp = logps
    got = kl_estimate(logp, ref_logp, estimator)
    for b in range(logp.shape[0]):
        for t in range(T):
            expected = FORMULAS[estimator](float(logp[b, t]), float(ref_logp[b, t]))
            assert float(got[b, t]) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_default_is_k1_and_k2_k3_nonnegative(logps):
    logp, ref_logp = logps
    assert torch.equal(kl_estimate(logp, ref_logp), logp - ref_logp)
    assert (kl_estimate(logp, ref_logp) < 0).any()  # k1 can be negative ...
    assert (kl_estimate(logp, ref_logp, "k2") >= 0).all()
    wide = torch.linspace(-20, 20, 401, dtype=torch.float64)
    assert (kl_estimate(wide, torch.zeros_like(wide), "k3") >= 0).all()  # ... k3 never is
    assert (kl_estimate(logp, ref_logp, "k3") >= 0).all()
    assert float(kl_estimate(torch.tensor(-1.3), torch.tensor(-1.3), "k3")) == 0.0


def test_k1_k3_unbiased_on_average():
    # KL(p || q) for two categoricals, estimated by sampling from p
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, ref_logp = p.log()[samples], q.log()[samples]
    for estimator in ("k1", "k3"):
        assert float(kl_estimate(logp, ref_logp, estimator).mean()) == pytest.approx(exact, abs=0.01)


def test_unknown_estimator_names_valid_ones(logps):
    logp, ref_logp = logps
    with pytest.raises(ValueError, match="k4") as err:
        kl_estimate(logp, ref_logp, "k4")
    assert all(name in str(err.value) for name in ("k1", "k2", "k3"))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_masked_estimate_and_sequence_kl(logps, estimator):
    logp, ref_logp = logps
    mask = ragged_mask()
    for garbage in (float("inf"), float("nan")):
        per_token = kl_estimate(with_garbage(logp, mask, garbage), ref_logp, estimator, mask=mask)
        assert torch.isfinite(per_token).all()
        assert (per_token[mask == 0] == 0).all()
    garbage_logp = with_garbage(logp, mask, 1e6)
    seq = sequence_kl(garbage_logp, ref_logp, mask, estimator=estimator)
    assert seq.shape == (len(LENGTHS),)
    for b, n in enumerate(LENGTHS):
        expected = sum(FORMULAS[estimator](float(logp[b, t]), float(ref_logp[b, t])) for t in range(n))
        assert float(seq[b]) == pytest.approx(expected, rel=1e-9)


def test_sequence_kl_defaults_to_k1(logps):
    logp, ref_logp = logps
    mask = ragged_mask()
    expected = [sum(float(logp[b, t] - ref_logp[b, t]) for t in range(n)) for b, n in enumerate(LENGTHS)]
    assert sequence_kl(logp, with_garbage(ref_logp, mask), mask).tolist() == pytest.approx(expected)


def test_masked_k3_gradient_has_no_nan():
    mask = ragged_mask()
    logp = with_garbage(torch.zeros(len(LENGTHS), T), mask, -1e6).requires_grad_()
    sequence_kl(logp, torch.zeros(len(LENGTHS), T), mask, estimator="k3").sum().backward()
    assert torch.isfinite(logp.grad).all()
