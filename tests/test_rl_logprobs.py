"""token_logprobs / entropy_from_logits against log_softmax and plain-Python math."""

import math

import pytest
import torch
import torch.nn.functional as F

from quartet.rl import entropy_from_logits, token_logprobs, token_logprobs_and_entropy, token_logprobs_inplace

B, T, V = 3, 5, 11


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(B, T, V, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    return logits, tokens


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_token_logprobs_equals_log_softmax_gather(batch, temperature):
    logits, tokens = batch
    expected = F.log_softmax(logits / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    got = token_logprobs(logits, tokens, temperature=temperature)
    assert got.shape == (B, T)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_token_logprobs_plain_python(batch, temperature):
    logits, tokens = batch
    got = token_logprobs(logits, tokens, temperature).tolist()
    for b in range(B):
        for t in range(T):
            z = [v / temperature for v in logits[b, t].tolist()]
            log_z = math.log(sum(math.exp(v) for v in z))
            assert got[b][t] == pytest.approx(z[tokens[b, t]] - log_z, abs=1e-5)


def test_token_logprobs_gradient_matches_log_softmax(batch):
    logits, tokens = batch
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    weights = torch.randn(B, T, generator=torch.Generator().manual_seed(3))
    (token_logprobs(a, tokens, 0.8) * weights).sum().backward()
    (F.log_softmax(b / 0.8, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * weights).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_token_logprobs_half_precision_computed_in_float32(batch):
    logits, tokens = batch
    low = logits.to(torch.bfloat16)
    got = token_logprobs(low, tokens, 0.7)
    assert got.dtype == torch.float32
    expected = F.log_softmax(low.float() / 0.7, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_entropy_plain_python(batch, temperature):
    logits, _ = batch
    got = entropy_from_logits(logits, temperature)
    assert got.shape == (B, T)
    for b in range(B):
        for t in range(T):
            z = [v / temperature for v in logits[b, t].tolist()]
            total = sum(math.exp(v) for v in z)
            probs = [math.exp(v) / total for v in z]
            assert float(got[b, t]) == pytest.approx(-sum(p * math.log(p) for p in probs), abs=1e-5)


def test_entropy_in_place_equals_the_plain_formula_and_stays_differentiable(batch):
    logits, _ = batch
    logp = torch.log_softmax(logits / 0.7, dim=-1)
    assert torch.equal(entropy_from_logits(logits, 0.7), -(logp.exp() * logp).sum(-1))  # bit for bit
    leaf = logits.clone().requires_grad_()
    entropy_from_logits(leaf, 0.7).sum().backward()  # the product is not written over exp's saved output
    assert torch.isfinite(leaf.grad).all()


def test_entropy_bounds():
    uniform = torch.zeros(1, 1, V)
    assert float(entropy_from_logits(uniform)) == pytest.approx(math.log(V), abs=1e-6)
    peaked = torch.zeros(1, 1, V)
    peaked[..., 0] = 100.0
    assert float(entropy_from_logits(peaked)) == pytest.approx(0.0, abs=1e-6)


def test_bad_temperature(batch):
    logits, tokens = batch
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, tokens, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        entropy_from_logits(logits, -1.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_entropy_in_one_pass_equal_the_separate_functions(batch, temperature, dtype):
    logits, tokens = batch
    logits = logits.to(dtype).requires_grad_()
    logprobs, entropy = token_logprobs_and_entropy(logits, tokens, temperature)
    expected = token_logprobs(logits, tokens, temperature)
    assert torch.equal(logprobs, expected)  # the same operations: identical, gradient included
    expected_entropy = entropy_from_logits(logits.detach(), temperature)
    if dtype == torch.float32:  # read off the same log-softmax: identical
        assert torch.equal(entropy, expected_entropy)
    else:
        torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=1e-5)
    assert not entropy.requires_grad
    (g1,) = torch.autograd.grad(logprobs.sum(), logits)
    (g2,) = torch.autograd.grad(expected.sum(), logits)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_inplace_logprobs_equal_token_logprobs_bit_for_bit(batch, temperature):
    logits, tokens = batch
    expected = token_logprobs(logits, tokens, temperature)
    scratch = logits.clone()
    got = token_logprobs_inplace(scratch, tokens, temperature)
    assert torch.equal(got, expected)
    # the logits were overwritten by the log-softmax (that is where the memory saving comes from)
    assert torch.equal(scratch, F.log_softmax(logits / temperature, dim=-1))


def test_inplace_logprobs_half_precision_leaves_logits_alone(batch):
    logits, tokens = batch
    low = logits.to(torch.bfloat16)
    before = low.clone()
    got = token_logprobs_inplace(low, tokens, 0.7)
    assert got.dtype == torch.float32 and torch.equal(got, token_logprobs(before, tokens, 0.7))
    assert torch.equal(low, before)


def test_inplace_logprobs_refuse_logits_that_need_gradients(batch):
    logits, tokens = batch
    with pytest.raises(RuntimeError, match="token_logprobs where gradients flow"):
        token_logprobs_inplace(logits.clone().requires_grad_(), tokens, 0.7)
