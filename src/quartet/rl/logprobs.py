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

__all__ = ["token_logprobs", "token_logprobs_inplace", "entropy_from_logits", "token_logprobs_and_entropy"]

_FULL_PRECISION = (torch.float32, torch.float64)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature  # no copy at temperature 1


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` gathered at ``tokens``: ``[B, T, V], [B, T] -> [B, T]``.

    float32/float64 logits take one fused log-softmax and a gather (what ``cross_entropy`` does;
    on CPU about twice as fast, forward and backward, as ``z[token] - logsumexp(z)``, and the
    autograd graph holds one ``[B, T, V]`` tensor either way). Half-precision logits are upcast
    and processed one row at a time, so under ``torch.no_grad()`` only one ``[T, V]`` float32
    copy exists at once; the result is then float32.
    """
    _check_temperature(temperature)
    index = tokens.long().unsqueeze(-1)  # [B, T, 1]
    if logits.dtype in _FULL_PRECISION:
        return _full_logprobs(logits, temperature).gather(-1, index).squeeze(-1)  # [B, T]
    rows = []
    for logits_row, index_row in zip(logits, index):  # logits_row: [T, V]
        logp_row = _full_logprobs(logits_row.float(), temperature)  # [T, V] float32 (upcast before scaling)
        rows.append(logp_row.gather(-1, index_row).squeeze(-1))  # [T]
    return torch.stack(rows)  # [B, T]


def token_logprobs_inplace(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``token_logprobs`` for scoring without gradients, overwriting ``logits`` to save memory.

    The temperature division and the log-softmax are written into ``logits`` itself, so a
    ``[B, T, V]`` batch needs no second and third vocabulary-sized tensor; the numbers equal
    ``token_logprobs``'s bit for bit. Only for logits the caller owns and will not read again.
    Half-precision logits take ``token_logprobs``'s row-by-row float32 path (no overwrite).
    """
    _check_temperature(temperature)
    if logits.dtype not in _FULL_PRECISION:
        return token_logprobs(logits, tokens, temperature)
    if logits.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("token_logprobs_inplace overwrites its logits: use token_logprobs where gradients flow")
    if temperature != 1.0:
        logits.div_(temperature)
    logp = torch.log_softmax(logits, dim=-1, out=logits)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # [B, T]


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy ``H = -sum_v p_v log p_v`` of each token's distribution ``p = softmax(logits / temperature)``.

    ``[B, T, V] -> [B, T]``; half-precision logits are computed in float32.
    """
    _check_temperature(temperature)
    if logits.dtype not in _FULL_PRECISION:
        logits = logits.float()  # upcast before scaling
    return _entropy(_full_logprobs(logits, temperature))


def token_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor,
                               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs`` (differentiable) and ``entropy_from_logits`` (no gradient) in one pass.

    Both are read off one log-softmax, which saves a ``[B, T, V]`` scaling and normalisation
    per PPO micro-batch; the results equal the two functions' exactly (float32/float64).
    """
    if logits.dtype not in _FULL_PRECISION:
        with torch.no_grad():
            entropy = entropy_from_logits(logits, temperature)
        return token_logprobs(logits, tokens, temperature), entropy
    _check_temperature(temperature)
    logp = _full_logprobs(logits, temperature)  # [B, T, V]
    logprobs = logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # [B, T]
    with torch.no_grad():
        entropy = _entropy(logp.detach())
    return logprobs, entropy


def _full_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(_scaled(logits, temperature), dim=-1)  # [..., V]


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    # -sum_v p_v log p_v with the product written over p: one vocabulary-sized temporary instead of
    # two (on CPU, 2.0 instead of 3.4 ms per [16, 32, 4096] micro-batch), the same numbers bit for bit
    # (where gradients flow, exp's backward needs p itself, so the product gets its own tensor)
    if logp.requires_grad and torch.is_grad_enabled():
        return -(logp.exp() * logp).sum(dim=-1)
    p = logp.exp()
    return -p.mul_(logp).sum(dim=-1)  # [...]; finite logits give no 0 * -inf
