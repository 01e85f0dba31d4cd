"""Reward shaping, score normalisation, RunningMeanStd, the missing-EOS penalty and DAPO's overlong penalty,
against plain Python."""

import json
import math

import numpy as np
import pytest
import torch

from quartet.rl import RunningMeanStd, normalize_scores, overlong_penalty, penalize_missing_eos, per_token_rewards
from rl_helpers import LENGTHS, T, ragged_mask, with_garbage


def reference_rewards(logp, ref_logp, scores, lengths, beta, clip, estimator="k1"):
    rewards, penalties = [], []
    for b, n in enumerate(lengths):
        row_r, row_p = [], []
        for t in range(len(logp[b])):
            if t < n:
                r = ref_logp[b][t] - logp[b][t]
                kl = {"k1": -r, "k2": 0.5 * r * r, "k3": math.exp(r) - 1 - r}[estimator]
                penalty = -beta * kl
            else:
                penalty = 0.0
            reward = penalty
            if t == n - 1:
                s = scores[b]
                if clip is not None:
                    s = min(max(s, -clip), clip)
                reward += s
            row_r.append(reward)
            row_p.append(penalty)
        rewards.append(row_r)
        penalties.append(row_p)
    return rewards, penalties


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logp = -3 * torch.rand(len(LENGTHS), T, generator=g, dtype=torch.float64)
    ref_logp = -3 * torch.rand(len(LENGTHS), T, generator=g, dtype=torch.float64)
    scores = torch.tensor([7.0, -9.0, 0.5, 3.0], dtype=torch.float64)  # two beyond the clip of 5
    return logp, ref_logp, scores


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("clip", [5.0, None])
def test_per_token_rewards_match_loop(batch, estimator, clip):
    logp, ref_logp, scores = batch
    mask = ragged_mask()
    beta = 0.1
    rewards, kl_penalty = per_token_rewards(
        with_garbage(logp, mask), with_garbage(ref_logp, mask, -1e6), scores, mask, beta,
        clip_reward_value=clip, kl_estimator=estimator,
    )
    exp_r, exp_p = reference_rewards(logp.tolist(), ref_logp.tolist(), scores.tolist(), LENGTHS, beta, clip, estimator)
    assert rewards.shape == kl_penalty.shape == (len(LENGTHS), T)
    for b in range(len(LENGTHS)):
        assert rewards[b].tolist() == pytest.approx(exp_r[b])
        assert kl_penalty[b].tolist() == pytest.approx(exp_p[b])


def test_score_clipped_and_placed_at_last_valid_token(batch):
    logp, _, scores = batch
    mask = ragged_mask()
    # no KL (ref == actor): the reward is exactly the clipped score at the last valid token
    rewards, kl_penalty = per_token_rewards(logp, logp, scores, mask, beta=0.5)
    assert (kl_penalty == 0).all()
    expected = torch.zeros(len(LENGTHS), T, dtype=torch.float64)
    for b, (n, s) in enumerate(zip(LENGTHS, [5.0, -5.0, 0.5, 3.0])):
        expected[b, n - 1] = s
    assert torch.equal(rewards, expected)


def test_kl_penalty_sign_and_beta_tensor(batch):
    logp, _, scores = batch
    mask = ragged_mask()
    ref_logp = logp - 0.2  # actor more confident than ref: positive k1 on every token
    rewards, kl_penalty = per_token_rewards(logp, ref_logp, scores, mask, beta=torch.tensor(0.5, dtype=torch.float64))
    assert torch.allclose(kl_penalty[mask.bool()], torch.full((sum(LENGTHS),), -0.1, dtype=torch.float64))
    assert (kl_penalty[~mask.bool()] == 0).all() and (rewards[~mask.bool()] == 0).all()


def test_empty_row_gets_nothing(batch):
    logp, ref_logp, scores = batch
    mask = ragged_mask([0, 6, 3, 4])
    rewards, _ = per_token_rewards(logp, ref_logp, scores, mask, beta=0.1)
    assert (rewards[0] == 0).all()


def test_normalize_scores():
    scores = torch.tensor([1.0, 3.0, -2.0])
    got = normalize_scores(scores, mean=0.5, std=2.0)
    assert got.tolist() == pytest.approx([(s - 0.5) / (2.0 + 1e-8) for s in [1.0, 3.0, -2.0]])
    assert normalize_scores(scores, 0.0, 0.0, eps=0.5).tolist() == pytest.approx([2.0, 6.0, -4.0])


def test_running_mean_std_matches_numpy_over_concatenated_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n) for n in (5, 1, 17, 2, 40)]
    rms = RunningMeanStd()
    assert (rms.mean, rms.std, rms.count) == (0.0, 1.0, 0)  # identity before any data
    seen = []
    for i, batch in enumerate(batches):
        rms.update(torch.tensor(batch) if i % 2 else batch.tolist())  # tensors or plain lists
        seen.extend(batch.tolist())
        assert rms.count == len(seen)
        assert rms.mean == pytest.approx(float(np.mean(seen)), rel=1e-12)
        assert rms.std == pytest.approx(float(np.std(seen)), rel=1e-12)
    rms.update([])
    assert rms.count == len(seen)


def test_running_mean_std_state_dict_is_json():
    rms = RunningMeanStd()
    rms.update(torch.tensor([1.0, 2.0, 4.0]))
    state = json.loads(json.dumps(rms.state_dict()))
    other = RunningMeanStd()
    other.load_state_dict(state)
    assert (other.mean, other.std, other.count) == (rms.mean, rms.std, rms.count)
    other.update([10.0])
    assert other.mean == pytest.approx(np.mean([1.0, 2.0, 4.0, 10.0]))
    assert other.std == pytest.approx(np.std([1.0, 2.0, 4.0, 10.0]))


def test_penalize_missing_eos():
    scores = torch.tensor([0.3, -1.0, 2.0, 0.0])
    has_eos = torch.tensor([True, False, True, False])
    assert penalize_missing_eos(scores, has_eos, -4.0).tolist() == pytest.approx([0.3, -4.0, 2.0, -4.0])
    assert penalize_missing_eos(scores, has_eos.float(), 1.5).tolist() == pytest.approx([0.3, 1.5, 2.0, 1.5])


# ---- DAPO's soft overlong punishment ----


def reference_overlong(length, max_new_tokens, buffer_len, factor):
    threshold = max_new_tokens - buffer_len
    if length <= threshold:
        return 0.0
    if length <= max_new_tokens:
        return factor * (threshold - length) / buffer_len
    return -factor


@pytest.mark.parametrize("max_new_tokens, buffer_len, factor", [(20, 8, 1.0), (20, 20, 0.5), (16, 1, 2.0)])
def test_overlong_penalty_matches_eq13(max_new_tokens, buffer_len, factor):
    lengths = list(range(0, max_new_tokens + 3))
    got = overlong_penalty(torch.tensor(lengths), max_new_tokens, buffer_len, factor)
    assert got.is_floating_point()
    expected = [reference_overlong(n, max_new_tokens, buffer_len, factor) for n in lengths]
    assert got.tolist() == pytest.approx(expected, abs=1e-7)
    assert float(got[max_new_tokens]) == -factor  # exactly the full penalty at the limit
    assert float(got[max_new_tokens - buffer_len]) == 0.0  # and exactly none at the ramp's start


def test_overlong_penalty_examples_and_bad_buffer():
    # limit 20 with a buffer of 8: free up to 12 tokens, then 1/8 of the penalty per token
    got = overlong_penalty(torch.tensor([5, 12, 13, 16, 20]), max_new_tokens=20, buffer_len=8)
    assert got.tolist() == [0.0, 0.0, -0.125, -0.5, -1.0]
    for bad in (0, -1, 21):
        with pytest.raises(ValueError, match="buffer_len"):
            overlong_penalty(torch.tensor([5]), max_new_tokens=20, buffer_len=bad)
