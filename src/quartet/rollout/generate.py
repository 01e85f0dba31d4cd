"""The `hf` rollout backend's sampler: prompts in; response tokens, masks and sampling log-probs out.

A lean sampling loop over the model's KV cache (the same sampling semantics as Hugging
Face `generate`: temperature, then top-k, then top-p; EOS blocked until min_new_tokens).
The log-prob of each sampled token is taken from the temperature-scaled, *unfiltered*
distribution: exactly what a later forward pass with the same temperature recomputes, so
PPO's old log-probs can come from here instead of an extra actor forward. The prompt is
prefilled through the model's forward; GPT-2 and Llama-shaped models then decode with lean
steps (models/lean.py: the same operations without the forward's per-call Python), others
through the forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from quartet.config import SamplingConfig
from quartet.data.collate import collate_prompts
from quartet.models.compiled_decode import CompiledDecoder, compiled_capacity
from quartet.models.forward import cache_kwarg, position_ids_from_mask
from quartet.models.lean import lean_decode_step
from quartet.rl.masks import response_mask


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [batch, prompt_len], left-padded
    prompt_mask: torch.Tensor  # [batch, prompt_len]
    response_ids: torch.Tensor  # [batch, response_len], pad after the first EOS
    response_mask: torch.Tensor  # [batch, response_len], 1 up to and including the first EOS
    logprobs: torch.Tensor  # [batch, response_len], log pi(token) at the sampling temperature
    has_eos: torch.Tensor  # [batch] bool
    # multi-turn episodes (rollout/episodes.py): the tokens the policy chose, 0 on observations; None: all of them
    action_mask: torch.Tensor | None = None  # [batch, response_len]
    turn_ids: torch.Tensor | None = None  # [batch, response_len] the turn of each chosen token, -1 elsewhere

    @property
    def chosen_mask(self) -> torch.Tensor:
        """1 on the tokens the policy chose: what trains and measures it (the response mask in one turn)."""
        return self.response_mask if self.action_mask is None else self.action_mask

    @property
    def finish_reasons(self) -> list[str]:
        """'stop' where the response ended with EOS, 'length' where it ran into max_new_tokens."""
        return ["stop" if eos else "length" for eos in self.has_eos.tolist()]

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


class _PreallocatedLayer(DynamicLayer):
    """A full-attention KV-cache layer that writes into buffers sized for the whole rollout.

    It behaves like `DynamicLayer` (same lengths, so the same attention masks) but each decode
    step copies one position into place instead of concatenating the whole cache again, which
    at small model sizes costs half as much as the step's matrix products.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._key_buffer = key_states.new_empty(*key_states.shape[:2], self.capacity, key_states.shape[-1])
        self._value_buffer = value_states.new_empty(*value_states.shape[:2], self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        self.reserve(end)
        self._key_buffer[:, :, start:end] = key_states
        self._value_buffer[:, :, start:end] = value_states
        self.length = end
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values

    def reserve(self, positions: int) -> None:
        """Room for `positions` in all: multi-turn observations can outgrow the estimate; grow, keeping what is
        cached."""
        if positions > self.capacity:
            self._grow(max(positions, 2 * self.capacity))

    def _grow(self, capacity: int) -> None:
        for name in ("_key_buffer", "_value_buffer"):
            old = getattr(self, name)
            buffer = old.new_empty(*old.shape[:2], capacity, old.shape[-1])
            buffer[:, :, :self.length] = old[:, :, :self.length]
            setattr(self, name, buffer)
        self.capacity = capacity

    def get_seq_length(self) -> int:
        return self.length

    def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Use these buffers (same shape, holding this layer's cached positions) from now on."""
        self._key_buffer, self._value_buffer = keys, values
        self.keys, self.values = keys[:, :, : self.length], values[:, :, : self.length]

    def advance(self, positions: int) -> None:
        """Count `positions` written into the buffers directly (by the compiled decode step)."""
        self.length += positions
        self.keys, self.values = self._key_buffer[:, :, : self.length], self._value_buffer[:, :, : self.length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row `repeats` times, next to each other (a prompt's cache shared by its group's samples)."""
        if not self.is_initialized:
            return
        self._key_buffer = self._key_buffer.repeat_interleave(repeats, dim=0)
        self._value_buffer = self._value_buffer.repeat_interleave(repeats, dim=0)
        self.keys, self.values = self._key_buffer[:, :, :self.length], self._value_buffer[:, :, :self.length]


def rollout_cache(model: PreTrainedModel, capacity: int) -> DynamicCache:
    """The model's own dynamic cache, with each plain full-attention layer preallocated.

    Other layer kinds (sliding-window, linear-attention, shared-KV) keep their own classes,
    so models that mix them stay correct; they just do not get the faster layer.
    """
    cache = DynamicCache(config=model.config)
    cache.layers = [_PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    if cache.layer_class_to_replicate is DynamicLayer:  # a config without layer types: layers appear on first use
        cache.layer_class_to_replicate = lambda: _PreallocatedLayer(capacity)
    return cache


@torch.no_grad()
def sample_responses(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                     cfg: SamplingConfig, eos_token_id: int, pad_token_id: int,
                     generator: torch.Generator | None = None, row_offset: int = 0,
                     total_rows: int | None = None, n: int = 1, decoder: CompiledDecoder | None = None) -> Rollout:
    """Sample `n` responses per left-padded prompt, stopping each row at its first EOS.

    The rollout's rows are the samples, a prompt's `n` next to each other. Each prompt is
    prefilled once and its KV cache shared by its samples. Each new token draws one uniform
    number per row of a global batch of `total_rows` samples (default: this batch's); this
    batch holds samples `row_offset ...`. Ranks that split a batch therefore sample exactly what
    one process would have sampled for the same rows. With a `decoder` (`rollout.compile`), decode
    steps run compiled over a static cache where it applies.
    """
    if cfg.temperature <= 0 and not cfg.greedy:
        raise ValueError("generation.temperature must be > 0 for sampling (use greedy for argmax decoding)")
    was_training = model.training
    model.eval()  # dropout off for rollout
    try:
        with torch.inference_mode():  # less per-op bookkeeping than no_grad
            tokens, logprobs, steps = _sample_loop(model, prompt_ids, prompt_mask, cfg, eos_token_id, pad_token_id,
                                                   generator, row_offset, total_rows or n * prompt_ids.shape[0], n,
                                                   decoder)
    finally:
        model.train(was_training)
    if n > 1:
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(n, 0), prompt_mask.repeat_interleave(n, 0)
    # ops outside inference mode turn the loop's inference tensors into ordinary ones that PPO's loss can save
    response_ids = tokens[:, :steps]  # [batch, response_len]
    mask = response_mask(response_ids, eos_token_id)
    has_eos = (response_ids == eos_token_id).any(dim=1)
    response_ids = response_ids.masked_fill(mask == 0, pad_token_id)
    return Rollout(prompt_ids, prompt_mask, response_ids, mask.to(prompt_mask.dtype), logprobs[:, :steps] * mask, has_eos)


class TokenSampler:
    """One sampling step: a token per row from next-token logits, with its log-prob at the sampling temperature.

    Temperature, then top-k and top-p, EOS blocked before `min_new_tokens`; each step draws one
    uniform number per row of the global batch of `total_rows` (this batch is `rows` of it). The
    [batch, vocab] buffers are allocated once and reused by every step.
    """

    def __init__(self, cfg: SamplingConfig, eos_token_id: int, pad_token_id: int, batch: int, like: torch.Tensor):
        self.cfg, self.eos_token_id, self.pad_token_id = cfg, eos_token_id, pad_token_id
        self.temperature = 1.0 if cfg.greedy else cfg.temperature
        self.filtering = bool(cfg.top_k) or cfg.top_p < 1.0
        self.logp_all = torch.empty_like(like)  # [batch, vocab]
        self.probs = torch.empty_like(like)

    def draw(self, next_logits: torch.Tensor, t: int, generator: torch.Generator | None, rows: slice, total_rows: int,
             finished: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step `t`'s tokens [batch] (pad where `finished`) and their log-probs [batch]; scales `next_logits` in place."""
        cfg = self.cfg
        scaled = next_logits.div_(self.temperature)  # in place: the model returned fresh logits
        torch.log_softmax(scaled, dim=-1, out=self.logp_all)  # unfiltered: what a later forward pass recomputes
        if t < cfg.min_new_tokens:
            scaled[:, self.eos_token_id] = float("-inf")  # after logp_all was taken, which keeps EOS's true log-prob
        if cfg.greedy:
            token = scaled.argmax(-1)
        else:
            torch.softmax(filter_logits(scaled, cfg.top_k, cfg.top_p) if self.filtering else scaled, dim=-1,
                          out=self.probs)
            token = sample_categorical(self.probs, torch.rand(total_rows, generator=generator,
                                                              device=next_logits.device)[rows])
        token.masked_fill_(finished, self.pad_token_id)
        return token, self.logp_all.gather(1, token[:, None]).squeeze(1)


def _sample_loop(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, cfg: SamplingConfig,
                 eos_token_id: int, pad_token_id: int, generator: torch.Generator | None, row_offset: int,
                 total_rows: int, n: int = 1, decoder: CompiledDecoder | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Tokens [batch, max_new_tokens] and their log-probs, and how many leading columns are valid
    (batch = n samples per prompt).

    Every buffer is allocated once; the loop only does the model call and the sampling ops.
    """
    n_prompts, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    max_new = cfg.max_new_tokens
    capacity = prompt_len + max_new
    cache = rollout_cache(model, compiled_capacity(capacity) if decoder is not None else capacity)
    cache_key = cache_kwarg(model)
    prefill_positions = position_ids_from_mask(prompt_mask)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prefill_positions,
                use_cache=True, logits_to_keep=1, **{cache_key: cache})
    if cache.get_seq_length() != prompt_len:
        raise RuntimeError(f"{type(model).__name__} did not fill the KV cache passed as {cache_key!r}")
    next_logits = out.logits[:, -1].float()  # [prompts, vocab]
    if n > 1:  # the group's samples continue from one prefill
        cache.batch_repeat_interleave(n)
        next_logits = next_logits.repeat_interleave(n, 0)  # [batch, vocab]
        prompt_mask, prefill_positions = prompt_mask.repeat_interleave(n, 0), prefill_positions.repeat_interleave(n, 0)
    batch = n_prompts * n
    # the attention mask grows by one column per step: a view of one preallocated tensor
    attention = torch.ones(batch, prompt_len + max_new, dtype=torch.long, device=device)
    attention[:, :prompt_len] = prompt_mask
    decode_positions = prefill_positions[:, -1:] + 1 + torch.arange(max_new, device=device)  # [batch, max_new]
    tokens = torch.full((batch, max_new), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch, max_new, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    # lean steps (models/lean.py: GPT-2 and Llama-shaped models, without the forward's per-call Python)
    # write into the preallocated cache layers: only where every layer is one
    preallocated = len(cache.layers) == model.config.num_hidden_layers and all(
        type(layer) is _PreallocatedLayer for layer in cache.layers)
    step = lean_decode_step(model) if preallocated else None
    # no key is ever masked but left padding: the decode masks are views of one tensor, or none at all
    padded = None if bool(prompt_mask.all()) else attention.bool()[:, None, None, :]
    compiled = decoder is not None and preallocated and decoder.prepare(batch)
    if compiled:  # the static cache's key mask: padding False; the step masks the positions not yet written
        key_mask = torch.ones(batch, cache.layers[0].capacity, dtype=torch.bool, device=device)
        key_mask[:, :prompt_len] = prompt_mask.bool()
    rows = slice(row_offset, row_offset + batch)
    sampler = TokenSampler(cfg, eos_token_id, pad_token_id, batch, next_logits)
    for t in range(max_new):
        token, logprobs[:, t] = sampler.draw(next_logits, t, generator, rows, total_rows, finished)
        tokens[:, t] = token
        finished |= token == eos_token_id
        if t == max_new - 1 or bool(finished.all()):
            return tokens, logprobs, t + 1
        if compiled:
            logits = decoder.step(token[:, None], decode_positions[:, t : t + 1], prompt_len + t, key_mask, cache.layers)
            if logits is not None:
                next_logits = logits.float()
                continue
            compiled = False  # it could not compile: the eager step from here on
        if step is not None:
            next_logits = step(token[:, None], decode_positions[:, t : t + 1], cache.layers,
                               None if padded is None else padded[..., : prompt_len + t + 1]).float()
            continue
        out = model(input_ids=token[:, None], attention_mask=attention[:, : prompt_len + t + 1],
                    position_ids=decode_positions[:, t : t + 1], use_cache=True, **{cache_key: cache})
        next_logits = out.logits[:, -1].float()
    return tokens, logprobs, max_new  # only with max_new_tokens == 0 (configs require > 0): an empty response


@torch.no_grad()
def generate_texts(model: PreTrainedModel, tokenizer, prompts: list[str], cfg: SamplingConfig,
                   batch_size: int = 32, seed: int = 0, progress: Callable[[int], Any] | None = None) -> list[str]:
    """Responses (decoded, special tokens dropped) to already-rendered prompt strings, in order.

    `progress(n)` is called after each batch with its number of prompts (e.g. a progress bar's update).
    """
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
        if progress is not None:
            progress(len(encoded))
    return responses
