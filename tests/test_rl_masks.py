"""quartet.rl.masks against plain-Python loops, on ragged masks with garbage at masked positions."""

import pytest
import torch

from quartet.rl import last_valid_index, masked_mean, masked_sum, masked_var, response_mask

LENGTHS = [1, 6, 3, 4]  # one row with a single valid token, one fully valid
T = 6


def ragged_mask(lengths=LENGTHS, T=T):
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths])


def with_garbage(x, mask, value=1e6):
    return torch.where(mask.bool(), x, torch.full_like(x, value))


def valid_values(x, mask):
    return [[float(x[b, t]) for t in range(x.shape[1]) if mask[b, t] > 0] for b in range(x.shape[0])]


@pytest.fixture
def x():
    return torch.randn(len(LENGTHS), T, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_masked_sum_and_mean_match_loops(x):
    mask = ragged_mask()
    rows = valid_values(x, mask)
    flat = [v for row in rows for v in row]
    assert float(masked_sum(x, mask)) == pytest.approx(sum(flat))
    assert float(masked_mean(x, mask)) == pytest.approx(sum(flat) / len(flat))
    assert masked_sum(x, mask, dim=1).tolist() == pytest.approx([sum(r) for r in rows])
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([sum(r) / len(r) for r in rows])
    # the batch mean is token-weighted, not a mean of row means
    assert float(masked_mean(x, mask)) != pytest.approx(sum(sum(r) / len(r) for r in rows) / len(rows))


def test_masked_reductions_ignore_garbage(x):
    mask = ragged_mask()
    for garbage in (1e6, float("inf"), float("nan")):
        g = with_garbage(x, mask, garbage)
        assert torch.allclose(masked_sum(g, mask), masked_sum(x, mask))
        assert torch.allclose(masked_mean(g, mask, dim=1), masked_mean(x, mask, dim=1))
        assert torch.allclose(masked_var(g, mask), masked_var(x, mask))
    bool_mask = mask.bool()  # a bool mask works the same as a float one
    assert torch.allclose(masked_mean(with_garbage(x, mask), bool_mask), masked_mean(x, mask))


def test_masked_mean_of_empty_row_is_zero(x):
    mask = ragged_mask([0, 2, 6, 1])
    means = masked_mean(with_garbage(x, mask), mask, dim=1)
    assert means[0] == 0 and torch.isfinite(means).all()
    assert float(means[1]) == pytest.approx((float(x[1, 0]) + float(x[1, 1])) / 2)
    assert float(masked_mean(x, torch.zeros_like(mask))) == 0.0


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_loop(x, unbiased):
    mask = ragged_mask()
    flat = [v for row in valid_values(x, mask) for v in row]
    n = len(flat)
    mean = sum(flat) / n
    ss = sum((v - mean) ** 2 for v in flat)
    expected = ss / (n - 1) if unbiased else ss / n
    assert float(masked_var(with_garbage(x, mask), mask, unbiased=unbiased)) == pytest.approx(expected)


def test_masked_var_degenerate_counts(x):
    one = ragged_mask([1, 0, 0, 0])
    assert float(masked_var(x, one, unbiased=True)) == 0.0
    assert float(masked_var(x, one, unbiased=False)) == 0.0
    assert float(masked_var(x, torch.zeros_like(one))) == 0.0


def reference_response_mask(ids, eos_ids):
    out = []
    for row in ids:
        seen_eos, m = False, []
        for tok in row:
            m.append(0.0 if seen_eos else 1.0)
            if tok in eos_ids:
                seen_eos = True
        out.append(m)
    return out


def test_response_mask_matches_loop():
    eos = 2
    ids = [
        [2, 5, 6, 2, 0, 0],  # EOS first: only that token is valid
        [5, 6, 7, 8, 9, 4],  # no EOS: all valid
        [5, 6, 2, 2, 2, 2],  # EOS repeated as padding
        [5, 6, 7, 8, 9, 2],  # EOS at the very end
    ]
    mask = response_mask(torch.tensor(ids), eos)
    assert mask.dtype == torch.float32
    assert mask.tolist() == reference_response_mask(ids, {eos})
    assert mask.tolist()[0] == [1, 0, 0, 0, 0, 0] and mask.tolist()[2] == [1, 1, 1, 0, 0, 0]


def test_response_mask_random_and_several_eos_ids():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 6, (8, 7), generator=g)
    assert response_mask(ids, 3).tolist() == reference_response_mask(ids.tolist(), {3})
    assert response_mask(ids, [3, 5]).tolist() == reference_response_mask(ids.tolist(), {3, 5})
    assert response_mask(ids, 3, dtype=torch.bool).dtype == torch.bool


def test_last_valid_index():
    mask = ragged_mask([1, 6, 3, 0, 4])
    expected = []
    for row in mask.tolist():
        last = -1
        for t, m in enumerate(row):
            if m > 0:
                last = t
        expected.append(last)
    idx = last_valid_index(mask)
    assert idx.dtype == torch.long
    assert idx.tolist() == expected == [0, 5, 2, -1, 3]
    assert last_valid_index(mask.bool()).tolist() == expected
