"""Loss aggregation modes against plain Python, and the micro-batch accumulation contract."""

import itertools

import pytest
import torch

from quartet.rl import LOSS_AGGREGATIONS, aggregate, loss_units, masked_mean
from rl_helpers import ragged_mask, with_garbage

LENGTHS = [3, 0, 6, 1, 0, 4, 6, 2]  # ragged, with empty (padding) rows and full rows
T = 6
MAX_NEW_TOKENS = 8


@pytest.fixture
def per_token():
    g = torch.Generator().manual_seed(0)
    return torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64)


def reference_aggregate(x, lengths, mode, max_new_tokens=None):
    if mode == "token-mean":
        tokens = [x[b][t] for b, n in enumerate(lengths) for t in range(n)]
        return sum(tokens) / len(tokens) if tokens else 0.0
    rows = []
    for b, n in enumerate(lengths):
        if n == 0:
            continue  # a row with no valid token is not a unit
        row_sum = sum(x[b][t] for t in range(n))
        rows.append(row_sum / n if mode == "seq-mean-token-mean" else row_sum / max_new_tokens)
    return sum(rows) / len(rows) if rows else 0.0


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_aggregate_matches_loop_and_ignores_garbage(per_token, mode):
    mask = ragged_mask(LENGTHS, T)
    expected = reference_aggregate(per_token.tolist(), LENGTHS, mode, MAX_NEW_TOKENS)
    got = aggregate(per_token, mask, mode, max_new_tokens=MAX_NEW_TOKENS)
    assert got.dim() == 0
    assert float(got) == pytest.approx(expected, abs=1e-12)
    for garbage in (1e6, float("nan")):
        assert torch.equal(aggregate(with_garbage(per_token, mask, garbage), mask, mode, MAX_NEW_TOKENS), got)


def test_token_mean_is_masked_mean_exactly(per_token):
    mask = ragged_mask(LENGTHS, T)
    x = per_token.clone().requires_grad_()
    y = per_token.clone().requires_grad_()
    a, b = aggregate(x, mask, "token-mean"), masked_mean(y, mask)
    a.backward()
    b.backward()
    assert torch.equal(a, b) and torch.equal(x.grad, y.grad)


def test_modes_weigh_tokens_differently():
    # row 0: one token of loss 1; row 1: three tokens of loss 0
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = ragged_mask([1, 3], 3)
    assert float(aggregate(x, mask, "token-mean")) == pytest.approx(1 / 4)
    assert float(aggregate(x, mask, "seq-mean-token-mean")) == pytest.approx((1 / 1 + 0) / 2)  # short rows weigh more
    assert float(aggregate(x, mask, "seq-mean-token-sum-norm", max_new_tokens=3)) == pytest.approx((1 / 3 + 0) / 2)


def test_loss_units():
    mask = ragged_mask(LENGTHS, T)
    assert int(loss_units(mask, "token-mean")) == sum(LENGTHS)
    assert int(loss_units(mask, "seq-mean-token-mean")) == int(loss_units(mask, "seq-mean-token-sum-norm")) == 6
    assert loss_units(mask, "token-mean").dim() == 0
    empty = ragged_mask([0, 0], T)
    for mode in LOSS_AGGREGATIONS:
        assert int(loss_units(empty, mode)) == 0
        assert float(aggregate(torch.full((2, T), float("nan")), empty, mode, MAX_NEW_TOKENS)) == 0.0


def splits(n_rows):
    """Partitions of the rows into micro-batches: contiguous chunks, interleaved, singletons, all-in-one."""
    rows = list(range(n_rows))
    yield [rows]
    yield [[r] for r in rows]
    for size in (2, 3, 5):
        yield [rows[i:i + size] for i in range(0, n_rows, size)]
    yield [rows[0::2], rows[1::2]]
    yield [[1, 4], [0, 2, 3, 5, 6, 7]]  # a micro-batch of only empty rows
    g = torch.Generator().manual_seed(5)
    perm = torch.randperm(n_rows, generator=g).tolist()
    yield [perm[:3], perm[3:4], perm[4:]]


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_micro_batches_weighted_by_units_reproduce_the_whole(per_token, mode):
    mask = ragged_mask(LENGTHS, T)
    dirty = with_garbage(per_token, mask, float("nan"))
    whole = aggregate(dirty, mask, mode, MAX_NEW_TOKENS)
    whole_units = loss_units(mask, mode)
    for parts in splits(len(LENGTHS)):
        assert sorted(itertools.chain(*parts)) == list(range(len(LENGTHS)))
        total = sum(
            aggregate(dirty[rows], mask[rows], mode, MAX_NEW_TOKENS) * loss_units(mask[rows], mode) / whole_units
            for rows in parts
        )
        assert float(total) == pytest.approx(float(whole), abs=1e-12), parts


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_accumulated_gradient_equals_whole_batch_gradient(per_token, mode):
    mask = ragged_mask(LENGTHS, T)
    x_whole = per_token.clone().requires_grad_()
    aggregate(x_whole, mask, mode, MAX_NEW_TOKENS).backward()
    x_micro = per_token.clone().requires_grad_()
    whole_units = loss_units(mask, mode)
    for rows in ([0, 1, 2], [3, 4], [5, 6, 7]):
        micro = aggregate(x_micro[rows], mask[rows], mode, MAX_NEW_TOKENS)
        (micro * loss_units(mask[rows], mode) / whole_units).backward()
    assert torch.allclose(x_micro.grad, x_whole.grad, atol=1e-15, rtol=0)
    assert (x_whole.grad[mask == 0] == 0).all()


def test_bad_mode_and_missing_max_new_tokens_are_refused(per_token):
    mask = ragged_mask(LENGTHS, T)
    with pytest.raises(ValueError, match="valid: token-mean, seq-mean-token-mean, seq-mean-token-sum-norm"):
        aggregate(per_token, mask, "sum")
    with pytest.raises(ValueError, match="valid: token-mean"):
        loss_units(mask, "seq-sum")
    with pytest.raises(ValueError, match="max_new_tokens"):
        aggregate(per_token, mask, "seq-mean-token-sum-norm")
