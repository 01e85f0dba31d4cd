"""The scored rollout batch that every online-RL algorithm's update reads."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quartet.rl.groups import group_std, zero_spread_fraction
from quartet.rl.kl import sequence_kl
from quartet.rl.masks import masked_mean


@dataclass(kw_only=True)
class Experience:
    """One scored rollout batch, aligned on response tokens; critic fields are None without a critic."""

    sequences: torch.Tensor  # [batch, prompt_len + response_len]
    attention_mask: torch.Tensor  # [batch, prompt_len + response_len]
    response_ids: torch.Tensor  # [batch, response_len]
    mask: torch.Tensor  # [batch, response_len] float, 1 on valid response tokens
    old_logprobs: torch.Tensor  # [batch, response_len]
    ref_logprobs: torch.Tensor | None  # [batch, response_len]; None when no KL term needs the reference
    rewards: torch.Tensor  # [batch, response_len] per-token rewards (score at the last token, KL penalty)
    kl_penalty: torch.Tensor  # [batch, response_len] the KL part of the rewards
    advantages: torch.Tensor  # [batch, response_len]
    scores: torch.Tensor  # [batch] raw scores (reward model or function)
    loss_mask: torch.Tensor | None = None  # [batch, response_len] the tokens the policy loss covers (default: mask)
    group_ids: torch.Tensor | None = None  # [batch] the prompt each sample answers
    old_values: torch.Tensor | None = None  # [batch, response_len] V(S_t) at rollout time
    returns: torch.Tensor | None = None  # [batch, response_len] the critic's targets
    # off-policy correction (rl/offpolicy.py): each token's policy-gradient weight pi_old / pi_sampler; None: 1
    behaviour_weights: torch.Tensor | None = None  # [batch, response_len]
    prompts: list[str] | None = None  # decoded texts, when scoring read them
    responses: list[str] | None = None

    def __post_init__(self) -> None:
        if self.loss_mask is None:
            self.loss_mask = self.mask

    @property
    def prompt_len(self) -> int:
        return self.sequences.shape[1] - self.response_ids.shape[1]

    def is_finite(self) -> bool:
        """No NaN/inf in what the update learns from (a NaN score would poison every update of the step)."""
        tensors = [self.scores, self.rewards, self.advantages] + ([self.returns] if self.returns is not None else [])
        return all(bool(torch.isfinite(x).all()) for x in tensors)


def experience_metrics(exp: Experience, has_eos: torch.Tensor, beta: float) -> dict[str, float]:
    """What a step's rollouts look like: scores, total reward, KL to the reference, lengths, values, groups."""
    scores, mask = exp.scores, exp.mask
    lengths = mask.sum(1)
    metrics = {
        "score/mean": float(scores.mean()), "score/std": float(scores.std()) if len(scores) > 1 else 0.0,
        "reward/total": float((exp.rewards * mask).sum(1).mean()),
        "response/length": float(lengths.mean()), "response/length_min": float(lengths.min()),
        "response/length_max": float(lengths.max()), "response/eos_rate": float(has_eos.float().mean()),
        "response/truncation_rate": float(1.0 - has_eos.float().mean()),
    }
    if exp.ref_logprobs is not None:
        metrics["kl/ref"] = float(sequence_kl(exp.old_logprobs, exp.ref_logprobs, mask).mean())
        metrics["kl/beta"] = float(beta)
        # fluency as the reference model sees it (temperature-scaled, like the KL)
        metrics["response/ref_perplexity"] = math.exp(min(-float(masked_mean(exp.ref_logprobs, mask)), 50.0))
    if exp.old_values is not None:
        metrics["value/mean"] = float(masked_mean(exp.old_values, mask))
        metrics["return/mean"] = float(masked_mean(exp.returns, mask))
    if exp.group_ids is not None and len(exp.group_ids) > int(exp.group_ids.max()) + 1:  # groups of several samples
        # a group whose samples all scored the same gives a group baseline nothing to learn from
        metrics["groups/no_signal"] = zero_spread_fraction(scores, exp.group_ids)
        metrics["groups/score_std"] = float(group_std(scores.double(), exp.group_ids).mean())
    return metrics


def score_part_metrics(parts: dict[str, torch.Tensor], verifiers: list[str]) -> dict[str, float]:
    """Mean and std of each reward function's scores over the rows it judged (NaN where it did not),
    and for verifiers (1.0 = correct) the share of judged rows that are correct."""
    metrics = {}
    for name, values in parts.items():
        judged = values[~torch.isnan(values)]
        if judged.numel() == 0:
            continue
        metrics[f"reward/{name}/mean"] = float(judged.mean())
        metrics[f"reward/{name}/std"] = float(judged.std()) if judged.numel() > 1 else 0.0
        if name in verifiers:
            metrics[f"accuracy/{name}"] = float((judged == 1.0).float().mean())
    return metrics
