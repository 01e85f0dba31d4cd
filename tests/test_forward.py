"""Forward passes: padding on either side changes no log-prob, value or score."""

import pytest
import torch

from quartet.models.forward import (
    causal_lm_logits,
    head_parameters,
    in_row_chunks,
    last_token_index,
    scoring_rows,
    sequence_scores,
    share_trunk,
    token_values,
    vocab_size,
)
from quartet.models.loading import load_causal_lm, load_scalar_model
from quartet.rl.logprobs import token_logprobs


def _pad(rows, pad_id, side):
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        pad = [pad_id] * (width - len(r))
        ids.append(pad + r if side == "left" else r + pad)
        mask.append([0] * len(pad) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * len(pad))
    return torch.tensor(ids), torch.tensor(mask)


ROWS = [[5, 17, 42, 9, 33, 21], [8, 3, 77], [61, 62, 63, 64]]


def test_last_token_index_for_both_paddings():
    _, right = _pad(ROWS, 0, "right")
    _, left = _pad(ROWS, 0, "left")
    assert last_token_index(right).tolist() == [5, 2, 3]
    assert last_token_index(left).tolist() == [5, 5, 5]


def test_logprobs_do_not_depend_on_padding_side(lm_dir, tokenizer):
    model = load_causal_lm(lm_dir).eval()
    per_row = {}
    for side in ("left", "right"):
        ids, mask = _pad(ROWS, tokenizer.pad_token_id, side)
        with torch.no_grad():
            logp = token_logprobs(causal_lm_logits(model, ids, mask)[:, :-1], ids[:, 1:])
        for i, row in enumerate(ROWS):
            n = len(row) - 1
            per_row[(side, i)] = logp[i, -n:] if side == "left" else logp[i, :n]
    for i, row in enumerate(ROWS):
        alone = torch.tensor([row])
        with torch.no_grad():
            expected = token_logprobs(causal_lm_logits(model, alone, torch.ones_like(alone))[:, :-1], alone[:, 1:])[0]
        torch.testing.assert_close(per_row[("left", i)], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(per_row[("right", i)], expected, atol=1e-5, rtol=0)


def test_values_and_scores_do_not_depend_on_padding_side(scalar_dir, tokenizer):
    model = load_scalar_model(scalar_dir).eval()
    with torch.no_grad():
        left_ids, left_mask = _pad(ROWS, tokenizer.pad_token_id, "left")
        right_ids, right_mask = _pad(ROWS, tokenizer.pad_token_id, "right")
        left_scores = sequence_scores(model, left_ids, left_mask)
        right_scores = sequence_scores(model, right_ids, right_mask)
        left_values = token_values(model, left_ids, left_mask)
        for i, row in enumerate(ROWS):
            alone = torch.tensor([row])
            values = token_values(model, alone, torch.ones_like(alone))[0]
            torch.testing.assert_close(left_values[i, -len(row):], values, atol=1e-5, rtol=0)
            torch.testing.assert_close(left_scores[i], values[-1], atol=1e-5, rtol=0)
    torch.testing.assert_close(left_scores, right_scores, atol=1e-5, rtol=0)


def test_logits_to_keep_matches_full_head(lm_dir):
    model = load_causal_lm(lm_dir).eval()
    ids = torch.tensor([ROWS[0]])
    with torch.no_grad():
        full = causal_lm_logits(model, ids, torch.ones_like(ids))
        tail = causal_lm_logits(model, ids, torch.ones_like(ids), logits_to_keep=3)
    torch.testing.assert_close(tail, full[:, -3:], atol=1e-5, rtol=0)


def test_scoring_in_row_chunks_gives_the_whole_batch_numbers(lm_dir, scalar_dir, tokenizer):
    """PPO scores rollouts a few rows at a time (ppo.forward_batch_size): the same log-probs and scores."""
    from quartet.models.policy import response_logprobs

    rows = ROWS + [[11, 12], [90, 91, 92, 93, 94], [7]]
    ids, mask = _pad(rows, tokenizer.pad_token_id, "left")
    response = ids[:, -2:]
    lm, scorer = load_causal_lm(lm_dir).eval(), load_scalar_model(scalar_dir).eval()
    with torch.no_grad():
        for size in (1, 4, 6, 100):  # one row, uneven chunks, the whole batch, more than the batch
            logprobs = in_row_chunks(lambda i, m, r: response_logprobs(lm, i, m, r, 0.7), size, ids, mask, response)
            torch.testing.assert_close(logprobs, response_logprobs(lm, ids, mask, response, 0.7), atol=1e-5, rtol=0)
            scores = in_row_chunks(lambda i, m: sequence_scores(scorer, i, m), size, ids, mask)
            torch.testing.assert_close(scores, sequence_scores(scorer, ids, mask), atol=1e-5, rtol=0)
    calls = []
    in_row_chunks(lambda x: calls.append(len(x)) or x, 4, torch.zeros(10, 3))
    assert calls == [4, 4, 2]


def test_ppo_forward_equals_a_plain_forward_over_the_whole_sequence(lm_dir, scalar_dir, tokenizer):
    """The PPO forward skips the last position (nothing is read there): the same log-probs and values
    as a plain forward over prompt + response, with left-padded prompts and right-padded responses."""
    from quartet.models.policy import ActorCritic

    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = _pad([[5, 17, 42], [8], [61, 62]], pad, "left")
    response_ids, response_mask = _pad([[9, 33, 21, 4], [3, 77], [63, 64, 65, 66]], pad, "right")
    seq, mask = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1)
    pair = ActorCritic(load_causal_lm(lm_dir), load_scalar_model(scalar_dir)).eval()
    with torch.no_grad():
        logprobs, entropy, values = pair(seq, mask, response_ids, 0.7)
        p = prompt_ids.shape[1]
        plain_logprobs = token_logprobs(causal_lm_logits(pair.actor, seq, mask)[:, p - 1 : -1], response_ids, 0.7)
        plain_values = token_values(pair.critic.model, seq, mask)[:, p - 1 : -1]
    valid = response_mask.bool()
    assert logprobs.shape == values.shape == entropy.shape == response_ids.shape
    torch.testing.assert_close(logprobs[valid], plain_logprobs[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(values[valid], plain_values[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_entropy", [True, False])
def test_training_forward_scales_in_place_with_the_plain_paths_numbers_and_gradients(lm_dir, tokenizer, with_entropy):
    """The update's forward divides its fresh logits by the temperature in place: log-probs, entropy and
    every gradient equal the plain division's bit for bit."""
    from quartet.models.policy import ActorCritic, response_logits
    from quartet.rl import entropy_from_logits

    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = _pad([[5, 17, 42], [8], [61, 62]], pad, "left")
    response_ids, response_mask = _pad([[9, 33, 21, 4], [3, 77], [63, 64, 65, 66]], pad, "right")
    seq, mask = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1)
    pair = ActorCritic(load_causal_lm(lm_dir)).eval()
    weights = torch.randn(response_ids.shape, generator=torch.Generator().manual_seed(0)) * response_mask

    def grads(logprobs):
        pair.zero_grad()
        (weights * logprobs).sum().backward()
        return [p.grad.clone() for p in pair.parameters()]

    logprobs, entropy, values = pair(seq, mask, response_ids, 0.7, with_entropy)
    got = grads(logprobs)
    logits = response_logits(pair.actor, seq, mask, response_ids)
    plain = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, response_ids[..., None]).squeeze(-1)
    assert torch.equal(logprobs, plain) and values is None
    assert all(torch.equal(a, b) for a, b in zip(got, grads(plain)))
    if with_entropy:
        assert torch.equal(entropy, entropy_from_logits(logits.detach(), 0.7))
    else:
        assert entropy is None


def test_scoring_rows_grow_within_the_logits_budget(lm_dir):
    mib = 2**20
    # 32 response tokens x 4096 vocab x 4 bytes = 0.5 MiB of logits per row
    assert scoring_rows(8, 32, 4096, budget_bytes=64 * mib) == 128
    assert scoring_rows(8, 128, 4096, budget_bytes=64 * mib) == 32
    # a real vocabulary and response length: one row is over budget, the micro-batch stays
    assert scoring_rows(4, 512, 152_000, budget_bytes=64 * mib) == 4
    assert scoring_rows(8, 32, None) == 8  # vocabulary unknown: the micro-batch
    assert vocab_size(load_causal_lm(lm_dir)) == load_causal_lm(lm_dir).get_output_embeddings().weight.shape[0]


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_shared_trunk_forward_equals_plain_actor_and_critic_forwards(lm_dir, tokenizer, architecture):
    """One trunk pass feeding the LM head and the score head gives what two plain forwards give:
    the actor's log-probs and entropies, and the critic's values on the same (shared) trunk."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from quartet.models.policy import ActorCritic

    if architecture == "llama":
        actor, critic = load_causal_lm(lm_dir), load_scalar_model(lm_dir)
    else:
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2, num_labels=1,
                            pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        actor, critic = GPT2LMHeadModel(config), GPT2ForSequenceClassification(config)
    share_trunk(actor, critic)
    assert critic.base_model is actor.base_model
    assert head_parameters(critic, actor) == [critic.score.weight]  # the critic's own: its head only
    pad = tokenizer.pad_token_id
    prompt_ids, prompt_mask = _pad([[5, 17, 42], [8], [61, 62]], pad, "left")
    response_ids, response_mask = _pad([[9, 33, 21, 4], [3, 77], [63, 64, 65, 66]], pad, "right")
    seq, mask = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1)
    shared = ActorCritic(actor, critic, shared_trunk=True).eval()
    two_forwards = ActorCritic(actor, critic, shared_trunk=False).eval()
    with torch.no_grad():
        got, expected = shared(seq, mask, response_ids, 0.7), two_forwards(seq, mask, response_ids, 0.7)
        p = prompt_ids.shape[1]
        plain_values = token_values(critic, seq, mask)[:, p - 1 : -1]
    valid = response_mask.bool()
    for name, a, b in zip(("log-probs", "entropy", "values"), got, expected):
        torch.testing.assert_close(a[valid], b[valid], atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(got[2][valid], plain_values[valid], atol=1e-5, rtol=0)
    assert got[2].abs().max() > 0  # the head reads real hidden states


def test_share_trunk_refuses_different_architectures(lm_dir, scalar_dir):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    gpt2_critic = GPT2ForSequenceClassification(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, num_labels=1))
    with pytest.raises(ValueError, match="cannot share a trunk between LlamaForCausalLM"):
        share_trunk(load_causal_lm(lm_dir), gpt2_critic)
    with pytest.raises(ValueError, match="has no 'score' head"):
        share_trunk(load_causal_lm(lm_dir), load_causal_lm(lm_dir))
