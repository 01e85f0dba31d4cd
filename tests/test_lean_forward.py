"""Lean passes (models/lean.py): decode steps sample, and full forwards compute (gradients included),
exactly what the models' own forwards do."""

import pytest
import torch
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import quartet.models.forward as forward_module
import quartet.models.lean as lean
import quartet.rollout.generate as generate
from quartet.config import SamplingConfig
from quartet.models.forward import causal_lm_logits, token_values
from quartet.models.lean import lean_causal_lm_body, lean_decode_step, lean_unsupported
from quartet.models.shared_prompt import shared_prompt_logits
from quartet.rollout.generate import sample_responses

EOS, PAD, VOCAB = 1, 0, 97


LLAMA_SHAPED = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                "qwen3": (Qwen3Config, Qwen3ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                "mistral-sliding": (MistralConfig, MistralForCausalLM)}


def _model(arch: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    special = dict(pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS)
    if arch.startswith("gpt2"):  # stock GPT-2's gelu_new (a module), or the one-kernel GELU the benchmarks use
        config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                            scale_attn_by_inverse_layer_idx=True, **special,
                            activation_function="gelu_pytorch_tanh" if arch == "gpt2-tanh" else "gelu_new")
        model = GPT2LMHeadModel(config)
    else:  # grouped-query attention: two query heads per key/value head
        config_class, model_class = LLAMA_SHAPED[arch]
        config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                              **special)
        if arch.startswith("mistral"):  # a window shorter than prompt + answer: sliding-window cache layers
            config.sliding_window = 9 if arch == "mistral-sliding" else None
        model = model_class(config)
    config._attn_implementation = attn
    return model.eval()


def _prompts():
    """Four prompts, two of them left-padded (so the decode masks are not all ones)."""
    ids = torch.tensor([[PAD, PAD, 11, 12, 13, 14], [21, 22, 23, 24, 25, 26],
                        [PAD, PAD, PAD, PAD, 31, 32], [41, 42, 43, 44, 45, 46]])
    return ids, (ids != PAD).long()


def _sample(model, ids, mask, cfg, n, lean: bool, monkeypatch):
    if not lean:
        monkeypatch.setattr(generate, "lean_decode_step", lambda model: None)
    try:
        return sample_responses(model, ids, mask, cfg, EOS, PAD, generator=torch.Generator().manual_seed(5), n=n)
    finally:
        monkeypatch.undo()


def _counted_steps(monkeypatch, arch: str) -> list[int]:
    """Counts the lean steps taken (each decode step after the prefill's token)."""
    calls: list[int] = []
    name = "_gpt2_runner" if arch.startswith("gpt2") else "_llama_runner"
    original = getattr(lean, name)

    def counted_runner(*args):
        run = original(*args)
        return lambda *inputs: calls.append(1) or run(*inputs)

    monkeypatch.setattr(lean, name, counted_runner)
    return calls


@pytest.mark.parametrize("arch", ["gpt2", "gpt2-tanh", "llama"])
@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "unpadded"])
@pytest.mark.parametrize("n, cfg", [
    (1, SamplingConfig(max_new_tokens=12, temperature=0.8)),
    (3, SamplingConfig(max_new_tokens=12, temperature=1.2, top_k=30, top_p=0.9, min_new_tokens=3)),
    (2, SamplingConfig(max_new_tokens=12, greedy=True)),
], ids=["plain", "groups-top-k-top-p", "greedy"])
def test_lean_steps_sample_bit_identical_tokens_and_logprobs(monkeypatch, arch, padded, n, cfg):
    model = _model(arch)
    ids, mask = _prompts()
    if not padded:
        ids, mask = ids[[1, 3]], mask[[1, 3]]
    calls = _counted_steps(monkeypatch, arch)
    lean = sample_responses(model, ids, mask, cfg, EOS, PAD, generator=torch.Generator().manual_seed(5), n=n)
    monkeypatch.undo()
    assert len(calls) == lean.response_ids.shape[1] - 1  # every token after the prefill's came from a lean step
    forward = _sample(model, ids, mask, cfg, n, lean=False, monkeypatch=monkeypatch)
    assert torch.equal(lean.response_ids, forward.response_ids)
    assert torch.equal(lean.response_mask, forward.response_mask)
    assert torch.equal(lean.logprobs, forward.logprobs)  # bit for bit, not within a tolerance
    assert lean.response_mask.sum() > 4 * len(ids)  # the rows really decoded


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral", "mistral-sliding"])
def test_llama_shaped_models_decode_bit_identically(monkeypatch, arch):
    """Qwen2 (projection biases), Qwen3 (per-head query/key norms), Mistral; with a sliding window the
    cache layers are not preallocated, so the steps go through the forward."""
    model = _model(arch)
    ids, mask = _prompts()
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.1, top_k=40)
    calls = _counted_steps(monkeypatch, arch)
    lean = sample_responses(model, ids, mask, cfg, EOS, PAD, generator=torch.Generator().manual_seed(5), n=2)
    monkeypatch.undo()
    assert len(calls) == (0 if arch == "mistral-sliding" else lean.response_ids.shape[1] - 1)
    forward = _sample(model, ids, mask, cfg, 2, lean=False, monkeypatch=monkeypatch)
    assert torch.equal(lean.response_ids, forward.response_ids)
    assert torch.equal(lean.logprobs, forward.logprobs)
    assert lean.response_mask.sum() > 4 * len(ids)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lean_steps_match_the_forward_under_bf16_autocast(monkeypatch, arch):
    model = _model(arch)
    ids, mask = _prompts()
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean = _sample(model, ids, mask, cfg, 2, lean=True, monkeypatch=monkeypatch)
        forward = _sample(model, ids, mask, cfg, 2, lean=False, monkeypatch=monkeypatch)
    assert torch.equal(lean.response_ids, forward.response_ids)
    assert torch.equal(lean.logprobs, forward.logprobs)


def test_hooks_on_called_submodules_still_run_in_lean_steps(monkeypatch):
    """Adapters and hooks live on the projections and heads, which lean steps call as modules."""
    model = _model("gpt2")
    bias = torch.zeros(VOCAB)
    bias[7] = 50.0  # the hook makes token 7 certain
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    assert lean_unsupported(model) == ""
    ids, mask = _prompts()
    rollout = _sample(model, ids, mask, SamplingConfig(max_new_tokens=5), 1, lean=True, monkeypatch=monkeypatch)
    assert (rollout.response_ids == 7).all()


def test_plain_layers_run_as_their_ops_and_others_as_modules(monkeypatch):
    """Lean passes call a plain layer's ops without the module call; a layer with a hook, a replaced
    forward or a class they do not know is called as a module, so what it adds still happens."""
    model = _model("gpt2-tanh")
    block = model.transformer.h[0]
    for module in (model.transformer.wte, model.transformer.wpe, block.ln_1, block.attn.c_attn, block.mlp.act,
                   model.transformer.ln_f, model.lm_head):
        assert lean._direct(module) is not module, type(module).__name__
    assert lean._direct_mlp(block.mlp) is not block.mlp
    for arch in ("llama", "qwen3"):
        decoder = _model(arch).model.layers[0]
        assert lean._direct(decoder.self_attn.q_proj) is not decoder.self_attn.q_proj
        assert lean._direct(decoder.mlp.act_fn) is not decoder.mlp.act_fn
        assert lean._direct_mlp(decoder.mlp) is not decoder.mlp
    stock_gelu = _model("gpt2").transformer.h[0].mlp.act  # NewGELUActivation: several ops in Python
    assert lean._direct(stock_gelu) is stock_gelu
    mlp = model.transformer.h[1].mlp
    mlp.act.forward = lambda x: x  # replaced, as kernels' `kernelize` does: what the MLP then computes
    assert lean._direct(mlp.act) is mlp.act
    x = torch.randn(2, 32)
    assert torch.equal(lean._direct_mlp(mlp)(x), mlp.c_proj(mlp.c_fc(x)))

    inputs: list[torch.Size] = []
    block.mlp.c_fc.register_forward_hook(lambda module, args, out: inputs.append(args[0].shape))
    assert lean._direct(block.mlp.c_fc) is block.mlp.c_fc and lean._direct_mlp(block.mlp) is not block.mlp
    block.attn.c_proj.register_forward_pre_hook(lambda module, args: None)
    assert lean._direct(block.attn.c_proj) is block.attn.c_proj
    ids, mask = _prompts()
    calls = _counted_steps(monkeypatch, "gpt2-tanh")
    rollout = sample_responses(model, ids, mask, SamplingConfig(max_new_tokens=5, min_new_tokens=5), EOS, PAD,
                               generator=torch.Generator().manual_seed(0))
    assert len(calls) == 4 and rollout.response_ids.shape == (4, 5)
    assert inputs == [torch.Size([4, 6, 32])] + [torch.Size([4, 1, 32])] * 4  # the prefill, then each lean step


def test_models_lean_steps_cannot_take_decode_through_their_forward(monkeypatch):
    eager = _model("gpt2", attn="eager")
    assert "'eager'" in lean_unsupported(eager)
    hooked = _model("llama")
    hooked.model.layers[0].register_forward_pre_hook(lambda mod, args: None)
    assert "hooks" in lean_unsupported(hooked)
    other = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2))
    assert "GPTNeoXForCausalLM is not one the lean passes know" in lean_unsupported(other)
    assert "not a plain Hugging Face model" in lean_unsupported(torch.nn.Linear(2, 2))
    training = _model("gpt2").train()
    assert lean_unsupported(training) == "" and lean_decode_step(training) is None  # dropout would be skipped
    # and they still sample (through the forward), with no lean step called
    calls = _counted_steps(monkeypatch, "gpt2")
    ids, mask = _prompts()
    rollout = sample_responses(eager, ids, mask, SamplingConfig(max_new_tokens=6), EOS, PAD,
                               generator=torch.Generator().manual_seed(0))
    assert rollout.response_ids.shape == (4, 6) and not calls


def _plain_forwards(monkeypatch):
    """Every forward through the model's own `forward` (the lean passes off)."""
    monkeypatch.setattr(forward_module, "lean_causal_lm_body", lambda model, cache=None: None)
    monkeypatch.setattr(forward_module, "lean_body", lambda body: None)


def _logits_and_grads(model, ids, mask, keep, scalar):
    model.zero_grad(set_to_none=True)
    if scalar:
        out = token_values(model, ids, mask)
    else:
        out = causal_lm_logits(model, ids, mask, logits_to_keep=keep)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _classifier(arch: str):
    from transformers import GPT2ForSequenceClassification, LlamaForSequenceClassification

    causal = _model(arch)
    config = causal.config
    config.num_labels = 1
    torch.manual_seed(1)
    cls = GPT2ForSequenceClassification if arch.startswith("gpt2") else LlamaForSequenceClassification
    return cls(config).eval()


# causal LMs (all logits, the last 3 positions' only) and per-token values of sequence classifiers
FORWARDS = [(arch, keep, False) for arch in ("gpt2", "gpt2-tanh", "llama", "qwen2", "qwen3", "mistral")
            for keep in (0, 3)]
FORWARDS += [("gpt2-tanh", 0, True), ("llama", 0, True)]


@pytest.mark.parametrize("arch, keep, scalar", FORWARDS)
@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "unpadded"])
def test_lean_forwards_equal_the_models_forward_and_gradients_bit_for_bit(monkeypatch, arch, padded, keep, scalar):
    model = _classifier(arch) if scalar else _model(arch)
    ids, mask = _prompts()
    if not padded:
        ids, mask = ids[[1, 3]], mask[[1, 3]]
    calls = _counted_steps(monkeypatch, arch)
    lean_out, lean_grads = _logits_and_grads(model, ids, mask, keep, scalar)
    assert len(calls) == 1  # the lean body ran
    monkeypatch.undo()
    _plain_forwards(monkeypatch)
    plain_out, plain_grads = _logits_and_grads(model, ids, mask, keep, scalar)
    assert torch.equal(lean_out, plain_out)
    assert lean_grads.keys() == plain_grads.keys() and len(lean_grads) == len(list(model.parameters()))
    for name in plain_grads:
        assert torch.equal(lean_grads[name], plain_grads[name]), name


def test_lean_forwards_follow_bf16_autocast_and_leave_train_mode_to_the_model(monkeypatch):
    model = _model("llama")
    ids, mask = _prompts()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean_out = causal_lm_logits(model, ids, mask)
        with monkeypatch.context() as plain:
            _plain_forwards(plain)
            plain_out = causal_lm_logits(model, ids, mask)
    assert lean_out.dtype == torch.bfloat16 and torch.equal(lean_out, plain_out)
    model.train()  # dropout belongs to the model's forward: no lean pass in train mode
    calls = _counted_steps(monkeypatch, "llama")
    causal_lm_logits(model, ids, mask)
    assert not calls


def _shared_logits_and_grads(model, n):
    """Shared-prompt logits (a prefill into a KV cache, then the responses attending to it) for the four
    prompts x `n` samples, and every parameter's gradient of a weighted sum of them."""
    prompt_ids, prompt_mask = _prompts()
    torch.manual_seed(3)
    response_ids = torch.randint(2, VOCAB, (4 * n, 5))
    response_mask = torch.ones_like(response_ids)
    response_mask[1, 3:] = 0  # an answer that ended early: right padding inside the response forward
    model.zero_grad(set_to_none=True)
    out = shared_prompt_logits(model, prompt_ids, prompt_mask, response_ids, response_mask, n)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3", "mistral"])
def test_lean_cached_forwards_of_shared_prompts_equal_the_models_forward_bit_for_bit(monkeypatch, arch):
    model = _model(arch)
    calls = _counted_steps(monkeypatch, arch)
    lean_out, lean_grads = _shared_logits_and_grads(model, n=3)
    assert len(calls) == 2  # the prompts' forward and the responses' forward both ran lean
    monkeypatch.undo()
    _plain_forwards(monkeypatch)
    plain_out, plain_grads = _shared_logits_and_grads(model, n=3)
    assert torch.equal(lean_out, plain_out)
    assert lean_grads.keys() == plain_grads.keys() and len(lean_grads) == len(list(model.parameters()))
    for name in plain_grads:
        assert torch.equal(lean_grads[name], plain_grads[name]), name


def test_lean_cached_forwards_take_plain_dynamic_caches_only():
    model = _model("llama")
    assert lean_causal_lm_body(model, DynamicCache(config=model.config)) is not None
    assert lean_causal_lm_body(model, DynamicCache(config=model.config, offloading=True)) is None

    class OwnCache(DynamicCache):  # a subclass may do more in its update
        pass

    assert lean_causal_lm_body(model, OwnCache(config=model.config)) is None
    assert lean_causal_lm_body(model, DynamicCache()) is None  # layers made on first use: not all there
    sliding = _model("mistral-sliding")
    assert lean_causal_lm_body(sliding, DynamicCache(config=sliding.config)) is None
