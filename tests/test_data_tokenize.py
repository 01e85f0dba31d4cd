"""Tokenization (prompt masking, EOS, BOS, over-long policy) and collation (padding, preference halves)."""


import pytest
import torch
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from asset_paths import HH_SAMPLE
from quartet.data import (
    IGNORE_INDEX,
    PreferenceExample,
    PromptExample,
    SFTExample,
    TruncationStats,
    collate_preferences,
    collate_prompts,
    collate_sft,
    load_preference_examples,
    load_sft_examples,
    pad_sequences,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
)
from quartet.models.tokenizer import train_bpe_tokenizer

CORPUS = ["Hello there, how are you? I am fine, thanks.", "What is two plus two? Four.",
          "Human: tell me a story. Assistant: once upon a time."] * 5


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def bos_tok(tok):
    """A tokenizer that prepends its own BOS (distinct from EOS), like Llama's."""
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.add_special_tokens(["<|bos|>"])
    bos = backend.token_to_id("<|bos|>")
    backend.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                           special_tokens=[("<|bos|>", bos)])
    t = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|endoftext|>",
                                pad_token="<|pad|>")
    t.chat_template = tok.chat_template
    return t


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- SFT


def test_sft_is_prompt_then_completion_then_eos_with_prompt_masked(tok):
    ex = SFTExample("What is two plus two?", " Four.")
    (item,), stats = tokenize_sft([ex], tok, max_length=64, max_prompt_length=32)
    p, c = ids(tok, ex.prompt), ids(tok, ex.completion)
    assert item["input_ids"] == p + c + [tok.eos_token_id]
    assert item["labels"] == [IGNORE_INDEX] * len(p) + c + [tok.eos_token_id]
    assert tok.bos_token_id == tok.eos_token_id and item["input_ids"][0] != tok.bos_token_id  # no BOS added
    assert stats == TruncationStats(1, 0, 0, 0)


def test_sft_mask_prompt_false_trains_on_everything(tok):
    (item,), _ = tokenize_sft([SFTExample("Hello", " there")], tok, 64, 32, mask_prompt=False)
    assert item["labels"] == item["input_ids"]


def test_sft_text_rows_have_every_token_as_label(tok):
    (item,), _ = tokenize_sft([SFTExample(None, "Once upon a time.")], tok, 64, 32)
    assert item["input_ids"] == ids(tok, "Once upon a time.") + [tok.eos_token_id]
    assert item["labels"] == item["input_ids"]


def test_sft_eos_is_not_doubled_when_the_template_already_ends_with_it(tok):
    ex = SFTExample("<|user|>Hi<|endoftext|><|assistant|>", "Hello<|endoftext|>")
    (item,), _ = tokenize_sft([ex], tok, 64, 32)
    assert item["input_ids"][-1] == tok.eos_token_id and item["input_ids"][-2] != tok.eos_token_id


def test_collated_labels_are_ignored_exactly_on_prompt_and_padding(tok):
    examples = [SFTExample("Hello there, how are you?", " I am fine."), SFTExample("Two?", " Four, thanks."),
                SFTExample(None, "Once upon a time")]
    data, _ = tokenize_sft(examples, tok, 64, 32)
    batch = collate_sft(data, tok.pad_token_id)
    n = len(examples)
    width = max(len(d["input_ids"]) for d in data)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (n, width)
    for i, ex in enumerate(examples):
        n_prompt = len(ids(tok, ex.prompt)) if ex.prompt else 0
        n_real = len(data[i]["input_ids"])
        expect_ignored = torch.zeros(width, dtype=torch.bool)
        expect_ignored[:n_prompt] = True
        expect_ignored[n_real:] = True
        ignored = batch["labels"][i] == IGNORE_INDEX
        assert torch.equal(ignored, expect_ignored)
        assert torch.equal(batch["labels"][i][~ignored], batch["input_ids"][i][~ignored])
        assert batch["attention_mask"][i].tolist() == [1] * n_real + [0] * (width - n_real)
        assert (batch["input_ids"][i, n_real:] == tok.pad_token_id).all()


def test_truncation_policy_and_counts(tok):
    long_prompt = "What is two plus two? " * 10
    long_completion = " Four." * 30
    p_ids = ids(tok, long_prompt)
    examples = [
        SFTExample("Hi", " Fine."),                 # untouched
        SFTExample(long_prompt, " Four."),          # prompt left-truncated
        SFTExample("Hi", long_completion),          # completion cut at max_length
        SFTExample(long_prompt, long_completion),   # both
    ]
    data, stats = tokenize_sft(examples, tok, max_length=20, max_prompt_length=8)
    assert stats == TruncationStats(n_examples=4, n_prompt_truncated=2, n_completion_truncated=2, n_dropped=0)
    # the prompt keeps its END
    assert data[1]["input_ids"][:8] == p_ids[-8:]
    assert data[1]["labels"][:8] == [IGNORE_INDEX] * 8
    assert data[1]["input_ids"][8:] == ids(tok, " Four.") + [tok.eos_token_id]
    # the completion is cut on the right, losing its EOS
    assert len(data[2]["input_ids"]) == 20 and data[2]["input_ids"][-1] != tok.eos_token_id
    assert data[2]["input_ids"][len(ids(tok, "Hi")):] == ids(tok, long_completion)[: 20 - len(ids(tok, "Hi"))]
    assert all(len(d["input_ids"]) <= 20 for d in data)
    summary = stats.summary()
    assert "4 examples" in summary and "2 prompts left-truncated" in summary and "2 completions cut" in summary


def test_examples_with_no_room_for_the_completion_are_dropped_and_counted(tok):
    long_prompt = "What is two plus two? " * 10
    data, stats = tokenize_sft([SFTExample(long_prompt, " Four."), SFTExample("Hi", " Yo")], tok,
                               max_length=8, max_prompt_length=8)
    assert len(data) == 1 and data[0]["input_ids"][:len(ids(tok, "Hi"))] == ids(tok, "Hi")
    assert stats == TruncationStats(n_examples=2, n_prompt_truncated=0, n_completion_truncated=0, n_dropped=1)
    assert "1 dropped" in stats.summary()


def test_bad_lengths_are_rejected(tok):
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_sft([SFTExample("a", "b")], tok, 16, 0)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_preferences([PreferenceExample("a", "b", "c")], tok, 0, 4)


# ----------------------------------------------------------------------------- BOS


def test_bos_is_prepended_once_kept_by_truncation_and_masked(bos_tok):
    bos, eos = bos_tok.bos_token_id, bos_tok.eos_token_id
    assert bos != eos
    long_prompt = "What is two plus two? " * 10
    data, stats = tokenize_sft([SFTExample("Hello", " there"), SFTExample("<|bos|>Hello", " there"),
                                SFTExample(long_prompt, " Four."), SFTExample(None, "Once")], bos_tok, 64, 6)
    assert data[0]["input_ids"] == [bos] + ids(bos_tok, "Hello") + ids(bos_tok, " there") + [eos]
    assert data[1]["input_ids"] == data[0]["input_ids"]  # a template-written BOS is not doubled
    assert data[2]["input_ids"][:6] == [bos] + ids(bos_tok, long_prompt)[-5:]
    assert stats.n_prompt_truncated == 1
    assert data[3]["input_ids"][0] == bos and data[3]["labels"][0] == IGNORE_INDEX
    assert data[3]["labels"][1:] == data[3]["input_ids"][1:]
    prompts, _ = tokenize_prompts([PromptExample(long_prompt)], bos_tok, 6)
    assert prompts[0][0] == bos and len(prompts[0]) == 6


# ----------------------------------------------------------------------------- preferences


def test_preferences_share_the_prompt_and_end_with_eos(tok):
    ex = PreferenceExample("What is two plus two?", " Four.", " Five, thanks.", margin=1.5)
    (item,), stats = tokenize_preferences([ex], tok, 64, 32)
    p, eos = ids(tok, ex.prompt), tok.eos_token_id
    assert item["chosen_ids"] == p + ids(tok, ex.chosen) + [eos]
    assert item["rejected_ids"] == p + ids(tok, ex.rejected) + [eos]
    assert item["margin"] == 1.5 and stats == TruncationStats(1, 0, 0, 0)


def test_preference_truncation_counts(tok):
    long_prompt = "What is two plus two? " * 10
    examples = [PreferenceExample(long_prompt, " Four.", " Five."),
                PreferenceExample("Hi", " Four." * 30, " No."),
                PreferenceExample("Hi", " Yes.", " No.")]
    data, stats = tokenize_preferences(examples, tok, max_length=16, max_prompt_length=8)
    assert stats == TruncationStats(n_examples=3, n_prompt_truncated=1, n_completion_truncated=1, n_dropped=0)
    assert data[0]["chosen_ids"][:8] == data[0]["rejected_ids"][:8] == ids(tok, long_prompt)[-8:]
    assert len(data[1]["chosen_ids"]) == 16 and data[1]["rejected_ids"][-1] == tok.eos_token_id
    _, stats = tokenize_preferences(examples, tok, max_length=8, max_prompt_length=8)
    assert stats.n_dropped == 1


def test_collate_preferences_is_one_batch_chosen_half_then_rejected_half(tok):
    examples = [PreferenceExample("Hi", " Fine, thanks.", " No.", 1.0),
                PreferenceExample("What is two plus two?", " Four.", " Once upon a time, five.", 0.5)]
    data, _ = tokenize_preferences(examples, tok, 64, 32)
    batch = collate_preferences(data, tok.pad_token_id)
    rows = [d["chosen_ids"] for d in data] + [d["rejected_ids"] for d in data]
    width = max(len(r) for r in rows)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, width)
    for i, r in enumerate(rows):
        assert batch["input_ids"][i, : len(r)].tolist() == r
        assert (batch["input_ids"][i, len(r):] == tok.pad_token_id).all()
        assert batch["attention_mask"][i].sum().item() == len(r)
    assert torch.equal(batch["margin"], torch.tensor([1.0, 0.5]))
    no_margin = [{**d, "margin": None} for d in data]
    assert collate_preferences(no_margin, tok.pad_token_id)["margin"] is None
    with pytest.raises(ValueError, match="margin"):
        collate_preferences([data[0], no_margin[1]], tok.pad_token_id)


# ----------------------------------------------------------------------------- prompts and padding


def test_prompts_are_left_truncated_and_left_padded(tok):
    long_prompt = "What is two plus two? " * 10
    prompts, stats = tokenize_prompts([PromptExample("Hi"), PromptExample(long_prompt)], tok, max_prompt_length=8)
    assert prompts == [ids(tok, "Hi"), ids(tok, long_prompt)[-8:]]
    assert stats == TruncationStats(2, 1, 0, 0)
    batch = collate_prompts([{"input_ids": p} for p in prompts], tok.pad_token_id)
    n = len(prompts[0])
    assert batch["input_ids"][0].tolist() == [tok.pad_token_id] * (8 - n) + prompts[0]
    assert batch["attention_mask"][0].tolist() == [0] * (8 - n) + [1] * n
    assert batch["attention_mask"][1].tolist() == [1] * 8
    assert torch.equal(collate_prompts(prompts, tok.pad_token_id)["input_ids"], batch["input_ids"])


def test_pad_sequences():
    right = pad_sequences([[1, 2, 3], [4]], 0)
    assert right.dtype == torch.long and right.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert pad_sequences([torch.tensor([1, 2, 3]), torch.tensor([4])], 9, side="left").tolist() == [[1, 2, 3],
                                                                                                    [9, 9, 4]]
    assert pad_sequences([[], [5]], 0).tolist() == [[0], [5]]
    with pytest.raises(ValueError):
        pad_sequences([[1]], 0, side="middle")


# ----------------------------------------------------------------------------- real data


def test_real_hh_sample_tokenizes_within_limits(tok):
    prefs, _ = load_preference_examples(HH_SAMPLE, tok)
    data, stats = tokenize_preferences(prefs, tok, max_length=256, max_prompt_length=128)
    assert stats.n_examples == 2000 and len(data) == 2000 - stats.n_dropped
    assert stats.n_prompt_truncated > 0  # many HH dialogues are long
    assert all(len(d["chosen_ids"]) <= 256 and len(d["rejected_ids"]) <= 256 for d in data)
    sft, sft_stats = tokenize_sft(load_sft_examples(HH_SAMPLE, tok, completion_field="chosen"), tok, 256, 128)
    assert len(sft) == 2000 - sft_stats.n_dropped and sft_stats.n_prompt_truncated == stats.n_prompt_truncated
    assert all(any(label != IGNORE_INDEX for label in d["labels"]) for d in sft)


def test_a_multi_turn_conversation_trains_on_every_assistant_turn_and_its_end_of_turn_only(tok):
    """SFT on a conversation with tool or user turns: labels cover each assistant turn (EOS included) and nothing
    else, and the tokens between turns are exactly what a multi-turn episode appends for the observation."""
    from quartet.data.formats import parse_sft_row
    from quartet.data.readers import Row
    from quartet.rollout.episodes import ObservationRenderer

    call = '<tool_call>{"name": "calculate", "arguments": {"expression": "12*34"}}</tool_call>'
    messages = [{"role": "user", "content": "What is 12 * 34?"}, {"role": "assistant", "content": call},
                {"role": "tool", "content": "408"}, {"role": "assistant", "content": "The answer is 408."}]
    example = parse_sft_row(Row("trace.jsonl", 1, {"messages": messages}), tok)
    [row], _ = tokenize_sft([example], tok, max_length=512, max_prompt_length=64)
    ids, labels = row["input_ids"], row["labels"]
    prompt = tok(tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    first = tok(call, add_special_tokens=False)["input_ids"] + [eos]
    between = ObservationRenderer(tok).suffix([messages[2]])  # what an episode appends after the call
    last = tok("The answer is 408.", add_special_tokens=False)["input_ids"] + [eos]
    assert ids == prompt + first + between + last
    ignored = [IGNORE_INDEX]
    assert labels == ignored * len(prompt) + first + ignored * len(between) + last
    # a chat or a game with feedback in user turns trains every assistant turn too, and nothing of the user's
    chat = [messages[0], {"role": "assistant", "content": "Hmm."}, {"role": "user", "content": "And?"},
            {"role": "assistant", "content": "408."}]
    [row], _ = tokenize_sft([parse_sft_row(Row("chat.jsonl", 1, {"messages": chat}), tok)], tok, 512, 64)
    hmm = tok("Hmm.", add_special_tokens=False)["input_ids"] + [eos]
    between = ObservationRenderer(tok).suffix([chat[2]])
    answer = tok("408.", add_special_tokens=False)["input_ids"] + [eos]
    assert row["input_ids"] == prompt + hmm + between + answer
    assert row["labels"] == ignored * len(prompt) + hmm + ignored * len(between) + answer
    # one assistant turn keeps the prompt/completion split
    single = parse_sft_row(Row("chat.jsonl", 1, {"messages": chat[:2]}), tok)
    assert single.segments is None
