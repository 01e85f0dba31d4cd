"""Response logits with each prompt computed once per group (GRPO-style groups of n samples).

A group's n rows share one left-padded prompt. The per-row path (`response_logits`) runs the
prompt through the model n times; here it runs once, and its keys/values are repeated for the
group's rows:

  1. one forward over the G unique prompts, filling a `DynamicCache`; the last position's logits
     predict each group's first response token;
  2. the cache repeated n times along the batch (`batch_repeat_interleave`: a differentiable
     `repeat_interleave`, so the gradients of the n rows add up in the prompt's computation,
     exactly as they would per row);
  3. one forward over the response tokens but the last, attending to the repeated prompt cache,
     with positions continuing from each prompt's real length (counted from the attention mask,
     as `position_ids_from_mask` does on the whole sequence).

The result equals `response_logits` on the expanded batch, with or without gradients. Both
forwards go through `causal_lm_logits`, so GPT-2 and Llama-shaped models take its lean passes.
Models whose cached forward is not the same computation (sliding-window or linear-attention
layers, shared-KV layers, sequence-length-dependent RoPE scaling, gradient checkpointing in
training) are refused by `prompt_sharing_supported`.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from quartet.models.forward import cache_kwarg, causal_lm_logits

# RoPE variants whose frequencies depend on the length of the sequence in the forward pass: a
# prompt-only forward would rotate the prompt differently from a whole-sequence forward.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _rope_types(config) -> set[str]:
    """The RoPE types a config names (one dict, or one dict per layer type), if any."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return set()
    dicts = [v for v in params.values() if isinstance(v, dict)] or [params]
    return {d.get("rope_type", d.get("type")) for d in dicts} - {None}


def prompt_sharing_supported(model: torch.nn.Module) -> tuple[bool, str]:
    """Whether `shared_prompt_logits` computes exactly what the per-row forward does for `model`,
    and if not, a one-line reason for the log."""
    base = _base_model(model)
    name = type(base).__name__
    config = getattr(model, "config", None)
    if config is None:
        return False, f"{name} has no config to build a KV cache from"
    text_config = config.get_text_config(decoder=True)
    if getattr(config, "is_encoder_decoder", False):
        return False, f"{name} is an encoder-decoder model"
    params = inspect.signature(base.forward).parameters
    missing = [k for k in (cache_kwarg(model), "position_ids", "logits_to_keep") if k not in params]
    if missing:
        return False, f"{name}.forward takes no {', '.join(missing)}"
    try:
        layers = DynamicCache(config=config).layers
    except Exception as exc:  # a config the cache cannot read is a model we do not know
        return False, f"cannot build a DynamicCache for {name}: {exc}"
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if odd:
        return False, f"{name} has {', '.join(odd)} cache layers (sliding-window, linear or shared-KV attention)"
    rope = _rope_types(text_config) & set(_LENGTH_DEPENDENT_ROPE)
    if rope:
        return False, f"{name} uses '{rope.pop()}' RoPE scaling, which depends on the sequence length"
    if model.training and getattr(base, "is_gradient_checkpointing", False):
        return False, f"{name} has gradient checkpointing on in train mode, which turns the KV cache off"
    return True, "full-attention KV cache"


def unique_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, n: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The G unique prompts [G, P] of an expanded batch [G*n, P] whose groups of n rows share one.

    Raises ValueError when the batch is not whole groups, or a group's rows differ.
    """
    rows, prompt_len = prompt_ids.shape
    if n < 1 or rows % n:
        raise ValueError(f"a batch of {rows} rows is not whole groups of {n}: micro-batches must hold whole groups")
    ids, mask = prompt_ids[::n], prompt_mask[::n]  # [G, P]
    same = ((prompt_ids.view(-1, n, prompt_len) == ids[:, None]).all(-1).all(-1)
            & (prompt_mask.view(-1, n, prompt_len) == mask[:, None]).all(-1).all(-1))  # [G]
    if not bool(same.all()):
        group = int((~same).nonzero()[0])
        raise ValueError(f"rows {group * n}..{group * n + n - 1} (group {group}) do not share one prompt; "
                         f"prompt sharing needs each prompt's {n} samples next to each other")
    return ids, mask


def shared_prompt_logits(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                         response_ids: torch.Tensor, response_mask: torch.Tensor, n: int) -> torch.Tensor:
    """Logits that predicted each response token [G*n, R, vocab], each prompt computed once.

    `prompt_ids`/`prompt_mask` [G, P] are the unique left-padded prompts; `response_ids`/
    `response_mask` [G*n, R] the right-padded responses, a group's n rows next to each other.
    Equal to `response_logits(model, sequences, attention_mask, response_ids)` on the expanded
    batch; differentiable (the prompt's gradient is the sum over its group's rows).
    """
    return torch.cat([part for part in shared_prompt_logit_parts(model, prompt_ids, prompt_mask, response_ids,
                                                                 response_mask, n) if part is not None], 1)


def shared_prompt_logit_parts(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                              response_ids: torch.Tensor, response_mask: torch.Tensor, n: int
                              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`shared_prompt_logits` in its two pieces, not concatenated: the logits predicting response token 0
    [G*n, 1, vocab] (from the prompt's forward) and those predicting tokens 1.. [G*n, R - 1, vocab] (None
    when R is 1). Per-token functions of the logits (log-probs, entropies) can take each piece alone
    and concatenate their [G*n, .] results: no second vocabulary-sized copy of the logits."""
    groups, prompt_len = prompt_ids.shape
    rows, response_len = response_ids.shape
    if rows != groups * n:
        raise ValueError(f"{rows} response rows for {groups} prompts x {n} samples")
    ok, reason = prompt_sharing_supported(model)
    if not ok:
        raise ValueError(f"cannot share prompts across a group: {reason}")
    cache = DynamicCache(config=model.config)
    prefill = causal_lm_logits(model, prompt_ids, prompt_mask, logits_to_keep=1, cache=cache)  # [G, 1, vocab]
    if cache.get_seq_length() != prompt_len:
        raise RuntimeError(f"{type(model).__name__} did not fill the KV cache passed as {cache_kwarg(model)!r}")
    first = prefill.repeat_interleave(n, 0)  # [G*n, 1, vocab]: predicts response token 0
    if response_len == 1:
        return first, None
    cache.batch_repeat_interleave(n)  # [G*n, heads, P, head_dim] per layer, differentiable
    mask = torch.cat([prompt_mask.repeat_interleave(n, 0), response_mask[:, :-1].to(prompt_mask.dtype)], 1)
    # positions continue each prompt's count (from the whole mask, as on the whole sequence)
    rest = causal_lm_logits(model, response_ids[:, :-1], mask, cache=cache)  # [G*n, R - 1, vocab]
    return first, rest


def grouped_response_logits(model: PreTrainedModel, sequences: torch.Tensor, attention_mask: torch.Tensor,
                            response_ids: torch.Tensor, n: int) -> torch.Tensor:
    """`response_logits` for an expanded batch (prompt + response rows, groups of n) with each
    prompt computed once: the same arguments, plus the group size."""
    return torch.cat([part for part in grouped_response_logit_parts(model, sequences, attention_mask, response_ids, n)
                      if part is not None], 1)


def grouped_response_logit_parts(model: PreTrainedModel, sequences: torch.Tensor, attention_mask: torch.Tensor,
                                 response_ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`grouped_response_logits` in the two pieces of `shared_prompt_logit_parts`."""
    prompt_len = sequences.shape[1] - response_ids.shape[1]
    ids, mask = unique_prompts(sequences[:, :prompt_len], attention_mask[:, :prompt_len], n)
    return shared_prompt_logit_parts(model, ids, mask, response_ids, attention_mask[:, prompt_len:], n)
