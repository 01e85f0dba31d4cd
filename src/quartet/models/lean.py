"""Forward passes of GPT-2 and Llama-shaped models without the Python around their `forward`.

At small batches a forward call's arithmetic takes less time than what the model's `forward`
does around it: config reads, output classes and decorators, cache bookkeeping, a module call
per layer through wrappers (about 0.55 ms per decode step of a 4-layer GPT-2 at 32 rows, a tenth
of the rollout; about 1 ms per full forward). A lean pass runs the same submodules (embeddings,
norms, projections, MLPs, heads), transformers' own mask function and SDPA attention function,
in the model's order, so its outputs and gradients are bit-identical to the forward's
(tests/test_lean_forward.py). The plain torch and transformers layers among them (`Linear`,
GPT-2's `Conv1D`, `LayerNorm`, `Embedding`, GELU and SiLU, GPT-2's and the gated MLPs) run as the
ops their forwards call, without the module call, a few microseconds each at a decode step's
sizes; a layer with hooks or adapters on it, or of any other class, is called as a module (its
hooks run; autocast applies either way).

It covers GPT-2 and the Llama-shaped Llama, Mistral, Qwen2 and Qwen3 bodies (`GPT2Model`,
`LlamaModel`, ...) and their causal LMs, with SDPA attention and full-attention layers only, in
eval mode (online RL keeps its models there), without gradient checkpointing, compilation or
hooks on the modules it steps around; any other model runs its own forward. Full forwards run
without a cache (scoring, the update) or on a plain `DynamicCache` (shared prompts: the prompts'
forward fills it, the responses' forward attends to it); decode steps write into the sampler's
preallocated cache layers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel
from transformers.activations import GELUActivation, GELUTanh, SiLUActivation
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_causal_mask
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.mistral.modeling_mistral import MistralMLP
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP
from transformers.pytorch_utils import Conv1D

# Llama's layout (pre-norm decoder layers, rotary positions, gated MLP): model module -> class prefix
_LLAMA_LIKE = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
_GPT2_MODULE = "transformers.models.gpt2.modeling_gpt2"

# the layers `_direct` and `_direct_mlp` know, with the forwards they replicate (read at import: one replaced
# later, by kernels' `kernelize` for instance, is called as it is); the gated MLPs' forward is
# down_proj(act_fn(gate_proj(x)) * up_proj(x)), GPT2MLP's c_proj(act(c_fc(x))) and then dropout
_GATED_MLPS = (LlamaMLP, MistralMLP, Qwen2MLP, Qwen3MLP)
_PLAIN_FORWARDS = {cls: cls.forward for cls in (torch.nn.Linear, Conv1D, torch.nn.LayerNorm, torch.nn.Embedding,
                                                GELUTanh, GELUActivation, torch.nn.SiLU, SiLUActivation, GPT2MLP,
                                                *_GATED_MLPS)}
DecodeStep = Callable[[torch.Tensor, torch.Tensor, list, torch.Tensor | None], torch.Tensor]


def _known(module: torch.nn.Module, suffix: str) -> str | None:
    """'gpt2' or 'llama' when `module` is exactly transformers' GPT-2 / Llama-shaped class `<Prefix><suffix>`
    (not a subclass, which may change the forward, nor a wrapper that replaced the class)."""
    cls = type(module)
    if cls.__module__ == _GPT2_MODULE and cls.__name__ == f"GPT2{suffix}":
        return "gpt2"
    for name, prefix in _LLAMA_LIKE.items():
        if cls.__module__ == f"transformers.models.{name}.modeling_{name}" and cls.__name__ == f"{prefix}{suffix}":
            return "llama"
    return None


def _prefix(module: torch.nn.Module) -> str:
    return type(module).__name__.removesuffix("ForCausalLM").removesuffix("Model")


def lean_unsupported(model: torch.nn.Module) -> str:
    """Why `model` (a causal LM, or the body of any model: `model.base_model`) cannot take lean
    passes, as a one-line reason for the log, or "" if it can."""
    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        return f"{name} is not a plain Hugging Face model"
    body, outer = (model.base_model, [model]) if _is_causal_lm(model) else (model, [])
    family = _known(body, "Model")
    known = ", ".join(["GPT2LMHeadModel", *(f"{p}ForCausalLM" for p in _LLAMA_LIKE.values())])
    if family is None:
        return f"{name} is not one the lean passes know ({known}, and their bodies)"
    config = body.config
    if config._attn_implementation != "sdpa":
        return f"{name} has attention implementation {config._attn_implementation!r} (the lean passes do SDPA)"
    if family == "gpt2" and config.add_cross_attention:
        return f"{name} has cross-attention"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()) or (
            family == "llama" and getattr(config, "sliding_window", None) is not None and _prefix(body) == "Mistral"):
        return f"{name} has sliding-window layers"
    if getattr(body, "gradient_checkpointing", False):
        return f"{name} has gradient checkpointing on"
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in (*outer, body)):
        return f"{name} is compiled"
    blocks = list(body.h if family == "gpt2" else body.layers)
    attentions = [b.attn if family == "gpt2" else b.self_attn for b in blocks]
    block_class, attention_class = ("GPT2Block", "GPT2Attention") if family == "gpt2" else (
        f"{_prefix(body)}DecoderLayer", f"{_prefix(body)}Attention")
    if any(type(b).__name__ != block_class for b in blocks) or any(type(a).__name__ != attention_class
                                                                   for a in attentions):
        return f"{name}'s layers are wrapped or replaced"
    if any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in (*outer, body, *blocks,
                                                                                     *attentions)):
        return f"{name} has hooks on the modules a lean pass goes around"
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return "global module hooks are registered"
    return ""


def lean_body(body: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """`(input_ids, attention_mask, position_ids) -> last hidden state` of a model body (`model.base_model`),
    equal to `body(input_ids=..., attention_mask=..., position_ids=...).last_hidden_state`; None where
    the body's own forward must run (`lean_unsupported`, or train mode: lean passes leave dropout out)."""
    if body.training or lean_unsupported(body):
        return None
    return _full_forward(body)


def lean_causal_lm_body(model: torch.nn.Module, cache: DynamicCache | None = None
                        ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """`lean_body` of a causal LM's body, whose LM head then gives the forward's logits; None where the
    model's own forward must run.

    With a `cache`, the body attends to the positions it holds and appends the new ones to it, as the
    forward does with `use_cache=True` (a plain `DynamicCache` of full-attention layers only; any other
    cache gives None)."""
    if not _lean_causal_lm(model):
        return None
    if cache is not None and not _plain_cache(cache, model.config.num_hidden_layers):
        return None
    return _full_forward(model.base_model, cache)


def _plain_cache(cache: DynamicCache, num_layers: int) -> bool:
    """A DynamicCache whose layers are all there and all plain `DynamicLayer`s, with nothing (offloading) in
    its own `update`: what the forward does with it is one `layer.update(keys, values)` per layer."""
    return (type(cache) is DynamicCache and not getattr(cache, "offloading", False) and len(cache.layers) == num_layers
            and all(type(layer) is DynamicLayer for layer in cache.layers))


def _full_forward(body: torch.nn.Module, cache: DynamicCache | None = None
                  ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    run = _body_runner(body)
    layers = [None] * body.config.num_hidden_layers if cache is None else cache.layers

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # the mask sized against the cache before this forward's keys go in, as the forward builds it
        mask = lambda embeds: create_causal_mask(config=body.config, inputs_embeds=embeds,  # noqa: E731
                                                 attention_mask=attention_mask, cache=cache, position_ids=position_ids)
        return run(input_ids, position_ids, mask, layers)

    return forward


def lean_decode_step(model: torch.nn.Module, linear: Callable[[torch.nn.Module], Callable] | None = None,
                     attention: Callable | None = None) -> DecodeStep | None:
    """A causal LM's lean decode step, or None where its forward must run (see `lean_unsupported`;
    in train mode too).

    `linear(module)` gives the function a plain projection layer (`Linear`, GPT-2's `Conv1D`) runs as
    (default: the ops its forward calls), and `attention(attn, query, key, value, mask)` the attention
    over what the cache layers' `update` returned (default: SDPA); the compiled decode step
    (models/compiled_decode.py) passes prepacked weights and its own cache this way.

    A step takes the new tokens [batch, 1], their positions [batch, 1], the cache's layers (each
    with `update(keys, values) -> (keys, values)` over all cached positions) and the mask
    transformers' SDPA path builds for one query token (None when no key is padding, else a
    boolean [batch, 1, 1, keys]), and returns the next-token logits [batch, vocab].
    """
    if not _lean_causal_lm(model):
        return None
    body = model.base_model
    linear = linear or _direct
    run = _body_runner(body, one_query=True, linear=linear, attention=attention)
    head = linear(model.lm_head)
    return lambda tokens, positions, layers, mask: head(run(tokens, positions, lambda embeds: mask, layers))[:, -1]


def _is_causal_lm(model: torch.nn.Module) -> bool:
    return bool(_known(model, "LMHeadModel") or _known(model, "ForCausalLM"))


def _lean_causal_lm(model: torch.nn.Module) -> bool:
    """A causal LM the lean passes can run: a known one, in eval mode (they leave dropout out)."""
    return not model.training and _is_causal_lm(model) and not lean_unsupported(model)


def _body_runner(body: torch.nn.Module, one_query: bool = False, linear: Callable | None = None,
                 attention: Callable | None = None) -> Callable:
    """`(input_ids, positions, mask_of, layers) -> last hidden state` of a GPT-2 or Llama-shaped body;
    `one_query` for decode steps (one new token per row); `linear` and `attention` as in `lean_decode_step`."""
    linear = linear or _direct
    if _known(body, "Model") == "gpt2":
        return _gpt2_runner(body, one_query, linear, attention)
    return _llama_runner(body, linear, attention)


def _direct(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """`module`'s forward without the module call around it (the same ops, with the same arguments) for
    the plain layers the lean passes meet: at a decode step's sizes the call costs a few microseconds
    of a layer's tens. Anything else, or a layer with hooks (adapters, offloading), is the module itself.
    """
    if not _plain(module):
        return module
    cls = type(module)
    if cls is torch.nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    if cls is Conv1D:  # GPT-2's projections: x @ weight + bias
        weight, bias, out_features = module.weight, module.bias, module.nf
        return lambda x: torch.addmm(bias, x.view(-1, x.size(-1)), weight).view(x.size()[:-1] + (out_features,))
    if cls is torch.nn.LayerNorm:
        shape, weight, bias, eps = module.normalized_shape, module.weight, module.bias, module.eps
        return lambda x: F.layer_norm(x, shape, weight, bias, eps)
    if cls is torch.nn.Embedding:
        m = module
        return lambda ids: F.embedding(ids, m.weight, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq,
                                       m.sparse)
    if cls in (GELUTanh, GELUActivation):  # forward: self.act(input)
        return module.act
    if cls is torch.nn.SiLU:
        inplace = module.inplace
        return lambda x: F.silu(x, inplace=inplace)
    return F.silu  # SiLUActivation


def projection_weight(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The weight [out, in] (a view for GPT-2's `Conv1D`, which stores [in, out]) and bias of a plain projection
    layer a lean pass runs as its ops, or None for anything else (hooks, adapters, other classes)."""
    if not _plain(module) or type(module) not in (torch.nn.Linear, Conv1D):
        return None
    return (module.weight.t() if type(module) is Conv1D else module.weight), module.bias


def _plain(module: torch.nn.Module) -> bool:
    """A layer of a class `_PLAIN_FORWARDS` knows, with its forward as seen at import (not replaced on the
    instance or the class, as kernels' `kernelize` does) and nothing that only a module call runs."""
    cls = type(module)
    return not _hooked(module) and "forward" not in vars(module) and cls.forward is _PLAIN_FORWARDS.get(cls)


def _hooked(module: torch.nn.Module) -> bool:
    """Hooks, an accelerate hook (offloading, device placement) or a compiled call: what only a module call runs."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or hasattr(module, "_hf_hook")
                or getattr(module, "_compiled_call_impl", None) is not None
                or torch.nn.modules.module._global_backward_hooks or torch.nn.modules.module._global_backward_pre_hooks)


def _direct_mlp(mlp: torch.nn.Module, linear: Callable = _direct) -> Callable[[torch.Tensor], torch.Tensor]:
    """GPT2MLP (eval: dropout is the identity) or a Llama-shaped gated MLP, composed of its layers' `_direct`
    forms; any other MLP, or one with hooks, is the module itself."""
    if not _plain(mlp):
        return mlp
    cls = type(mlp)
    if cls is GPT2MLP and not mlp.dropout.training:
        c_fc, act, c_proj = linear(mlp.c_fc), _direct(mlp.act), linear(mlp.c_proj)
        return lambda x: c_proj(act(c_fc(x)))
    if cls in _GATED_MLPS:
        gate, up, down, act = linear(mlp.gate_proj), linear(mlp.up_proj), linear(mlp.down_proj), _direct(mlp.act_fn)
        return lambda x: down(act(gate(x)) * up(x))
    return mlp


def _gpt2_runner(body: torch.nn.Module, one_query: bool, linear: Callable = _direct,
                 attention: Callable | None = None) -> Callable:
    # GPT2Model.forward and GPT2Block.forward in eval mode, op for op (dropout is the identity)
    wte, wpe, ln_f = _direct(body.wte), _direct(body.wpe), _direct(body.ln_f)
    blocks = [(b.attn, _direct(b.ln_1), linear(b.attn.c_attn), linear(b.attn.c_proj), _direct(b.ln_2),
               _direct_mlp(b.mlp, linear)) for b in body.h]
    # one query token and no key/value groups: SDPA's call without `sdpa_attention_forward`'s checks around it
    attend = attention or (_one_query_attention if one_query and not hasattr(body.h[0].attn, "num_key_value_groups")
                           else _attention)

    def run(input_ids: torch.Tensor, positions: torch.Tensor, mask_of: Callable, layers: list) -> torch.Tensor:
        embeds = wte(input_ids)
        hidden = embeds + wpe(positions)
        mask = mask_of(embeds)
        for (attn, ln_1, c_attn, c_proj, ln_2, mlp), layer in zip(blocks, layers):
            residual = hidden
            query, key, value = c_attn(ln_1(hidden)).split(attn.split_size, dim=2)
            shape = (*key.shape[:-1], -1, attn.head_dim)
            key, value = key.view(shape).transpose(1, 2), value.view(shape).transpose(1, 2)
            if layer is not None:
                key, value = layer.update(key, value)
            out = attend(attn, query.view(shape).transpose(1, 2), key, value, mask)
            hidden = c_proj(out.reshape(*out.shape[:-2], -1).contiguous()) + residual
            residual = hidden
            hidden = residual + mlp(ln_2(hidden))
        return ln_f(hidden)

    return run


def _attention(attn: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
    return sdpa_attention_forward(attn, query, key, value, mask, dropout=0.0, scaling=attn.scaling)[0]


def _one_query_attention(attn: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor:
    # what `sdpa_attention_forward` does for one query token without key/value groups (GPT-2): not causal
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, scale=attn.scaling,
                                          is_causal=False).transpose(1, 2).contiguous()


def _llama_runner(body: torch.nn.Module, linear: Callable = _direct, attention: Callable | None = None) -> Callable:
    # LlamaModel.forward and LlamaDecoderLayer.forward in eval mode, op for op (Mistral's and Qwen2's are
    # Llama's; Qwen3 normalises each head's queries and keys before the rotation)
    apply_rotary_pos_emb = sys.modules[type(body).__module__].apply_rotary_pos_emb  # the model's own
    embed, norm = _direct(body.embed_tokens), body.norm
    attend = attention or _attention
    decoders = [(d.self_attn, d.input_layernorm, linear(d.self_attn.q_proj), linear(d.self_attn.k_proj),
                 linear(d.self_attn.v_proj), linear(d.self_attn.o_proj), d.post_attention_layernorm,
                 _direct_mlp(d.mlp, linear)) for d in body.layers[: body.config.num_hidden_layers]]

    def run(input_ids: torch.Tensor, positions: torch.Tensor, mask_of: Callable, layers: list) -> torch.Tensor:
        hidden = embed(input_ids)
        mask = mask_of(hidden)
        cos, sin = body.rotary_emb(hidden, position_ids=positions)
        for (attn, input_norm, q_proj, k_proj, v_proj, o_proj, post_norm, mlp), layer in zip(decoders, layers):
            residual = hidden
            normed = input_norm(hidden)
            input_shape = normed.shape[:-1]
            shape = (*input_shape, -1, attn.head_dim)
            query, key = q_proj(normed).view(shape), k_proj(normed).view(shape)
            if hasattr(attn, "q_norm"):
                query, key = attn.q_norm(query), attn.k_norm(key)
            query, key = query.transpose(1, 2), key.transpose(1, 2)
            value = v_proj(normed).view(shape).transpose(1, 2)
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            if layer is not None:
                key, value = layer.update(key, value)
            out = attend(attn, query, key, value, mask)
            hidden = residual + o_proj(out.reshape(*input_shape, -1).contiguous())
            residual = hidden
            hidden = residual + mlp(post_norm(hidden))
        return norm(hidden)

    return run
