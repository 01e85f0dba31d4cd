"""llama2.c -> Hugging Face conversion, checked against llama2.c's own reference output and tokenizer."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asset_paths import STORIES260K
from quartet.models.llama2c import convert_llama2c, read_llama2c_header

DATA = STORIES260K
CKPT, TOK = DATA / "stories260K.bin", DATA / "tok512.bin"

# llama2.c test_all.py: `run stories260K.bin -z tok512.bin -t 0 -n 200` must print exactly this.
EXPECTED = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw "
    "a big, red ball. She wanted to play with it, but it was too high.\nLily's mom said, \"Lily, let's go to the "
    "park.\" Lily was sad and didn't know what to do. She said, \"I want to play with your ball, but I can't find "
    "it.\"\nLily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\n"
    "Lily didn't want to help her mom, so she"
)
SENTENCES = [
    "Once upon a time, there was a little girl named Lily.",
    "café 漢字 ☃",
    "The cat's \"toy\" cost $5 — wow!\nNew line,  two spaces and\ttab.",
    " leading space, trailing space ",
    "<0x41> and <b>tags</b>; naïve résumé 🙂 100%",
    "",
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return convert_llama2c(CKPT, TOK, tmp_path_factory.mktemp("stories260K"))


@pytest.fixture(scope="module")
def tokenizer(converted):
    return AutoTokenizer.from_pretrained(converted)


def _greedy_text(path: Path, tokenizer) -> str:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([[1]]), max_new_tokens=200, do_sample=False, pad_token_id=2)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def test_greedy_generation_matches_llama2c(converted, tokenizer):
    assert sorted(p.name for p in converted.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(converted.glob("*.bin"))
    text = _greedy_text(converted, tokenizer)
    prefix = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
    assert text.startswith(prefix)
    assert text == EXPECTED


def test_untied_classifier(tmp_path, tokenizer):
    """Negative vocab_size: a separate wcls follows freq_cis. Here wcls = embeddings, so output is unchanged."""
    data = bytearray(CKPT.read_bytes())
    dim, vocab = struct.unpack_from("<i", data, 0)[0], struct.unpack_from("<i", data, 20)[0]
    struct.pack_into("<i", data, 20, -vocab)
    untied = tmp_path / "untied.bin"
    untied.write_bytes(bytes(data) + bytes(data[28:28 + 4 * vocab * dim]))
    out = convert_llama2c(untied, TOK, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert _greedy_text(out, tokenizer)[:80] == EXPECTED[:80]


def _llama2c_vocab() -> tuple[list[bytes], list[float]]:
    data = TOK.read_bytes()
    pieces, scores, offset = [], [], 4
    while offset < len(data):
        score, n = struct.unpack_from("<fi", data, offset)
        pieces.append(data[offset + 8:offset + 8 + n])
        scores.append(score)
        offset += 8 + n
    return pieces, scores


def llama2c_encode(text: str, pieces: list[bytes], scores: list[float]) -> list[int]:
    """llama2.c tokenizer.c `encode(text, bos=1, eos=0)`, transcribed."""
    lookup = {p: i for i, p in enumerate(pieces)}
    tokens = [1]
    if text:
        text = " " + text  # dummy prefix
    for ch in text:
        raw = ch.encode("utf-8")
        tokens += [lookup[raw]] if raw in lookup else [b + 3 for b in raw]
    while True:
        best, best_id, best_idx = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]], -1)
            if merged != -1 and scores[merged] > best:
                best, best_id, best_idx = scores[merged], merged, i
        if best_idx == -1:
            return tokens
        tokens[best_idx:best_idx + 2] = [best_id]


def test_tokenizer_matches_llama2c_and_round_trips(tokenizer):
    pieces, scores = _llama2c_vocab()
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert tokenizer.pad_token_id == 2
    assert tokenizer.convert_ids_to_tokens([3, 3 + 0xE2, 259]) == ["<0x00>", "<0xE2>", "▁t"]
    for text in SENTENCES + [EXPECTED]:
        ids = tokenizer(text)["input_ids"]
        assert ids == llama2c_encode(text, pieces, scores), text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer("")["input_ids"] == [1]
    assert any(3 <= i < 259 for i in tokenizer("café 漢字 ☃")["input_ids"])  # byte fallback used
    # Random strings over the vocab's characters exercise merge order, spaces and byte fallback.
    rng = random.Random(0)
    chars = sorted({c for p in pieces[259:] for c in p.decode()} | set("漢é\n"))
    for _ in range(200):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(1, 30)))
        if any(special in text for special in ("<s>", "</s>", "<unk>")):
            continue
        assert tokenizer(text)["input_ids"] == llama2c_encode(text, pieces, scores), repr(text)


def test_tokenizer_batching_and_chat_template(tokenizer):
    batch = tokenizer(["Once upon a time", "Hi"], padding=True)
    assert all(len(ids) == len(batch["input_ids"][0]) for ids in batch["input_ids"])
    assert 2 in batch["input_ids"][0] + batch["input_ids"][1]
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": "Once upon a time"}], tokenize=True)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    assert list(ids) == tokenizer("Once upon a time")["input_ids"]  # BOS once, then "▁Once" as llama2.c


def test_header():
    h = read_llama2c_header(CKPT)
    assert (h.dim, h.hidden_dim, h.n_layers, h.n_heads, h.n_kv_heads, h.vocab_size, h.seq_len) == (
        64, 172, 5, 8, 4, 512, 512)
    assert h.shared_classifier and h.file_size() == CKPT.stat().st_size


def test_errors(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="not found.*missing.bin"):
        convert_llama2c(tmp_path / "missing.bin", TOK, out)
    with pytest.raises(ValueError, match="not found.*missing_tok.bin"):
        convert_llama2c(CKPT, tmp_path / "missing_tok.bin", out)

    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(CKPT.read_bytes()[:500_000])
    with pytest.raises(ValueError, match="truncated.bin.*truncated"):
        convert_llama2c(truncated, TOK, out)
    with pytest.raises(ValueError, match="truncated"):
        read_llama2c_header(truncated)
    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="tiny.bin.*too short"):
        convert_llama2c(tiny, TOK, out)

    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(np.random.default_rng(0).bytes(100_000))
    with pytest.raises(ValueError, match="foreign.bin: not a llama2.c checkpoint"):
        convert_llama2c(foreign, TOK, out)
    with pytest.raises(ValueError, match="foreign.bin: not a llama2.c tokenizer"):
        convert_llama2c(CKPT, foreign, out)
    v1 = tmp_path / "v1.bin"
    v1.write_bytes(struct.pack("<ii", 0x616B3432, 1) + bytes(248))
    with pytest.raises(ValueError, match="v1.bin.*ak42"):
        convert_llama2c(v1, TOK, out)

    tok_truncated = tmp_path / "tok_truncated.bin"
    tok_truncated.write_bytes(TOK.read_bytes()[:-3])
    with pytest.raises(ValueError, match="tok_truncated.bin.*truncated"):
        convert_llama2c(CKPT, tok_truncated, out)
    tok_bigger = tmp_path / "tok_bigger.bin"
    tok_bigger.write_bytes(TOK.read_bytes() + struct.pack("<fi", -300.0, 2) + b"zz")
    with pytest.raises(ValueError, match="tok_bigger.bin.*513 tokens.*vocab_size is 512"):
        convert_llama2c(CKPT, tok_bigger, out)
    assert not out.exists()  # nothing written on failure
