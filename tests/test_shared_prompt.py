"""Prompt sharing: each prompt computed once per group gives the per-row path's log-probs and gradients."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from quartet.models.loading import load_causal_lm
from quartet.models.policy import response_logits
from quartet.models.shared_prompt import (
    grouped_response_logits,
    prompt_sharing_supported,
    shared_prompt_logits,
    unique_prompts,
)
from quartet.rl.logprobs import token_logprobs


def _tiny_gpt2(tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config).eval()


def _model(arch, lm_dir, tokenizer):
    return load_causal_lm(lm_dir).eval() if arch == "llama" else _tiny_gpt2(tokenizer)


def _batch(pad_id, n, padded=True):
    """G=3 left-padded prompts (0, 2 and 4 pads) and G*n right-padded responses of lengths 1..5."""
    gen = torch.Generator().manual_seed(0)
    prompt_lens, prompt_width, response_width = ([6, 4, 2] if padded else [6, 6, 6]), 6, 5
    prompt_ids = torch.full((3, prompt_width), pad_id)
    for g, length in enumerate(prompt_lens):
        prompt_ids[g, prompt_width - length:] = torch.randint(10, 200, (length,), generator=gen)
    prompt_mask = (torch.arange(prompt_width) >= prompt_width - torch.tensor(prompt_lens)[:, None]).long()
    rows = 3 * n
    lengths = torch.tensor([5, 1, 3, 2, 5, 4, 1, 5, 3][:rows]) if padded else torch.full((rows,), response_width)
    response_mask = (torch.arange(response_width) < lengths[:, None]).long()  # [G*n, R]
    response_ids = torch.randint(10, 200, (rows, response_width), generator=gen).masked_fill(response_mask == 0, pad_id)
    return prompt_ids, prompt_mask, response_ids, response_mask


def _expanded(prompt_ids, prompt_mask, response_ids, response_mask, n):
    sequences = torch.cat([prompt_ids.repeat_interleave(n, 0), response_ids], 1)
    attention_mask = torch.cat([prompt_mask.repeat_interleave(n, 0), response_mask], 1)
    return sequences, attention_mask


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("n, padded", [(3, True), (1, True), (3, False)], ids=["groups", "n=1", "no-padding"])
def test_shared_prompt_logprobs_equal_the_per_row_path(lm_dir, tokenizer, arch, n, padded):
    model = _model(arch, lm_dir, tokenizer)
    prompt_ids, prompt_mask, response_ids, response_mask = _batch(tokenizer.pad_token_id, n, padded)
    sequences, attention_mask = _expanded(prompt_ids, prompt_mask, response_ids, response_mask, n)
    with torch.no_grad():
        expected = token_logprobs(response_logits(model, sequences, attention_mask, response_ids), response_ids)
        shared = token_logprobs(shared_prompt_logits(model, prompt_ids, prompt_mask, response_ids, response_mask, n),
                                response_ids)
        grouped = token_logprobs(grouped_response_logits(model, sequences, attention_mask, response_ids, n),
                                 response_ids)
    valid = response_mask.bool()
    torch.testing.assert_close(shared[valid], expected[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(grouped[valid], expected[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prompt_gradients_equal_the_per_row_path(lm_dir, tokenizer, arch):
    """Every parameter's gradient, the prompt-only computation's included, adds up over the group's rows."""
    model, n = _model(arch, lm_dir, tokenizer), 3
    prompt_ids, prompt_mask, response_ids, response_mask = _batch(tokenizer.pad_token_id, n)
    sequences, attention_mask = _expanded(prompt_ids, prompt_mask, response_ids, response_mask, n)
    weights = torch.randn(response_ids.shape, generator=torch.Generator().manual_seed(1)) * response_mask

    def grads(logits):
        model.zero_grad()
        (weights * token_logprobs(logits, response_ids)).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    expected = grads(response_logits(model, sequences, attention_mask, response_ids))
    shared = grads(shared_prompt_logits(model, prompt_ids, prompt_mask, response_ids, response_mask, n))
    assert expected.keys() == shared.keys()
    for name in expected:
        torch.testing.assert_close(shared[name], expected[name], atol=1e-5, rtol=0, msg=name)


def test_unique_prompts_takes_one_row_per_group_and_rejects_mixed_groups(tokenizer):
    prompt_ids, prompt_mask, _, _ = _batch(tokenizer.pad_token_id, 3)
    rows, masks = prompt_ids.repeat_interleave(3, 0), prompt_mask.repeat_interleave(3, 0)
    ids, mask = unique_prompts(rows, masks, 3)
    assert torch.equal(ids, prompt_ids) and torch.equal(mask, prompt_mask)
    mixed = rows.clone()
    mixed[4, -1] += 1  # the second group's middle row has another prompt
    with pytest.raises(ValueError, match="group 1"):
        unique_prompts(mixed, masks, 3)
    with pytest.raises(ValueError, match="whole groups"):
        unique_prompts(rows[:8], masks[:8], 3)


def test_prompt_sharing_is_refused_where_the_cached_forward_differs(lm_dir, tokenizer):
    for model in (load_causal_lm(lm_dir).eval(), _tiny_gpt2(tokenizer)):
        assert prompt_sharing_supported(model) == (True, "full-attention KV cache")
    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2)
    sliding = Qwen2ForCausalLM(Qwen2Config(**small, use_sliding_window=True, sliding_window=4, max_window_layers=0))
    ok, reason = prompt_sharing_supported(sliding.eval())
    assert not ok and "DynamicSlidingWindowLayer" in reason
    dynamic_rope = LlamaForCausalLM(LlamaConfig(**small, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                          "rope_theta": 10000.0}))
    ok, reason = prompt_sharing_supported(dynamic_rope.eval())
    assert not ok and "dynamic" in reason
    checkpointed = load_causal_lm(lm_dir)
    checkpointed.gradient_checkpointing_enable()
    ok, reason = prompt_sharing_supported(checkpointed.train())
    assert not ok and "gradient checkpointing" in reason
    prompt_ids, prompt_mask, response_ids, response_mask = _batch(0, 1)
    with pytest.raises(ValueError, match="sliding"):
        shared_prompt_logits(sliding, prompt_ids % 64, prompt_mask, response_ids % 64, response_mask, 1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_scoring_and_training_take_the_shared_logits_in_pieces_with_the_concatenated_numbers(lm_dir, tokenizer, arch):
    """Scoring and the update read the first token's logits and the rest's apart (no concatenated copy):
    log-probs, entropies and gradients equal those of the concatenated logits bit for bit, and the
    per-row path's within 1e-5."""
    from quartet.models.policy import ActorCritic, logprobs_and_entropy, response_logprobs
    from quartet.rl import token_logprobs_inplace

    model, n = _model(arch, lm_dir, tokenizer), 3
    prompt_ids, prompt_mask, response_ids, response_mask = _batch(tokenizer.pad_token_id, n)
    sequences, attention_mask = _expanded(prompt_ids, prompt_mask, response_ids, response_mask, n)
    with torch.no_grad():
        scored = response_logprobs(model, sequences, attention_mask, response_ids, 0.7, group_size=n)
        joined = token_logprobs_inplace(grouped_response_logits(model, sequences, attention_mask, response_ids, n),
                                        response_ids, 0.7)
        per_row = response_logprobs(model, sequences, attention_mask, response_ids, 0.7)
    valid = response_mask.bool()
    assert torch.equal(scored, joined)
    torch.testing.assert_close(scored[valid], per_row[valid], atol=1e-5, rtol=0)

    pair = ActorCritic(model).eval()
    weights = torch.randn(response_ids.shape, generator=torch.Generator().manual_seed(1)) * response_mask

    def grads(logprobs):
        model.zero_grad()
        (weights * logprobs).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    logprobs, entropy, _ = pair(sequences, attention_mask, response_ids, 0.7, True, n)
    got = grads(logprobs)
    expected, expected_entropy = logprobs_and_entropy(
        grouped_response_logits(model, sequences, attention_mask, response_ids, n), response_ids, 0.7, True)
    assert torch.equal(logprobs, expected) and torch.equal(entropy, expected_entropy)
    assert all(torch.equal(a, b) for a, b in zip(got, grads(expected)))
