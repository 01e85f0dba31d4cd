"""Rollout: prompts in; response tokens, masks and sampling log-probs out.

A lean sampling loop over the model's KV cache (the same sampling semantics as Hugging
Face `generate`: temperature, then top-k, then top-p; EOS blocked until min_new_tokens).
The log-prob of each sampled token is taken from the temperature-scaled, *unfiltered*
distribution: exactly what a later forward pass with the same temperature recomputes, so
PPO's old log-probs can come from here instead of an extra actor forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from quartet.data.collate import collate_prompts
from quartet.models.forward import position_ids_from_mask
from quartet.rl.masks import response_mask


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    greedy: bool = False


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [batch, prompt_len], left-padded
    prompt_mask: torch.Tensor  # [batch, prompt_len]
    response_ids: torch.Tensor  # [batch, response_len], pad after the first EOS
    response_mask: torch.Tensor  # [batch, response_len], 1 up to and including the first EOS
    logprobs: torch.Tensor  # [batch, response_len], log pi(token) at the sampling temperature
    has_eos: torch.Tensor  # [batch] bool

    @property
    def sequences(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)  # [batch, prompt_len + response_len]

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.to(self.prompt_mask.dtype)], dim=1)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf (keeps at least one token)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) >= top_p  # tokens after the nucleus is full
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


def sample_categorical(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row by inverting the cumulative distribution at `uniforms` (each in [0, 1)).

    Exact categorical sampling that consumes one random number per row, so a row's draw does
    not depend on which other rows share its batch. Zero-probability tokens are never chosen.
    """
    cumulative = probs.cumsum(-1)  # [batch, vocab]
    target = uniforms[:, None].to(cumulative.dtype) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, target, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample_responses(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     cfg: SamplingConfig, eos_token_id: int, pad_token_id: int,
                     generator: torch.Generator | None = None, row_offset: int = 0,
                     total_rows: int | None = None) -> Rollout:
    """Sample one response per left-padded prompt, stopping each row at its first EOS.

    Each new token draws one uniform number per row of a global batch of `total_rows`
    (default: this batch); this batch holds rows `row_offset ...`. Ranks that split a batch
    therefore sample exactly what one process would have sampled for the same rows.
    """
    if cfg.temperature <= 0 and not cfg.greedy:
        raise ValueError("generation.temperature must be > 0 for sampling (use greedy for argmax decoding)")
    was_training = model.training
    model.eval()  # dropout off for rollout
    batch = prompt_ids.shape[0]
    device = prompt_ids.device
    attention = prompt_mask.long()
    positions = position_ids_from_mask(attention)
    out = model(input_ids=prompt_ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1)
    past = out.past_key_values
    next_logits = out.logits[:, -1].float()  # [batch, vocab]
    next_position = positions[:, -1:] + 1  # [batch, 1]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    total_rows = total_rows or batch
    temperature = 1.0 if cfg.greedy else cfg.temperature
    tokens, logprobs = [], []
    for t in range(cfg.max_new_tokens):
        scaled = next_logits / temperature
        logp_all = torch.log_softmax(scaled, dim=-1)
        if t < cfg.min_new_tokens:
            scaled = scaled.clone()
            scaled[:, eos_token_id] = float("-inf")
        if cfg.greedy:
            token = scaled.argmax(-1)
        else:
            probs = filter_logits(scaled, cfg.top_k, cfg.top_p).softmax(-1)
            uniforms = torch.rand(total_rows, generator=generator, device=device)[row_offset : row_offset + batch]
            token = sample_categorical(probs, uniforms)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        logprobs.append(logp_all.gather(1, token[:, None]).squeeze(1))
        finished |= token == eos_token_id
        if bool(finished.all()) or t == cfg.max_new_tokens - 1:
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention, position_ids=next_position,
                    past_key_values=past, use_cache=True)
        past = out.past_key_values
        next_logits = out.logits[:, -1].float()
        next_position = next_position + 1
    model.train(was_training)
    response_ids = torch.stack(tokens, dim=1)  # [batch, response_len]
    mask = response_mask(response_ids, eos_token_id)
    has_eos = (response_ids == eos_token_id).any(dim=1)
    response_ids = response_ids.masked_fill(mask == 0, pad_token_id)
    return Rollout(prompt_ids, prompt_mask, response_ids, mask.to(prompt_mask.dtype),
                   torch.stack(logprobs, dim=1) * mask, has_eos)


@torch.no_grad()
def generate_texts(model: PreTrainedModel, tokenizer, prompts: list[str], cfg: SamplingConfig,
                   batch_size: int = 32, seed: int = 0) -> list[str]:
    """Responses (decoded, special tokens dropped) to already-rendered prompt strings, in order."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    responses: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start : start + batch_size]]
        batch = collate_prompts(encoded, tokenizer.pad_token_id)  # left-padded
        rollout = sample_responses(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), cfg,
                                   tokenizer.eos_token_id, tokenizer.pad_token_id, generator=generator)
        for ids, mask in zip(rollout.response_ids, rollout.response_mask):
            responses.append(tokenizer.decode(ids[mask.bool()], skip_special_tokens=True))
    return responses
