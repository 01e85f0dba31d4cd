"""Per-group statistics against plain-Python loops over ragged, shuffled prompt groups."""

import math

import pytest
import torch

from quartet.rl import group_mean, group_sizes, group_std, groups_with_signal, zero_spread_fraction

# groups of sizes 4 (id 11), 3 (id 7), 2 (id 0) and 1 (id 2), ids neither contiguous nor sorted
GROUP_IDS = [11, 7, 0, 11, 2, 7, 11, 0, 7, 11]


def members(group_ids):
    """{id: [sample indices]} in first-seen order."""
    groups = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    return groups


def reference_mean_std(values, group_ids, unbiased=True):
    means, stds = [0.0] * len(values), [0.0] * len(values)
    for idx in members(group_ids).values():
        xs = [values[i] for i in idx]
        m = sum(xs) / len(xs)
        ss = sum((x - m) ** 2 for x in xs)
        divisor = max(len(xs) - 1, 1) if unbiased else len(xs)
        for i in idx:
            means[i], stds[i] = m, math.sqrt(ss / divisor)
    return means, stds


@pytest.fixture
def scores():
    g = torch.Generator().manual_seed(0)
    return torch.randn(len(GROUP_IDS), generator=g, dtype=torch.float64)


def test_group_sizes():
    sizes = group_sizes(torch.tensor(GROUP_IDS))
    assert sizes.tolist() == [4, 3, 2, 4, 1, 3, 4, 2, 3, 4]
    assert sizes.dtype == torch.int64


@pytest.mark.parametrize("unbiased", [True, False])
def test_group_mean_and_std_match_loop(scores, unbiased):
    ids = torch.tensor(GROUP_IDS)
    exp_mean, exp_std = reference_mean_std(scores.tolist(), GROUP_IDS, unbiased)
    assert group_mean(scores, ids).tolist() == pytest.approx(exp_mean, abs=1e-12)
    assert group_std(scores, ids, unbiased=unbiased).tolist() == pytest.approx(exp_std, abs=1e-12)


def test_group_std_agrees_with_torch_std_and_is_zero_for_a_group_of_one(scores):
    ids = torch.tensor(GROUP_IDS)
    std = group_std(scores, ids)
    for gid, idx in members(GROUP_IDS).items():
        expected = 0.0 if len(idx) == 1 else float(scores[idx].std())
        assert all(float(std[i]) == pytest.approx(expected, abs=1e-12) for i in idx), gid
    assert float(std[GROUP_IDS.index(2)]) == 0.0  # not nan, unlike torch.std of one value


def test_a_non_finite_score_stays_in_its_group(scores):
    ids = torch.tensor(GROUP_IDS)
    dirty = scores.clone()
    dirty[GROUP_IDS.index(7)] = float("nan")
    in_group = ids == 7
    for fn in (group_mean, group_std):
        clean_out, dirty_out = fn(scores, ids), fn(dirty, ids)
        assert torch.equal(clean_out[~in_group], dirty_out[~in_group])
        assert dirty_out[in_group].isnan().all()


def test_groups_with_signal_and_zero_spread_fraction():
    ids = torch.tensor(GROUP_IDS)
    # group 11 varies, group 7 is all 1.0, group 0 differs by 1e-3, group 2 is alone
    by_group = {11: [0.0, 1.0, 1.0, 1.0], 7: [1.0, 1.0, 1.0], 0: [0.5, 0.501], 2: [3.0]}
    seen = {g: 0 for g in by_group}
    values = []
    for g in GROUP_IDS:
        values.append(by_group[g][seen[g]])
        seen[g] += 1
    scores = torch.tensor(values, dtype=torch.float64)

    keep = groups_with_signal(scores, ids)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [g in (11, 0) for g in GROUP_IDS]
    assert zero_spread_fraction(scores, ids) == 2 / 4  # groups 7 and 2, of 4 GROUPS (not 4 of 10 samples)

    loose = groups_with_signal(scores, ids, atol=1e-2)
    assert loose.tolist() == [g == 11 for g in GROUP_IDS]
    assert zero_spread_fraction(scores, ids, atol=1e-2) == 3 / 4
    assert isinstance(zero_spread_fraction(scores, ids), float)


def test_groups_with_signal_matches_loop_on_random_binary_scores():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 40, (300,), generator=g) * 3 + 5  # many ragged groups, sparse ids
    scores = torch.randint(0, 2, (300,), generator=g).to(torch.float32)  # pass / fail verifier scores
    groups = members(ids.tolist())
    flat = {gid: len(set(scores[idx].tolist())) == 1 for gid, idx in groups.items()}
    assert groups_with_signal(scores, ids).tolist() == [not flat[gid] for gid in ids.tolist()]
    assert zero_spread_fraction(scores, ids) == pytest.approx(sum(flat.values()) / len(groups))
    assert zero_spread_fraction(torch.zeros(0), torch.zeros(0, dtype=torch.int64)) == 0.0


def test_shape_mismatch_and_float_ids_are_refused(scores):
    with pytest.raises(ValueError, match="one value per sample"):
        group_mean(scores[:-1], torch.tensor(GROUP_IDS))
    with pytest.raises(ValueError, match="integers"):
        group_std(scores, torch.tensor(GROUP_IDS, dtype=torch.float32))
