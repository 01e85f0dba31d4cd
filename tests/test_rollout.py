"""Rollout: sampling log-probs equal a plain forward pass; masks stop at the first EOS."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from quartet.config import SamplingConfig
from quartet.models.forward import position_ids_from_mask
from quartet.models.loading import load_causal_lm
from quartet.models.policy import response_logprobs
from quartet.rollout.generate import filter_logits, sample_categorical, sample_responses


def _prompts(pad_id):
    ids = torch.tensor([[pad_id, pad_id, 11, 12, 13], [21, 22, 23, 24, 25], [pad_id, pad_id, pad_id, 31, 32]])
    return ids, (ids != pad_id).long()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_generation_logprobs_equal_forward_logprobs(lm_dir, tokenizer, temperature, top_k, top_p):
    model = load_causal_lm(lm_dir).eval()
    ids, mask = _prompts(tokenizer.pad_token_id)
    torch.manual_seed(0)
    cfg = SamplingConfig(max_new_tokens=12, temperature=temperature, top_k=top_k, top_p=top_p)
    rollout = sample_responses(model, ids, mask, cfg, tokenizer.eos_token_id, tokenizer.pad_token_id)
    with torch.no_grad():
        forward = response_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.response_ids, temperature)
    valid = rollout.response_mask.bool()
    torch.testing.assert_close(rollout.logprobs[valid], forward[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("padded", [True, False])
def test_rollout_with_and_without_prompt_padding_matches_the_scoring_forward(lm_dir, tokenizer, padded):
    """The sampled tokens' log-probs equal the scoring forward's, and each row samples what it samples alone."""
    model = load_causal_lm(lm_dir).eval()
    ids, mask = _prompts(tokenizer.pad_token_id)
    if not padded:
        ids, mask = ids[1:2].repeat(2, 1), mask[1:2].repeat(2, 1)  # the one full-length prompt, twice
    cfg = SamplingConfig(max_new_tokens=10, min_new_tokens=10, temperature=0.8)
    rollout = sample_responses(model, ids, mask, cfg, tokenizer.eos_token_id, tokenizer.pad_token_id,
                               generator=torch.Generator().manual_seed(3))
    forward = response_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.response_ids, 0.8)
    torch.testing.assert_close(rollout.logprobs, forward, atol=1e-5, rtol=0)
    alone = sample_responses(model, ids[-1:], mask[-1:], cfg, tokenizer.eos_token_id, tokenizer.pad_token_id,
                             generator=torch.Generator().manual_seed(3), row_offset=len(ids) - 1, total_rows=len(ids))
    assert torch.equal(alone.response_ids[0], rollout.response_ids[-1])
    torch.testing.assert_close(alone.logprobs[0], rollout.logprobs[-1], atol=1e-5, rtol=0)


def test_response_mask_stops_after_first_eos(lm_dir, tokenizer):
    model = load_causal_lm(lm_dir).eval()
    eos = tokenizer.eos_token_id
    bias = torch.zeros(len(tokenizer))
    bias[eos] = 5.0  # EOS likely enough that rows stop at different steps
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    ids, mask = _prompts(tokenizer.pad_token_id)
    torch.manual_seed(1)
    rollout = sample_responses(model, ids, mask, SamplingConfig(max_new_tokens=30), eos, tokenizer.pad_token_id)
    lengths = rollout.response_mask.sum(1)
    assert rollout.has_eos.all() and len(set(lengths.tolist())) > 1
    for row, row_mask, has_eos in zip(rollout.response_ids, rollout.response_mask, rollout.has_eos):
        n = int(row_mask.sum())
        assert row_mask[:n].all() and not row_mask[n:].any()  # one valid prefix
        if has_eos:
            assert row[n - 1] == eos and (row[: n - 1] != eos).all()
        assert (row[n:] == tokenizer.pad_token_id).all()


def test_min_new_tokens_blocks_eos(lm_dir, tokenizer):
    model = load_causal_lm(lm_dir).eval()
    ids, mask = _prompts(tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    bias = torch.zeros(len(tokenizer))
    bias[eos] = 50.0  # EOS would win every time
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    rollout = sample_responses(model, ids, mask, SamplingConfig(max_new_tokens=8, min_new_tokens=3), eos,
                               tokenizer.pad_token_id)
    assert rollout.response_mask.sum(1).tolist() == [4, 4, 4]  # three forced tokens, then EOS


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    # the smallest set whose probability reaches top_p (as Hugging Face's TopPLogitsWarper)
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.99)).tolist() == [[False, False, False, False]]


def test_sample_categorical_inverts_the_cumulative_distribution():
    probs = torch.tensor([[0.2, 0.3, 0.5]] * 5)
    # cumulative 0.2, 0.5, 1.0: a uniform u picks the first token whose cumulative exceeds u
    uniforms = torch.tensor([0.0, 0.1999, 0.2, 0.4999, 0.9999])
    assert sample_categorical(probs, uniforms).tolist() == [0, 0, 1, 1, 2]
    zero_first = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert sample_categorical(zero_first, torch.tensor([0.0, 0.0])).tolist() == [2, 1]  # never a zero-probability token
    unnormalised = torch.tensor([[2.0, 6.0]])  # only proportions matter
    assert sample_categorical(unnormalised, torch.tensor([0.24])).tolist() == [0]
    assert sample_categorical(unnormalised, torch.tensor([0.26])).tolist() == [1]


def test_sample_categorical_frequencies_match_probabilities():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    uniforms = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    tokens = sample_categorical(probs.expand(len(uniforms), 4), uniforms)
    frequencies = torch.bincount(tokens, minlength=4).float() / len(uniforms)
    torch.testing.assert_close(frequencies, probs, atol=5e-3, rtol=0)


def test_split_batch_samples_what_the_whole_batch_samples(lm_dir, tokenizer):
    """Ranks that each sample their rows of a global batch reproduce the one-process rollout."""
    model = load_causal_lm(lm_dir).eval()
    ids, mask = _prompts(tokenizer.pad_token_id)
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.9, top_k=30)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    whole = sample_responses(model, ids, mask, cfg, eos, pad, generator=torch.Generator().manual_seed(3))
    for start, end in ((0, 1), (1, 3)):
        rows = slice(start, end)
        width = int(mask[rows].sum(1).max())  # each share is padded to its own longest prompt
        part = sample_responses(model, ids[rows, -width:], mask[rows, -width:], cfg, eos, pad,
                                generator=torch.Generator().manual_seed(3), row_offset=start, total_rows=3)
        n = part.response_ids.shape[1]
        assert torch.equal(part.response_ids, whole.response_ids[rows, :n])
        assert not whole.response_mask[rows, n:].any()  # the whole batch ran on only for other rows
        torch.testing.assert_close(part.logprobs, whole.logprobs[rows, :n], atol=1e-5, rtol=0)


def _reference_sample(model, ids, mask, cfg, eos, pad, generator):
    """The plainest sampler: a full forward over prompt + response so far for every token, no KV cache."""
    seq, attn = ids, mask
    finished = torch.zeros(len(ids), dtype=torch.bool)
    temperature = 1.0 if cfg.greedy else cfg.temperature
    tokens, logprobs = [], []
    for t in range(cfg.max_new_tokens):
        with torch.no_grad():
            logits = model(input_ids=seq, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits[:, -1]
        scaled = logits / temperature
        logp = scaled.log_softmax(-1)
        if t < cfg.min_new_tokens:
            scaled = scaled.clone()
            scaled[:, eos] = float("-inf")
        if cfg.greedy:
            token = scaled.argmax(-1)
        else:
            probs = filter_logits(scaled, cfg.top_k, cfg.top_p).softmax(-1)
            token = sample_categorical(probs, torch.rand(len(ids), generator=generator))
        token = torch.where(finished, torch.full_like(token, pad), token)
        tokens.append(token)
        logprobs.append(logp.gather(1, token[:, None]).squeeze(1))
        finished |= token == eos
        if finished.all():
            break
        seq = torch.cat([seq, token[:, None]], 1)
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
    return torch.stack(tokens, 1), torch.stack(logprobs, 1)


def _tiny_gpt2(tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("cfg", [
    SamplingConfig(max_new_tokens=14, temperature=1.0),
    SamplingConfig(max_new_tokens=14, temperature=0.7, top_k=20, top_p=0.9),
    SamplingConfig(max_new_tokens=14, min_new_tokens=4, temperature=1.3),
    SamplingConfig(max_new_tokens=14, greedy=True),
], ids=["plain", "top-k-top-p", "min-new-tokens", "greedy"])
def test_sampler_matches_a_cache_free_reference_loop(lm_dir, tokenizer, arch, cfg):
    """The cached sampling loop draws the same tokens as recomputing the whole sequence every step."""
    model = load_causal_lm(lm_dir).eval() if arch == "llama" else _tiny_gpt2(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    bias = torch.zeros(model.config.vocab_size)
    bias[eos] = 4.0  # rows stop at different steps, and usually all stop before max_new_tokens
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    ids, mask = _prompts(pad)
    rollout = sample_responses(model, ids, mask, cfg, eos, pad, generator=torch.Generator().manual_seed(7))
    expected_ids, expected_logprobs = _reference_sample(model, ids, mask, cfg, eos, pad, torch.Generator().manual_seed(7))
    assert torch.equal(rollout.response_ids, expected_ids)
    valid = rollout.response_mask.bool()
    assert valid.sum() > 3 * cfg.min_new_tokens  # something was sampled beyond the forced prefix
    torch.testing.assert_close(rollout.logprobs[valid], expected_logprobs[valid], atol=1e-5, rtol=0)
    assert (rollout.logprobs[~valid] == 0).all()


def test_sampler_leaves_train_mode_and_returns_tensors_usable_in_autograd(lm_dir, tokenizer):
    model = load_causal_lm(lm_dir).train()
    ids, mask = _prompts(tokenizer.pad_token_id)
    rollout = sample_responses(model, ids, mask, SamplingConfig(max_new_tokens=4), tokenizer.eos_token_id,
                               tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    assert model.training
    logits = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask).logits[:, -5:-1]
    taken = logits.log_softmax(-1).gather(2, rollout.response_ids[:, :, None]).squeeze(2)
    (taken - rollout.logprobs).sum().backward()  # old log-probs and token ids enter the PPO loss graph
    assert model.lm_head.weight.grad is not None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_group_shares_one_prefill_and_samples_what_repeated_prompts_sample(lm_dir, tokenizer, arch):
    """n samples per prompt from one prefill (the KV cache repeated per group) = the prompts repeated n times."""
    model = load_causal_lm(lm_dir).eval() if arch == "llama" else _tiny_gpt2(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, mask = _prompts(pad)  # left-padded prompts of three lengths
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.9, top_k=30)
    grouped = sample_responses(model, ids, mask, cfg, eos, pad, generator=torch.Generator().manual_seed(3), n=4)
    repeated = sample_responses(model, ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), cfg, eos, pad,
                                generator=torch.Generator().manual_seed(3))
    assert grouped.response_ids.shape[0] == 12 and torch.equal(grouped.prompt_ids, repeated.prompt_ids)
    assert torch.equal(grouped.response_ids, repeated.response_ids)
    assert torch.equal(grouped.response_mask, repeated.response_mask)
    torch.testing.assert_close(grouped.logprobs, repeated.logprobs, atol=1e-5, rtol=0)
    assert len({tuple(r) for r in grouped.response_ids[:4].tolist()}) > 1  # the group's samples differ
    # and the shared prefill's log-probs are those of a plain forward pass over each row
    forward = response_logprobs(model, grouped.sequences, grouped.attention_mask, grouped.response_ids, 0.9)
    valid = grouped.response_mask.bool()
    torch.testing.assert_close(grouped.logprobs[valid], forward[valid], atol=1e-5, rtol=0)


def test_a_group_split_over_ranks_samples_what_one_process_samples(lm_dir, tokenizer):
    model = load_causal_lm(lm_dir).eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, mask = _prompts(pad)
    cfg = SamplingConfig(max_new_tokens=8)
    whole = sample_responses(model, ids, mask, cfg, eos, pad, generator=torch.Generator().manual_seed(5), n=2)
    first = sample_responses(model, ids[:1], mask[:1], cfg, eos, pad, generator=torch.Generator().manual_seed(5),
                             row_offset=0, total_rows=6, n=2)
    rest = sample_responses(model, ids[1:], mask[1:], cfg, eos, pad, generator=torch.Generator().manual_seed(5),
                            row_offset=2, total_rows=6, n=2)
    width = first.response_ids.shape[1]
    assert torch.equal(whole.response_ids[:2, :width], first.response_ids)
    assert torch.equal(whole.response_ids[2:, :rest.response_ids.shape[1]], rest.response_ids)
