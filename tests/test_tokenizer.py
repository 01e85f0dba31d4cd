"""The tokenizer Quartet trains for a preset: one token per digit by default, the old merges when off,
a lossless round trip through text and through tokenizer.json, and a line when the vocabulary falls short."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from quartet.config import SFTConfig, build_config
from quartet.models.tokenizer import EOS_TOKEN, PAD_TOKEN, ROLE_TOKENS, UNK_TOKEN, load_tokenizer, train_bpe_tokenizer
from quartet.stages.common import resolve_tokenizer

# "reverse a 3-digit number": with plain byte-level BPE most of these numbers become one token each
_rng = random.Random(0)
REVERSE = [f"Reverse {n}: {str(n)[::-1]}" for n in (_rng.randrange(100, 1000) for _ in range(600))]


def _pieces(tokenizer, text: str) -> list[str]:
    """The text of each token of `text`, decoded one by one."""
    return [tokenizer.decode([i]) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


@pytest.fixture(scope="module")
def split():
    return train_bpe_tokenizer(REVERSE, vocab_size=1024)


@pytest.fixture(scope="module")
def merged():
    return train_bpe_tokenizer(REVERSE, vocab_size=1024, split_digits=False)


def test_every_digit_is_a_token_of_its_own(split):
    for text in ("Reverse 407: 704", "9081726354", "x42y 7 00 123456"):
        pieces = _pieces(split, text)
        assert "".join(pieces) == text
        for piece in pieces:
            # a token holding a digit is that digit alone
            assert not any(c.isdigit() for c in piece) or (len(piece) == 1 and piece.isdigit()), (text, pieces)
    assert _pieces(split, "Reverse 407: 704")[-3:] == ["7", "0", "4"]
    assert not any(any(c.isdigit() for c in token) and len(token) > 1 for token in split.get_vocab())


def test_without_the_switch_numbers_merge_into_single_tokens(merged):
    # the failure the default avoids: most 3-digit numbers of the data are one token
    numbers = [line.split()[1].rstrip(":") for line in REVERSE[:100]]
    whole = sum(len(_pieces(merged, " " + n)) == 1 for n in numbers)
    assert whole > 50


def test_switch_off_gives_the_plain_byte_level_merges(merged):
    """split_digits=False trains exactly the tokenizer of plain byte-level BPE (the same vocabulary and merges)."""
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(REVERSE, trainer=trainers.BpeTrainer(
        vocab_size=1024, min_frequency=2, special_tokens=[EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    plain = json.loads(backend.to_str())["model"]
    ours = json.loads(merged.backend_tokenizer.to_str())["model"]
    assert ours["vocab"] == plain["vocab"] and ours["merges"] == plain["merges"]


TEXTS = ["Reverse 407: 704", "  two  spaces, 12 and 3.5 ", "line\n 99 bottles\t0", "a1b22c333 d", "Q: 3 + 9 - 4?"]


@pytest.mark.parametrize("switch", [True, False])
def test_decode_of_encode_is_the_text(switch, split, merged):
    tokenizer = split if switch else merged
    for text in TEXTS:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_saved_and_reloaded_tokenizer_still_splits_digits(split, tmp_path):
    split.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())["pre_tokenizer"]
    assert saved["type"] == "Sequence" and saved["pretokenizers"][0] == {"type": "Digits", "individual_digits": True}
    loaded = load_tokenizer(tmp_path)
    for text in TEXTS:
        ids = split(text, add_special_tokens=False)["input_ids"]
        assert loaded(text, add_special_tokens=False)["input_ids"] == ids
        assert loaded.decode(ids) == text
    assert _pieces(loaded, "5817") == ["5", "8", "1", "7"]


def test_a_short_vocabulary_is_said_in_one_line(capsys):
    tokenizer = train_bpe_tokenizer(["the cat sat on the mat"] * 5, vocab_size=2048)
    err = capsys.readouterr().err
    assert f"trained {len(tokenizer):,} of 2,048 tokens" in err and "too few distinct merges" in err
    assert err.count("\n") == 1
    train_bpe_tokenizer(REVERSE, vocab_size=264)  # reached (268 merges are there): nothing said
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("switch", [True, False])
def test_model_split_digits_reaches_the_preset_tokenizer(switch, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": line[:-5], "completion": line[-5:]}) + "\n" for line in REVERSE))
    cfg = build_config(SFTConfig, {"data": {"train": str(data)}, "model": {"vocab_size": 1024, "split_digits": switch}})
    assert cfg.model.preset == "tiny" and cfg.model.split_digits is switch
    tokenizer = resolve_tokenizer(cfg.model, [data])
    pieces = _pieces(tokenizer, " 407")
    assert (pieces == [" ", "4", "0", "7"]) if switch else (len(pieces) < 4)


def test_split_digits_is_on_by_default():
    assert build_config(SFTConfig, {}).model.split_digits is True
