"""One clipped score for the rewards and every estimator (per-algorithm clipping defaults), GSPO's
aggregation, and micro-batch shares exact in float64: the experience maker's view of a batch checked
against plain-Python computations."""

import math
import statistics
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch

from quartet.config import ConfigError, RLConfig, build_config
from quartet.rl import RunningMeanStd
from quartet.rollout.scored import ScoredRollout
from quartet.stages.rl import RLTrainer
from quartet.stages.rl_experience import ExperienceMaker


def _config(algorithm: str, **settings) -> RLConfig:
    return build_config(RLConfig, {"models": {"actor": "actor", "reward": "rm"},
                                   "algorithm": {"name": algorithm, **settings},
                                   "batch": {"rollout_batch_size": 8, "mini_batch_size": 4}})


def _experience(cfg: RLConfig, scores: list[float], lengths: list[int], group_size: int):
    """The experience maker's shaping of a batch whose responses have these scores and lengths (policy
    = reference, so no KL penalty)."""
    rows, width = len(scores), max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])
    logprobs = -torch.rand(rows, width) * mask
    batch = ScoredRollout(
        prompt_ids=torch.ones(rows, 2, dtype=torch.long), prompt_mask=torch.ones(rows, 2, dtype=torch.long),
        response_ids=torch.ones(rows, width, dtype=torch.long), mask=mask, old_logprobs=logprobs,
        ref_logprobs=logprobs.clone(), old_values=None, scores=torch.tensor(scores),
        has_eos=torch.ones(rows, dtype=torch.bool), group_ids=torch.arange(rows) // group_size)
    maker = SimpleNamespace(cfg=cfg, algorithm=cfg.algorithm.spec, reward_stats=None, running_scores=RunningMeanStd(),
                            beta=cfg.algorithm.beta)
    return ExperienceMaker._experience(maker, batch), mask


def _whitened(values_per_token: list[list[float]]) -> list[list[float]]:
    """Plain whitening over every token of the batch (unbiased variance, eps 1e-8)."""
    flat = [v for row in values_per_token for v in row]
    mean = sum(flat) / len(flat)
    var = sum((v - mean) ** 2 for v in flat) / (len(flat) - 1)
    return [[(v - mean) / math.sqrt(var + 1e-8) for v in row] for row in values_per_token]


def test_reinforce_baseline_centres_the_clipped_scores_the_rewards_carry():
    # the case that ranked a sample scored 10 below one scored 1: scores beyond the clip in one group
    cfg = _config("reinforce++-baseline", clip_reward_value=5.0)
    scores, lengths = [10.0, 0.0, 1.0, 0.0], [3, 2, 3, 1]
    exp, mask = _experience(cfg, scores, lengths, group_size=2)
    clipped = [max(-5.0, min(5.0, s)) for s in scores]
    centred = [c - (clipped[i // 2 * 2] + clipped[i // 2 * 2 + 1]) / 2 for i, c in enumerate(clipped)]
    # gamma 1 and the score only at the last token: every token's return is the centred score
    expected = _whitened([[c] * n for c, n in zip(centred, lengths)])
    for row, n in enumerate(lengths):
        assert exp.advantages[row, :n].tolist() == pytest.approx(expected[row], abs=1e-5)
        assert exp.advantages[row, n:].abs().sum() == 0
    first = exp.advantages[:, 0].tolist()
    assert first[0] > first[2] > first[3] and first[0] > first[1], "a higher score must never rank lower"
    # the rewards carry the same clipped score
    last = [exp.rewards[row, n - 1].item() for row, n in enumerate(lengths)]
    assert last == pytest.approx(clipped)


def test_group_presets_do_not_clip_scores_and_ppo_and_reinforce_do():
    assert _config("grpo").algorithm.clip_reward_value is None
    assert _config("rloo").algorithm.clip_reward_value is None
    assert build_config(RLConfig, {"models": {"actor": "a", "reward_fn": "m:f"}, "preset": "dapo"}
                        ).algorithm.clip_reward_value is None
    assert _config("ppo").algorithm.clip_reward_value == 5.0  # DeepSpeed-Chat
    assert _config("reinforce++").algorithm.clip_reward_value == 10.0  # OpenRLHF
    assert _config("reinforce++-baseline").algorithm.clip_reward_value == 10.0
    assert _config("grpo", clip_reward_value=3.0).algorithm.clip_reward_value == 3.0  # your value over the preset


def test_grpo_normalises_the_raw_scores_of_a_group():
    cfg = _config("grpo", beta=0.0)
    scores, lengths = [10.0, 4.0, 0.0, 1.0, 2.0, 3.0], [2, 3, 1, 2, 2, 3]
    exp, _ = _experience(cfg, scores, lengths, group_size=3)
    for g in range(2):
        group = scores[3 * g:3 * g + 3]
        mean, std = statistics.mean(group), statistics.stdev(group)
        for i in range(3):
            row = 3 * g + i
            expected = (group[i] - mean) / (std + cfg.algorithm.advantage_eps)
            assert exp.advantages[row, :lengths[row]].tolist() == pytest.approx([expected] * lengths[row], abs=1e-5)
    # 10 stays 10: [10, 4, 0] clipped at 5 would have given the middle sample a positive advantage
    assert exp.advantages[1, 0] < 0


def test_gspo_averages_over_sequences():
    assert _config("ppo", sequence_ratio=True).algorithm.aggregation == "seq-mean-token-mean"
    assert _config("ppo").algorithm.aggregation == "token-mean"
    with pytest.raises(ConfigError, match="algorithm.sequence_ratio.*algorithm.loss_aggregation"):
        _config("ppo", sequence_ratio=True, loss_aggregation="token-mean")
    with pytest.raises(ConfigError, match="algorithm.sequence_ratio.*algorithm.loss_aggregation"):
        _config("rloo", sequence_ratio=True)  # its preset's seq-mean-token-sum-norm weighs by length too
    assert _config("grpo", sequence_ratio=True).algorithm.aggregation == "seq-mean-token-mean"


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_micro_batch_shares_are_exact_fractions(mode):
    lengths = [3, 7, 1, 5, 2, 6, 4, 1, 2]  # 31 tokens: thirds and 31sts are not float32-exact
    mask = torch.tensor([[1.0] * n + [0.0] * (7 - n) for n in lengths])
    cfg = _config("ppo", loss_aggregation=mode)
    cfg.batch.mini_batch_size, cfg.batch.grad_accum = 9, 3
    ranks = SimpleNamespace(world=1, share=lambda rows: (0, len(rows)))
    trainer = SimpleNamespace(cfg=cfg, ranks=ranks)
    mini = torch.arange(9)
    shares = RLTrainer._micro_batches(trainer, SimpleNamespace(loss_mask=mask), mini)
    units = (lambda rows: sum(lengths[r] for r in rows)) if mode == "token-mean" else len
    token_units = lambda rows: sum(lengths[r] for r in rows)  # noqa: E731
    for micro, weight, token_weight in shares:
        rows = micro.tolist()
        assert weight == float(Fraction(units(rows), units(range(9))))
        assert token_weight == float(Fraction(token_units(rows), token_units(range(9))))
    assert math.fsum(w for _, w, _ in shares) == pytest.approx(1.0, abs=1e-15)
