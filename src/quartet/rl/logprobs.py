"""Per-token log-probabilities and entropies from language-model logits.

Alignment is the caller's job: ``logits[:, t]`` must be the distribution that produced
``tokens[:, t]`` (for a causal LM over ``prompt + response`` that is
``logits[:, prompt_len - 1 : -1]`` against ``ids[:, prompt_len:]``).
Sampling temperature must be applied here too, so that the PPO log-probs describe the
same distribution the rollout sampled from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["token_logprobs", "entropy_from_logits", "token_logprobs_and_entropy"]

_FULL_PRECISION = (torch.float32, torch.float64)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature  # no copy at temperature 1


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` gathered at ``tokens``: ``[B, T, V], [B, T] -> [B, T]``.

    Memory: float32/float64 logits use ``z[token] - logsumexp(z)``, which keeps no
    ``[B, T, V]`` log-softmax copy for backward (logsumexp saves only its input and a
    ``[B, T]`` output). Half-precision logits (bf16/fp16, where logsumexp loses accuracy) are
    upcast and processed one row at a time, so under ``torch.no_grad()`` only one
    ``[T, V]`` float32 copy exists at once; the result is then float32.
    """
    _check_temperature(temperature)
    index = tokens.long().unsqueeze(-1)  # [B, T, 1]
    if logits.dtype in _FULL_PRECISION:
        z = _scaled(logits, temperature)  # [B, T, V]
        z_token = z.gather(-1, index).squeeze(-1)  # [B, T]
        return z_token - torch.logsumexp(z, dim=-1)  # [B, T]
    rows = []
    for logits_row, index_row in zip(logits, index):  # logits_row: [T, V]
        z_row = _scaled(logits_row.float(), temperature)  # [T, V] float32 (upcast before scaling)
        logp_row = F.log_softmax(z_row, dim=-1)  # [T, V], freed after the gather
        rows.append(logp_row.gather(-1, index_row).squeeze(-1))  # [T]
    return torch.stack(rows)  # [B, T]


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy ``H = logsumexp(z) - sum_v softmax(z)_v z_v`` of each token's distribution, ``z = logits / temperature``.

    ``[B, T, V] -> [B, T]``; half-precision logits are computed in float32.
    """
    _check_temperature(temperature)
    if logits.dtype not in _FULL_PRECISION:
        logits = logits.float()  # upcast before scaling
    z = _scaled(logits, temperature)  # [B, T, V]
    log_partition = torch.logsumexp(z, dim=-1)  # [B, T]
    probs = torch.softmax(z, dim=-1)  # [B, T, V]
    return log_partition - (probs * z).sum(dim=-1)  # [B, T]


def token_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor,
                               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs`` (differentiable) and ``entropy_from_logits`` (no gradient) in one pass.

    Both need ``z = logits / temperature`` and ``logsumexp(z)``; computing them once saves a
    ``[B, T, V]`` scaling and a log-sum-exp per PPO micro-batch. The log-probs are exactly
    ``token_logprobs``'s; the entropy equals ``entropy_from_logits`` up to rounding.
    """
    if logits.dtype not in _FULL_PRECISION:
        with torch.no_grad():
            entropy = entropy_from_logits(logits, temperature)
        return token_logprobs(logits, tokens, temperature), entropy
    _check_temperature(temperature)
    z = _scaled(logits, temperature)  # [B, T, V]
    log_partition = torch.logsumexp(z, dim=-1)  # [B, T]
    logprobs = z.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1) - log_partition
    with torch.no_grad():
        lse = log_partition.detach()
        entropy = lse - (torch.exp(z.detach() - lse.unsqueeze(-1)) * z.detach()).sum(dim=-1)
    return logprobs, entropy
