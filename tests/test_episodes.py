"""Multi-turn episodes on the kept KV cache: token in, token out, log-probs equal a fresh forward over
the compacted conversation, observations are not actions, and a split batch samples what the whole does."""

from dataclasses import dataclass

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from quartet.config import SamplingConfig
from quartet.models.loading import load_causal_lm
from quartet.models.policy import response_logprobs
from quartet.rollout.episodes import EpisodeLimits, ObservationRenderer, TemplateMismatch, sample_episodes


@dataclass
class Outcome:
    messages: list
    reward: float
    done: bool


class CountingDriver:
    """Answers each turn with a tool message whose length depends on the row (ragged observations), and
    ends a row's episode at its `stop_after`-th turn; rewards 0.5 a turn, 2 at the end."""

    def __init__(self, stop_after, offset=0):
        self.stop_after, self.offset, self.turns, self.calls = stop_after, offset, {}, []

    def step(self, rows, actions):
        self.calls.append(list(rows))
        out = []
        for row, action in zip(rows, actions):
            self.turns[row] = self.turns.get(row, 0) + 1
            done = self.turns[row] >= self.stop_after[row]
            out.append(Outcome([] if done else [{"role": "tool", "content": "fruit " * ((self.offset + row) % 3 + 1)}],
                               2.0 if done else 0.5, done))
        return out


def _prompts(pad_id):
    ids = torch.tensor([[pad_id, pad_id, 11, 12, 13], [21, 22, 23, 24, 25], [pad_id, pad_id, pad_id, 31, 32]])
    return ids, (ids != pad_id).long()


def _eos_biased(model, eos, value=5.0):
    bias = torch.zeros(model.config.vocab_size)
    bias[eos] = value  # turns end at different steps
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    return model


def _tiny_gpt2(tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config).eval()


def _episodes(model, tokenizer, n=2, rows=None, offset=0, total=None, limits=EpisodeLimits(max_turns=3)):
    ids, mask = _prompts(tokenizer.pad_token_id)
    if rows is not None:
        ids, mask = ids[rows], mask[rows]
    stop_after = [2, 3, 1, 3, 2, 1]
    driver = CountingDriver([stop_after[offset + i] for i in range(ids.shape[0] * n)], offset)
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.9)
    rollout, records = sample_episodes(model, tokenizer, ids, mask, cfg, limits, driver,
                                       ObservationRenderer(tokenizer, limits.max_observation_tokens),
                                       generator=torch.Generator().manual_seed(5), row_offset=offset,
                                       total_rows=total, n=n)
    return rollout, records, driver


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_episode_logprobs_equal_a_fresh_forward_over_the_conversation(lm_dir, tokenizer, arch):
    model = load_causal_lm(lm_dir).eval() if arch == "llama" else _tiny_gpt2(tokenizer)
    _eos_biased(model, tokenizer.eos_token_id)
    rollout, records, _ = _episodes(model, tokenizer)
    action = rollout.action_mask.bool()
    assert (~action & rollout.response_mask.bool()).any(), "some observation tokens sit between turns"
    forward = response_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.response_ids, 0.9)
    torch.testing.assert_close(rollout.logprobs[action], forward[action], atol=1e-5, rtol=0)
    assert (rollout.logprobs[~action] == 0).all()
    # the response is prompt + no holes: attention is a prefix of each row
    lengths = rollout.response_mask.sum(1)
    assert torch.equal(rollout.response_mask, (torch.arange(rollout.response_mask.shape[1]) < lengths[:, None]).long())


def test_observations_enter_as_the_templates_suffix_ids_and_turns_are_numbered(lm_dir, tokenizer):
    model = _eos_biased(load_causal_lm(lm_dir).eval(), tokenizer.eos_token_id)
    rollout, records, driver = _episodes(model, tokenizer)
    renderer = ObservationRenderer(tokenizer)
    eos = tokenizer.eos_token_id
    for row, record in enumerate(records):
        ids = rollout.response_ids[row][rollout.response_mask[row].bool()].tolist()
        action = rollout.action_mask[row][rollout.response_mask[row].bool()].bool().tolist()
        turns = rollout.turn_ids[row][rollout.response_mask[row].bool()].tolist()
        # split the row into runs of action / observation tokens and rebuild it from the record
        expected, expected_turns, turn = [], [], 0
        for message in record.messages:
            if message["role"] == "assistant":
                run = [t for t, a, k in zip(ids, action, turns) if a and k == turn]
                assert tokenizer.decode([t for t in run if t != eos], skip_special_tokens=True) == message["content"]
                expected += run
                expected_turns += [turn] * len(run)
                turn += 1
            else:
                suffix = renderer.suffix([message])
                expected += suffix
                expected_turns += [-1] * len(suffix)
        assert ids == expected
        assert turns == expected_turns
        assert record.turns == turn
        if record.ended == "done":
            assert record.turn_rewards[-1] == 2.0 and all(r == 0.5 for r in record.turn_rewards[:-1])
    assert {r.ended for r in records} <= {"done", "max_turns", "length", "budget"}
    assert any(r.ended == "done" for r in records) and any(r.turns > 1 for r in records)


def test_a_split_batch_samples_what_the_whole_batch_samples(lm_dir, tokenizer):
    model = _eos_biased(load_causal_lm(lm_dir).eval(), tokenizer.eos_token_id)
    whole, whole_records, _ = _episodes(model, tokenizer)
    part, part_records, _ = _episodes(model, tokenizer, rows=[1, 2], offset=2, total=6)
    width = part.response_ids.shape[1]
    assert torch.equal(whole.response_ids[2:, :width], part.response_ids)
    assert (whole.response_mask[2:, width:] == 0).all()
    torch.testing.assert_close(whole.logprobs[2:, :width], part.logprobs, atol=1e-5, rtol=0)
    assert [r.messages for r in whole_records[2:]] == [r.messages for r in part_records]


def test_budgets_end_episodes_and_cut_long_observations(lm_dir, tokenizer):
    model = _eos_biased(load_causal_lm(lm_dir).eval(), tokenizer.eos_token_id)
    rollout, records, _ = _episodes(model, tokenizer, limits=EpisodeLimits(max_turns=3, max_episode_tokens=9,
                                                                           max_observation_tokens=1))
    assert (rollout.response_mask.sum(1) <= 9 + 6).all()
    assert any(r.ended == "budget" for r in records)
    cut = [m for r in records for m in r.messages if m["role"] == "tool" and "[cut:" in m["content"]]
    assert all(r.observations_cut >= 1 for r in records if any(m["role"] == "tool" for m in r.messages))
    assert cut


def test_repeated_observations_give_the_same_ids_and_count_their_cuts_each_time(tokenizer):
    """The renderer remembers what it rendered: a repeat gives what a fresh renderer gives, and is counted."""
    renderer = ObservationRenderer(tokenizer, max_observation_tokens=20)
    long = [{"role": "tool", "content": " ".join(["apple"] * 40)}]
    short = [{"role": "user", "content": "Higher."}]
    for _ in range(2):
        messages, n_cut = renderer.cut(long)
        assert n_cut == 1 and "[cut: " in messages[0]["content"]
        assert renderer.cut(short) == (short, 0)
        assert renderer.suffix(messages) == ObservationRenderer(tokenizer, 20).suffix(messages)
        assert renderer.suffix(short) == ObservationRenderer(tokenizer, 20).suffix(short) != renderer.suffix(messages)


def test_a_template_that_rewrites_the_conversation_is_named_before_training(tokenizer):
    class Rewriting:
        eos_token = tokenizer.eos_token

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            text = "".join(f"[{m['role']}]{m['content']}{self.eos_token}" for m in messages)
            if any(m["role"] == "tool" for m in messages):
                text = "(tools)" + text  # a header that appears only once a tool answered
            return text + ("[assistant]" if add_generation_prompt else "")

    with pytest.raises(TemplateMismatch, match="does not only append"):
        ObservationRenderer(Rewriting())
