"""Multi-turn action masks (1s with holes of observation / template tokens between turns) through every
rl/ function that reads a mask: each against a plain-Python loop over the action tokens alone, on random
ragged batches (holes at the start, middle and end, rows with no action token), with garbage on the
holes; and the single-turn (prefix-mask) numbers of GAE and the discounted returns bit for bit as before."""

import math
import random

import pytest
import torch

from quartet.config import AlgorithmConfig
from quartet.rl import (
    LOSS_AGGREGATIONS,
    aggregate,
    clipped_policy_objective,
    discounted_returns,
    entropy_from_logits,
    explained_variance,
    gae_advantages,
    kl_estimate,
    last_valid_index,
    loss_units,
    masked_mean,
    masked_sum,
    masked_var,
    per_token_rewards,
    place_turn_rewards,
    policy_loss,
    sequence_kl,
    turn_end_positions,
    value_loss,
    whiten,
)
from quartet.rl.algorithms import ALGORITHMS, AdvantageInputs
from rl_helpers import with_garbage

SEEDS = [0, 1, 2, 3]
T = 14


def random_turn_ids(seed, batch=9, n_tokens=T):
    """[batch, T] int64: the turn number of each action token, -1 on holes. Rows cycle through the shapes
    that matter: no action token, a plain prefix, a hole at the start, turns with holes between them
    (some ending in a trailing observation, some at T), and a single action token."""
    rng = random.Random(seed)
    rows = []
    for b in range(batch):
        kind = b % 6
        row = [-1] * n_tokens
        if kind == 1:  # single-turn prefix
            row[:rng.randint(1, n_tokens)] = [0] * n_tokens
        elif kind == 5:  # one action token somewhere inside
            row[rng.randrange(n_tokens)] = 0
        elif kind != 0:  # turns separated by observations; kind 2 starts with an observation
            t, turn = (rng.randint(1, 3) if kind == 2 else 0), 0
            while t < n_tokens:
                length = rng.randint(1, 4)
                for s in range(t, min(t + length, n_tokens)):
                    row[s] = turn
                turn += 1
                t += length + rng.randint(1, 3)
                if kind == 4 and rng.random() < 0.3:  # stop early: trailing observation, then padding
                    break
        rows.append(row[:n_tokens])
    return torch.tensor(rows, dtype=torch.int64)


def random_action_mask(seed, dtype=torch.float64):
    return (random_turn_ids(seed) >= 0).to(dtype)


def action_positions(mask_row):
    return [t for t, m in enumerate(mask_row) if m]


def randn(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_masks_have_the_shapes_the_tests_need():
    for seed in SEEDS:
        mask = random_action_mask(seed)
        rows = [action_positions(row) for row in mask.tolist()]
        assert any(not r for r in rows)  # a row with no action token
        assert any(r and r[0] > 0 for r in rows)  # a hole at the start
        assert any(r and r[-1] - r[0] + 1 > len(r) for r in rows)  # a hole in the middle
        assert any(r and r[-1] < T - 1 for r in rows)  # a hole at the end


# ---------------------------------------------------------------- GAE and discounted returns


def gae_loop(rewards, values, mask, gamma, lam):
    advantages, returns = [], []
    for r, v, m in zip(rewards, values, mask):
        adv, ret = [0.0] * len(m), [0.0] * len(m)
        next_value = next_advantage = 0.0
        for t in reversed(action_positions(m)):  # t_n, ..., t_1: the holes are not steps
            delta = r[t] + gamma * next_value - v[t]
            next_advantage = delta + gamma * lam * next_advantage
            next_value = v[t]
            adv[t], ret[t] = next_advantage, next_advantage + v[t]
        advantages.append(adv)
        returns.append(ret)
    return advantages, returns


def returns_loop(rewards, mask, gamma):
    out = []
    for r, m in zip(rewards, mask):
        row, running = [0.0] * len(m), 0.0
        for t in reversed(action_positions(m)):
            running = r[t] + gamma * running
            row[t] = running
        out.append(row)
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_over_action_tokens_matches_loop(seed, gamma, lam):
    mask = random_action_mask(seed)
    rewards, values = randn(seed, *mask.shape), randn(seed + 100, *mask.shape)
    adv, ret = gae_advantages(with_garbage(rewards, mask, float("nan")), with_garbage(values, mask, 1e6), mask,
                              gamma, lam)
    exp_adv, exp_ret = gae_loop(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    for b in range(mask.shape[0]):
        assert adv[b].tolist() == pytest.approx(exp_adv[b], abs=1e-12)
        assert ret[b].tolist() == pytest.approx(exp_ret[b], abs=1e-12)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_over_action_tokens_match_loop(seed, gamma):
    mask = random_action_mask(seed)
    rewards = randn(seed, *mask.shape)
    got = discounted_returns(with_garbage(rewards, mask, float("nan")), mask, gamma)
    expected = returns_loop(rewards.tolist(), mask.tolist(), gamma)
    for b in range(mask.shape[0]):
        assert got[b].tolist() == pytest.approx(expected[b], abs=1e-12)


def test_observation_tokens_neither_end_the_episode_nor_discount():
    """A turn's end bootstraps from the next turn's first action token, one gamma away."""
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]])
    rewards = torch.tensor([[0.0, 0.5, 9.0, 9.0, 9.0, 2.0, 9.0]])  # rewards on holes are ignored
    values = torch.tensor([[0.1, 0.2, 7.0, 7.0, 7.0, 0.3, 7.0]])
    returns = discounted_returns(rewards, mask, gamma=0.5)
    assert returns.tolist() == [[0.5 * (0.5 + 0.5 * 2.0), 0.5 + 0.5 * 2.0, 0, 0, 0, 2.0, 0]]
    adv, _ = gae_advantages(rewards, values, mask, gamma=0.5, lam=1.0)
    assert float(adv[0, 1]) == pytest.approx(0.5 + 0.5 * 0.3 - 0.2 + 0.5 * (2.0 - 0.3))


def gae_with_prefix_masks(rewards, values, mask, gamma=1.0, lam=0.95):
    """gae_advantages as it was before action masks (a hole ended the episode), kept verbatim as the reference."""
    valid = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    r = torch.where(valid, rewards.to(values.dtype), zero)
    v = torch.where(valid, values, zero)
    next_value = torch.zeros_like(v[:, 0])
    next_advantage = torch.zeros_like(v[:, 0])
    advantages_reversed = []
    for t in reversed(range(v.shape[-1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        advantage = torch.where(valid[:, t], delta + gamma * lam * next_advantage, zero)
        advantages_reversed.append(advantage)
        next_value, next_advantage = v[:, t], advantage
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = torch.where(valid, advantages + v, zero)
    return advantages, returns


def discounted_returns_with_prefix_masks(rewards, mask, gamma=1.0):
    """discounted_returns as it was before action masks, kept verbatim as the reference."""
    valid = mask.bool()
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    r = torch.where(valid, rewards, zero)
    next_return = torch.zeros_like(r[:, 0])
    returns_reversed = []
    for t in reversed(range(r.shape[-1])):
        next_return = torch.where(valid[:, t], r[:, t] + gamma * next_return, zero)
        returns_reversed.append(next_return)
    if not returns_reversed:
        return r
    return torch.stack(returns_reversed[::-1], dim=1)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8)])
def test_prefix_masks_give_the_single_turn_numbers_bit_for_bit(seed, dtype, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (11,), generator=g)
    lengths[0], lengths[1] = 0, T  # an empty row and a full row
    mask = (torch.arange(T) < lengths[:, None]).to(dtype)
    rewards = torch.randn(mask.shape, generator=g, dtype=dtype)
    values = torch.randn(mask.shape, generator=g, dtype=dtype)
    rewards, values = with_garbage(rewards, mask, float("nan")), with_garbage(values, mask, 1e6)
    new, old = gae_advantages(rewards, values, mask, gamma, lam), gae_with_prefix_masks(rewards, values, mask, gamma, lam)
    assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])
    assert torch.equal(discounted_returns(rewards, mask, gamma), discounted_returns_with_prefix_masks(rewards, mask, gamma))


# ---------------------------------------------------------------- rewards: the score, the KL, the turns


def kl_loop(logp, ref_logp, estimator):
    r = ref_logp - logp  # log(ref / actor)
    return {"k1": -r, "k2": 0.5 * r * r, "k3": math.exp(r) - 1 - r}[estimator]


@pytest.mark.parametrize("seed", SEEDS)
def test_last_valid_index_is_the_last_action_token(seed):
    mask = random_action_mask(seed)
    expected = [max(action_positions(row), default=-1) for row in mask.tolist()]
    assert last_valid_index(mask).tolist() == expected
    assert last_valid_index(mask.bool()).tolist() == expected


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_per_token_rewards_score_at_last_action_token_and_kl_on_action_tokens(seed, estimator):
    mask = random_action_mask(seed)
    logp = -torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref_logp = logp + 0.3 * randn(seed + 1, *mask.shape)
    scores = 3 * randn(seed + 2, mask.shape[0])
    beta, clip = 0.05, 2.0
    rewards, penalty = per_token_rewards(with_garbage(logp, mask, float("nan")), with_garbage(ref_logp, mask, 1e6),
                                         scores, mask, beta, clip, estimator)
    for b, row in enumerate(mask.tolist()):
        actions = action_positions(row)
        for t in range(T):
            kl_part = -beta * kl_loop(float(logp[b, t]), float(ref_logp[b, t]), estimator) if t in actions else 0.0
            score = min(max(float(scores[b]), -clip), clip) if actions and t == actions[-1] else 0.0
            assert float(penalty[b, t]) == pytest.approx(kl_part, abs=1e-12)
            assert float(rewards[b, t]) == pytest.approx(kl_part + score, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimates_only_on_action_tokens(seed, estimator):
    mask = random_action_mask(seed)
    logp, ref_logp = randn(seed, *mask.shape), randn(seed + 1, *mask.shape)
    kl = kl_estimate(with_garbage(logp, mask, float("nan")), with_garbage(ref_logp, mask, -1e6), estimator, mask=mask)
    seq = sequence_kl(with_garbage(logp, mask, float("nan")), ref_logp, mask, estimator)
    for b, row in enumerate(mask.tolist()):
        expected = [kl_loop(float(logp[b, t]), float(ref_logp[b, t]), estimator) if row[t] else 0.0 for t in range(T)]
        assert kl[b].tolist() == pytest.approx(expected, abs=1e-12)
        assert float(seq[b]) == pytest.approx(sum(expected), abs=1e-12)


def turn_ends_loop(turn_ids, n_turns):
    return [[max((t for t, k in enumerate(row) if k == turn), default=-1) for turn in range(n_turns)]
            for row in turn_ids]


@pytest.mark.parametrize("seed", SEEDS)
def test_turn_end_positions_match_loop(seed):
    turn_ids = random_turn_ids(seed)
    n_turns = int(turn_ids.max()) + 1
    assert turn_end_positions(turn_ids).tolist() == turn_ends_loop(turn_ids.tolist(), n_turns)
    assert turn_end_positions(turn_ids, n_turns + 2).tolist() == turn_ends_loop(turn_ids.tolist(), n_turns + 2)
    # a turn with no token in a row (turn 1 skipped) is -1 there, the others unaffected
    assert turn_end_positions(torch.tensor([[0, 0, -1, 2, -1], [-1, -1, -1, -1, -1]])).tolist() == [[1, -1, 3],
                                                                                                    [-1, -1, -1]]


@pytest.mark.parametrize("seed", SEEDS)
def test_turn_rewards_land_on_each_turns_last_action_token(seed):
    turn_ids = random_turn_ids(seed)
    mask = (turn_ids >= 0).double()
    ends = turn_end_positions(turn_ids)
    turn_rewards = randn(seed, *ends.shape)
    turn_rewards = torch.where(ends >= 0, turn_rewards, torch.full_like(turn_rewards, float("nan")))  # absent: padding
    got = place_turn_rewards(turn_rewards, ends, mask)
    for b, row in enumerate(turn_ids.tolist()):
        expected = [0.0] * T
        for k, end in enumerate(ends[b].tolist()):
            if end >= 0:
                expected[end] += float(turn_rewards[b, k])
                assert row[end] == k and all(turn != k for turn in row[end + 1:])  # the turn's LAST token
        assert got[b].tolist() == pytest.approx(expected, abs=1e-12)
    assert (got[mask == 0] == 0).all()


def test_turn_rewards_ending_together_add_and_bad_ends_are_refused():
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    got = place_turn_rewards(torch.tensor([[1.0, 2.0, 5.0]]), torch.tensor([[1, 1, -1]]), mask)
    assert got.tolist() == [[0.0, 3.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="turn 1 of row 0 ends at position 2, which is not an action token"):
        place_turn_rewards(torch.tensor([[1.0, 2.0]]), torch.tensor([[1, 2]]), mask)
    with pytest.raises(ValueError, match="position in 0 .. 3"):
        place_turn_rewards(torch.tensor([[1.0]]), torch.tensor([[4]]), mask)
    with pytest.raises(ValueError, match="turn 2 but n_turns is 2"):
        turn_end_positions(torch.tensor([[0, 1, 2]]), n_turns=2)
    with pytest.raises(ValueError, match="-1 .* or a turn number"):
        turn_end_positions(torch.tensor([[0, -2]]))


# ---------------------------------------------------------------- reductions, aggregation, losses


def action_values(x, mask):
    return [float(x[b, t]) for b, row in enumerate(mask.tolist()) for t in action_positions(row)]


@pytest.mark.parametrize("seed", SEEDS)
def test_masked_reductions_and_whiten_count_only_action_tokens(seed):
    mask = random_action_mask(seed)
    x = randn(seed, *mask.shape)
    dirty = with_garbage(x, mask, float("nan"))
    values = action_values(x, mask)
    n, mean = len(values), sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    assert float(masked_sum(dirty, mask)) == pytest.approx(sum(values), abs=1e-12)
    assert float(masked_mean(dirty, mask)) == pytest.approx(mean, abs=1e-12)
    assert float(masked_var(dirty, mask)) == pytest.approx(var, abs=1e-12)
    rows = [[float(x[b, t]) for t in action_positions(row)] for b, row in enumerate(mask.tolist())]
    assert masked_mean(dirty, mask, dim=1).tolist() == pytest.approx([sum(r) / len(r) if r else 0.0 for r in rows])
    white = whiten(dirty, mask)
    expected = [[(float(x[b, t]) - mean) / math.sqrt(var + 1e-8) if m else 0.0 for t, m in enumerate(row)]
                for b, row in enumerate(mask.tolist())]
    for b in range(mask.shape[0]):
        assert white[b].tolist() == pytest.approx(expected[b], abs=1e-12)


def aggregate_loop(x, mask, mode, max_new_tokens):
    rows = [[float(x[b, t]) for t in action_positions(row)] for b, row in enumerate(mask.tolist())]
    rows = [r for r in rows if r]
    if mode == "token-mean":
        tokens = [v for r in rows for v in r]
        return sum(tokens) / len(tokens), len(tokens)
    per_row = [sum(r) / len(r) if mode == "seq-mean-token-mean" else sum(r) / max_new_tokens for r in rows]
    return sum(per_row) / len(per_row), len(rows)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_every_aggregation_mode_and_its_units_count_only_action_tokens(seed, mode):
    mask = random_action_mask(seed)
    x = randn(seed, *mask.shape)
    expected, units = aggregate_loop(x, mask, mode, max_new_tokens=20)
    assert float(aggregate(with_garbage(x, mask, float("nan")), mask, mode, max_new_tokens=20)) == pytest.approx(
        expected, abs=1e-12)
    assert int(loss_units(mask, mode)) == units
    # micro-batches of whole rows, weighted by their units, give the whole batch's number
    halves = [torch.arange(0, 4), torch.arange(4, mask.shape[0])]
    parts = sum(float(aggregate(x[h], mask[h], mode, 20) * loss_units(mask[h], mode)) for h in halves)
    assert parts / units == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sequence_ratio", [False, True])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_clipped_objective_and_gspo_ratio_over_action_tokens(seed, sequence_ratio, dual_clip):
    mask = random_action_mask(seed)
    old_logp = -2 * torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    logp = old_logp + 0.5 * randn(seed + 1, *mask.shape)
    adv = randn(seed + 2, *mask.shape)
    clip_low, clip_high = 0.2, 0.28
    logp_in = with_garbage(logp, mask, 1e6).requires_grad_(True)
    losses, stats = clipped_policy_objective(logp_in, with_garbage(old_logp, mask, float("nan")),
                                             with_garbage(adv, mask, -1e6), mask, clip_low, clip_high, dual_clip,
                                             sequence_ratio)
    losses = losses.detach()
    counts = dict.fromkeys(["clipfrac", "clipfrac_low", "clipfrac_high", "dual_clipfrac"], 0)
    ratios, kls = [], []
    for b, row in enumerate(mask.tolist()):
        actions = action_positions(row)
        seq_log_ratio = sum(float(logp[b, t] - old_logp[b, t]) for t in actions) / len(actions) if actions else 0.0
        for t in range(T):
            if t not in actions:
                assert float(losses[b, t]) == 0.0
                continue
            log_ratio = float(logp[b, t] - old_logp[b, t])
            ratio = math.exp(seq_log_ratio if sequence_ratio else log_ratio)
            a = float(adv[b, t])
            unclipped, clipped = -a * ratio, -a * min(max(ratio, 1 - clip_low), 1 + clip_high)
            loss = max(unclipped, clipped)
            if dual_clip is not None and a < 0:
                counts["dual_clipfrac"] += loss > -a * dual_clip
                loss = min(loss, -a * dual_clip)
            assert float(losses[b, t]) == pytest.approx(loss, abs=1e-12)
            counts["clipfrac"] += clipped > unclipped
            counts["clipfrac_low"] += a < 0 and ratio < 1 - clip_low
            counts["clipfrac_high"] += a > 0 and ratio > 1 + clip_high
            ratios.append(ratio)
            kls.append(0.5 * log_ratio**2)
    n = len(ratios)
    for key in ["clipfrac", "clipfrac_low", "clipfrac_high"] + (["dual_clipfrac"] if dual_clip else []):
        assert float(stats[key]) == pytest.approx(counts[key] / n, abs=1e-12)
    assert float(stats["ratio_mean"]) == pytest.approx(sum(ratios) / n, abs=1e-12)
    assert float(stats["approx_kl"]) == pytest.approx(sum(kls) / n, abs=1e-12)
    aggregate(clipped_policy_objective(logp_in, old_logp, adv, mask, clip_low, clip_high, dual_clip, sequence_ratio)[0],
              mask, "seq-mean-token-mean").backward()
    assert (logp_in.grad[mask == 0] == 0).all() and torch.isfinite(logp_in.grad).all()
    assert (logp_in.grad[mask == 1] != 0).any()


@pytest.mark.parametrize("seed", SEEDS)
def test_ppo_policy_and_value_losses_and_explained_variance_over_action_tokens(seed):
    mask = random_action_mask(seed)
    old_logp = -torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    logp, adv = old_logp + 0.4 * randn(seed + 1, *mask.shape), randn(seed + 2, *mask.shape)
    values, old_values, returns = randn(seed + 3, *mask.shape), randn(seed + 4, *mask.shape), randn(seed + 5, *mask.shape)
    nan = float("nan")
    p_loss, _ = policy_loss(with_garbage(logp, mask, nan), old_logp, with_garbage(adv, mask, nan), mask, 0.2)
    v_loss, _ = value_loss(with_garbage(values, mask, nan), old_values, with_garbage(returns, mask, nan), mask, 0.2)
    ev = explained_variance(with_garbage(values, mask, nan), with_garbage(returns, mask, nan), mask)
    pg, vf, rets, residuals = [], [], [], []
    for b, row in enumerate(mask.tolist()):
        for t in action_positions(row):
            ratio, a = math.exp(float(logp[b, t] - old_logp[b, t])), float(adv[b, t])
            pg.append(max(-a * ratio, -a * min(max(ratio, 0.8), 1.2)))
            v, v_old, ret = float(values[b, t]), float(old_values[b, t]), float(returns[b, t])
            v_clipped = v_old + min(max(v - v_old, -0.2), 0.2)
            vf.append(max((v - ret) ** 2, (v_clipped - ret) ** 2))
            rets.append(ret)
            residuals.append(ret - v)

    def var(xs):
        mean = sum(xs) / len(xs)
        return sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)

    assert float(p_loss) == pytest.approx(sum(pg) / len(pg), abs=1e-12)
    assert float(v_loss) == pytest.approx(0.5 * sum(vf) / len(vf), abs=1e-12)
    assert float(ev) == pytest.approx(1 - var(residuals) / var(rets), abs=1e-12)


def test_mean_entropy_over_action_tokens():
    mask = random_action_mask(0)
    logits = torch.randn(*mask.shape, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    per_token = entropy_from_logits(logits)
    entropies = []
    for b, row in enumerate(mask.tolist()):
        for t in action_positions(row):
            z = [math.exp(v) for v in logits[b, t].tolist()]
            p = [v / sum(z) for v in z]
            entropies.append(-sum(q * math.log(q) for q in p))
    assert float(masked_mean(per_token, mask)) == pytest.approx(sum(entropies) / len(entropies), abs=1e-12)


def test_response_length_and_overlong_length_are_action_token_counts():
    """What the trainer passes as a response's length (mask.sum(1)) counts its action tokens, not its span."""
    mask = random_action_mask(1)
    assert mask.sum(1).tolist() == [float(len(action_positions(row))) for row in mask.tolist()]
    assert (mask.sum(1) <= (last_valid_index(mask) + 1)).all()


# ---------------------------------------------------------------- the registered estimators


def squeezed(x, mask):
    """Each row's action-token values moved to the front (a prefix mask), in order; the rest 0."""
    out = torch.zeros_like(x)
    for b, row in enumerate(mask.tolist()):
        actions = action_positions(row)
        out[b, :len(actions)] = x[b, actions]
    return out


def unsqueezed(x, mask):
    """The inverse of `squeezed`: prefix values back onto the action tokens of `mask`."""
    out = torch.zeros_like(x)
    for b, row in enumerate(mask.tolist()):
        actions = action_positions(row)
        out[b, actions] = x[b, :len(actions)]
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_estimator_sees_a_multi_turn_row_as_its_action_tokens_in_a_row(seed, name):
    """Observation tokens are invisible to every registered estimator: the advantages of a row with holes
    are those of the same action tokens squeezed into a prefix, put back in place."""
    mask = random_action_mask(seed)
    scores = randn(seed, mask.shape[0])
    last = last_valid_index(mask)
    rewards = 0.1 * randn(seed + 1, *mask.shape) * mask
    rewards[torch.arange(mask.shape[0]), last.clamp(min=0)] += torch.where(last >= 0, scores, torch.zeros_like(scores))
    values = randn(seed + 2, *mask.shape)
    group_ids = torch.arange(mask.shape[0]) // 3
    settings = AlgorithmConfig(gamma=0.9, lam=0.8)
    holes = AdvantageInputs(rewards=with_garbage(rewards, mask, float("nan")), mask=mask, scores=scores,
                            values=with_garbage(values, mask, 1e6), group_ids=group_ids)
    prefix_mask = squeezed(mask, mask)
    prefix = AdvantageInputs(rewards=squeezed(rewards, mask), mask=prefix_mask, scores=scores,
                             values=squeezed(values, mask), group_ids=group_ids)
    algorithm = ALGORITHMS[name]
    got, got_returns = algorithm.advantages(holes, settings)
    expected, expected_returns = algorithm.advantages(prefix, settings)
    assert torch.allclose(got, unsqueezed(expected, mask), rtol=0, atol=1e-12)
    assert (got[mask == 0] == 0).all()
    if expected_returns is not None:
        assert torch.allclose(got_returns, unsqueezed(expected_returns, mask), rtol=0, atol=1e-12)
