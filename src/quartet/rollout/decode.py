"""Decode steps of GPT-2 and Llama-shaped models without the Python around their forward pass.

At small batches a decode step's arithmetic takes less time than what the model's forward does
around it: building the attention mask, reading the config, the output classes and wrappers,
the cache's bookkeeping (about 0.55 ms per step for a 4-layer GPT-2 at 32 rows, a tenth of
the rollout). A lean step runs the same submodules (embeddings, norms, projections, MLPs: so
adapters and autocast still apply) and Hugging Face's own SDPA attention function, in the
model's order, so its logits are bit-identical to the forward's (tests/test_lean_decode.py).

It covers `GPT2LMHeadModel` and the Llama-shaped `LlamaForCausalLM`, `MistralForCausalLM`,
`Qwen2ForCausalLM` and `Qwen3ForCausalLM`, with SDPA attention and full-attention layers, in eval
mode, with no hooks on the modules it steps around; any other model decodes through its forward.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from transformers import PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# Llama's layout (pre-norm decoder layers, rotary positions, gated MLP): model module -> class prefix
_LLAMA_LIKE = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def _llama_like(model: torch.nn.Module) -> bool:
    cls = type(model)  # the class itself, not a subclass that may change the forward
    return any(cls.__module__ == f"transformers.models.{module}.modeling_{module}" and cls.__name__ == f"{prefix}ForCausalLM"
               for module, prefix in _LLAMA_LIKE.items())


def lean_decode_unsupported(model: torch.nn.Module) -> str:
    """Why `model` cannot take lean decode steps (a one-line reason for the log), or "" if it can."""
    from transformers import GPT2LMHeadModel

    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        return f"{name} is not a plain Hugging Face model"
    if model.config._attn_implementation != "sdpa":
        return f"{name} has attention implementation {model.config._attn_implementation!r} (the lean step does SDPA)"
    if type(model) is GPT2LMHeadModel and not model.config.add_cross_attention:
        stepped = [model, model.transformer, *model.transformer.h, *(b.attn for b in model.transformer.h)]
    elif _llama_like(model):
        stepped = [model, model.model, *model.model.layers, *(layer.self_attn for layer in model.model.layers)]
    else:
        return (f"{name} is not one the lean step knows (GPT2LMHeadModel without cross-attention, "
                f"{', '.join(f'{c}ForCausalLM' for c in _LLAMA_LIKE.values())})")
    if getattr(model, "_compiled_call_impl", None) is not None:
        return f"{name} is compiled"
    if any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in stepped):
        return f"{name} has hooks on the modules a lean step goes around"
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return "global module hooks are registered"
    return ""


DecodeStep = Callable[[torch.Tensor, torch.Tensor, list, torch.Tensor | None], torch.Tensor]


def lean_decode_step(model: torch.nn.Module) -> DecodeStep | None:
    """The model's lean decode step, or None where its forward must run (see `lean_decode_unsupported`;
    in train mode too: lean steps leave dropout out).

    A step takes the new tokens [batch, 1], their positions [batch, 1], the cache's layers (each
    with `update(keys, values) -> (keys, values)` over all cached positions) and the mask Hugging
    Face's SDPA path builds for one query token (None when no key is padding, else a boolean
    [batch, 1, 1, keys]), and returns the next-token logits [batch, vocab].
    """
    if model.training or lean_decode_unsupported(model):
        return None
    step = _gpt2_step if hasattr(model, "transformer") else _llama_step
    return lambda tokens, positions, layers, mask: step(model, tokens, positions, layers, mask)


def _gpt2_step(model, tokens: torch.Tensor, positions: torch.Tensor, layers: list,
               mask: torch.Tensor | None) -> torch.Tensor:
    # GPT2Model.forward and GPT2Block.forward in eval mode, op for op (dropout is the identity)
    body = model.transformer
    hidden = body.wte(tokens) + body.wpe(positions)
    for block, layer in zip(body.h, layers):
        residual = hidden
        attn = block.attn
        query, key, value = attn.c_attn(block.ln_1(hidden)).split(attn.split_size, dim=2)
        shape = (*key.shape[:-1], -1, attn.head_dim)
        key, value = layer.update(key.view(shape).transpose(1, 2), value.view(shape).transpose(1, 2))
        query = query.view(shape).transpose(1, 2)
        out, _ = sdpa_attention_forward(attn, query, key, value, mask, dropout=0.0, scaling=attn.scaling)
        hidden = attn.c_proj(out.reshape(*out.shape[:-2], -1).contiguous()) + residual
        residual = hidden
        hidden = residual + block.mlp(block.ln_2(hidden))
    return model.lm_head(body.ln_f(hidden))[:, -1]


def _llama_step(model, tokens: torch.Tensor, positions: torch.Tensor, layers: list,
                mask: torch.Tensor | None) -> torch.Tensor:
    # LlamaModel.forward and LlamaDecoderLayer.forward in eval mode, op for op (Mistral's and Qwen2's are
    # Llama's; Qwen3 normalises each head's queries and keys before the rotation)
    apply_rotary_pos_emb = sys.modules[type(model).__module__].apply_rotary_pos_emb  # the model's own
    body = model.model
    hidden = body.embed_tokens(tokens)
    cos, sin = body.rotary_emb(hidden, position_ids=positions)
    for decoder, layer in zip(body.layers[: model.config.num_hidden_layers], layers):
        residual = hidden
        attn = decoder.self_attn
        normed = decoder.input_layernorm(hidden)
        input_shape = normed.shape[:-1]
        shape = (*input_shape, -1, attn.head_dim)
        query, key = attn.q_proj(normed).view(shape), attn.k_proj(normed).view(shape)
        if hasattr(attn, "q_norm"):
            query, key = attn.q_norm(query), attn.k_norm(key)
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        value = attn.v_proj(normed).view(shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        key, value = layer.update(key, value)
        out, _ = sdpa_attention_forward(attn, query, key, value, mask, dropout=0.0, scaling=attn.scaling)
        hidden = residual + attn.o_proj(out.reshape(*input_shape, -1).contiguous())
        residual = hidden
        hidden = residual + decoder.mlp(decoder.post_attention_layernorm(hidden))
    return model.lm_head(body.norm(hidden))[:, -1]
