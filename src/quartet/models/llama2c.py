"""Convert a llama2.c checkpoint and tokenizer into a Hugging Face Llama directory.

Checkpoint (llama2.c's legacy "version 0" export, little-endian): a header of seven int32
(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len), then float32 arrays
in this order, matrices stored [out, in]: tok_embeddings [vocab, dim], attention_norm
[L, dim], wq [L, dim, dim], wk and wv [L, kv_dim, dim], wo [L, dim, dim], ffn_norm [L, dim],
w1 [L, hidden, dim], w2 [L, dim, hidden], w3 [L, hidden, dim], norm [dim], freq_cis_real
and freq_cis_imag [seq_len * head_size / 2] each (unused), and, only when vocab_size is
negative, a separate classifier wcls [|vocab|, dim]. A positive vocab_size means the
classifier shares the embedding (tied weights).

Tokenizer (tok*.bin): int32 max_token_length, then one record per token: float32 score,
int32 length, that many UTF-8 bytes. Ids 0, 1, 2 are <unk>, BOS, EOS; ids 3..258 are the
byte-fallback tokens <0x00>..<0xFF>; the rest are SentencePiece BPE pieces with " " in
place of "▁". llama2.c encodes by prepending a space, looking each UTF-8 character up (or
falling back to its bytes), then repeatedly merging the adjacent pair whose concatenation
is the best-scoring vocab entry. That is exactly BPE whose merge ranks follow the score of
the merged piece, so the converted tokenizer is a `tokenizers` BPE with byte fallback.

Conversion: wq and wk rows are permuted from llama2.c's interleaved rotary pairs to Hugging
Face's rotate-half layout. The tokenizer prepends BOS (as llama2.c does; in transformers 5
this lives in tokenizer.json's post-processor, so `add_bos_token` reads False after loading)
and pads with EOS (the model has no pad token; padded positions are masked anyway). Unlike
llama2.c, the literal strings "<s>", "</s>", "<unk>" in text are parsed as special tokens,
as in every Hugging Face Llama tokenizer. The chat template is BOS + the messages' contents,
with EOS after each assistant turn.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

_HEADER = struct.Struct("<7i")
_MAGIC_V1 = 0x616B3432  # "ak42": llama2.c's newer versioned export format
_N_BYTE_TOKENS = 256
_FIRST_PIECE = 3 + _N_BYTE_TOKENS
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # negative in the file when the classifier is not shared; stored here as |vocab|
    seq_len: int
    shared_classifier: bool

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    def array_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """The float32 arrays that follow the header, in file order."""
        L, d, h, kv = self.n_layers, self.dim, self.hidden_dim, self.n_kv_heads * self.head_size
        shapes = [
            ("tok_embeddings", (self.vocab_size, d)), ("attention_norm", (L, d)),
            ("wq", (L, d, d)), ("wk", (L, kv, d)), ("wv", (L, kv, d)), ("wo", (L, d, d)),
            ("ffn_norm", (L, d)), ("w1", (L, h, d)), ("w2", (L, d, h)), ("w3", (L, h, d)), ("norm", (d,)),
            ("freq_cis_real", (self.seq_len, self.head_size // 2)),
            ("freq_cis_imag", (self.seq_len, self.head_size // 2)),
        ]
        return shapes if self.shared_classifier else [*shapes, ("wcls", (self.vocab_size, d))]

    def file_size(self) -> int:
        return _HEADER.size + 4 * sum(int(np.prod(shape)) for _, shape in self.array_shapes())


def _read_bytes(path: str | Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"llama2.c {what} not found: {path}")
    return path.read_bytes()


def _parse_header(data: bytes, path: Path) -> Llama2cHeader:
    if len(data) < _HEADER.size:
        raise ValueError(f"{path}: {len(data)} bytes, too short for a llama2.c checkpoint header")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = _HEADER.unpack_from(data)
    if dim == _MAGIC_V1:
        raise ValueError(f"{path}: llama2.c versioned export (magic 'ak42'); only the legacy v0 format is supported")
    sane = (
        0 < dim <= 1 << 16 and 0 < hidden <= 1 << 20 and 0 < layers <= 1024 and 0 < heads <= dim
        and 0 < kv_heads <= heads and heads % kv_heads == 0 and dim % heads == 0 and (dim // heads) % 2 == 0
        and 0 < abs(vocab) <= 1 << 22 and 0 < seq_len <= 1 << 22
    )
    if not sane:
        raise ValueError(
            f"{path}: not a llama2.c checkpoint (nonsense header: dim={dim} hidden_dim={hidden} n_layers={layers} "
            f"n_heads={heads} n_kv_heads={kv_heads} vocab_size={vocab} seq_len={seq_len})"
        )
    return Llama2cHeader(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, shared_classifier=vocab > 0)


def read_llama2c_header(checkpoint: str | Path) -> Llama2cHeader:
    """Read and sanity-check the header of a legacy llama2.c checkpoint (file size included)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f"llama2.c checkpoint not found: {path}")
    with path.open("rb") as f:
        header = _parse_header(f.read(_HEADER.size), path)
    _check_size(header, path.stat().st_size, path)
    return header


def _check_size(header: Llama2cHeader, size: int, path: Path) -> None:
    expected = header.file_size()
    if size != expected:
        problem = "truncated" if size < expected else "has trailing bytes"
        raise ValueError(f"{path}: llama2.c checkpoint {problem}: {size} bytes, header implies {expected}")


def read_llama2c_checkpoint(checkpoint: str | Path) -> tuple[Llama2cHeader, dict[str, torch.Tensor]]:
    """Read a legacy llama2.c checkpoint into its header and its arrays (by llama2.c name)."""
    path = Path(checkpoint)
    data = _read_bytes(path, "checkpoint")
    header = _parse_header(data, path)
    _check_size(header, len(data), path)
    floats = np.frombuffer(data, dtype="<f4", offset=_HEADER.size).astype(np.float32, copy=False)
    arrays, offset = {}, 0
    for name, shape in header.array_shapes():
        n = int(np.prod(shape))
        arrays[name] = torch.from_numpy(floats[offset:offset + n].reshape(shape).copy())
        offset += n
    return header, arrays


def read_llama2c_tokenizer(tokenizer: str | Path, vocab_size: int | None = None) -> list[tuple[bytes, float]]:
    """Read a llama2.c tokenizer file into (piece bytes, score) records, checking the vocab size."""
    path = Path(tokenizer)
    data = _read_bytes(path, "tokenizer")
    if len(data) < 4:
        raise ValueError(f"{path}: too short for a llama2.c tokenizer")
    (max_len,) = struct.unpack_from("<i", data)
    if not 0 < max_len <= 1024:
        raise ValueError(f"{path}: not a llama2.c tokenizer (max_token_length={max_len})")
    records, offset = [], 4
    while offset < len(data):
        if offset + 8 > len(data):
            raise ValueError(f"{path}: llama2.c tokenizer truncated in record {len(records)}")
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if not 0 < length <= max_len:
            raise ValueError(f"{path}: not a llama2.c tokenizer (record {len(records)} has length {length})")
        if offset + length > len(data):
            raise ValueError(f"{path}: llama2.c tokenizer truncated in record {len(records)}")
        records.append((data[offset:offset + length], score))
        offset += length
    if vocab_size is not None and len(records) != vocab_size:
        raise ValueError(f"{path}: tokenizer has {len(records)} tokens but the checkpoint's vocab_size is {vocab_size}")
    byte_tokens = [piece for piece, _ in records[3:_FIRST_PIECE]]
    if byte_tokens != [f"<0x{i:02X}>".encode() for i in range(_N_BYTE_TOKENS)]:
        raise ValueError(f"{path}: not a llama2.c tokenizer (ids 3-258 are not the byte tokens <0x00>-<0xFF>)")
    return records


def build_tokenizer(records: list[tuple[bytes, float]]) -> PreTrainedTokenizerFast:
    """A Hugging Face tokenizer that encodes and decodes like llama2.c's (and SentencePiece's)."""
    try:
        pieces = ["<unk>", "<s>", "</s>"] + [p.decode("utf-8").replace(" ", "▁") for p, _ in records[3:]]
    except UnicodeDecodeError as e:
        raise ValueError(f"llama2.c tokenizer piece is not UTF-8: {e}") from None
    vocab = {piece: i for i, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ValueError("llama2.c tokenizer has duplicate pieces")
    # A BPE merge (a, b) for every way of splitting a piece into two pieces, ranked by the
    # piece's score: llama2.c always merges the adjacent pair forming the best-scoring piece.
    merges = []
    for i in range(_FIRST_PIECE, len(pieces)):
        piece = pieces[i]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if vocab.get(left, -1) >= _FIRST_PIECE and vocab.get(right, -1) >= _FIRST_PIECE:
                merges.append((-records[i][1], i, (left, right)))
    merges = [pair for *_, pair in sorted(merges)]
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    # SentencePiece's add_dummy_prefix: always prepend "▁" (even before a leading space), as llama2.c does.
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in pieces[:3]])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
        add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder rows from interleaved rotary pairs (llama2.c) to rotate-half (Hugging Face)."""
    out, dim_in = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, dim_in).transpose(1, 2).reshape(out, dim_in)


def llama_config(header: Llama2cHeader) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=header.vocab_size, hidden_size=header.dim, intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers, num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads, max_position_embeddings=header.seq_len, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, hidden_act="silu",
        tie_word_embeddings=header.shared_classifier, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        architectures=["LlamaForCausalLM"],
    )


def hf_state_dict(header: Llama2cHeader, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename llama2.c arrays to Hugging Face Llama parameter names (wq/wk permuted)."""
    state = {"model.embed_tokens.weight": arrays["tok_embeddings"], "model.norm.weight": arrays["norm"]}
    state["lm_head.weight"] = arrays["tok_embeddings"] if header.shared_classifier else arrays["wcls"]
    for i in range(header.n_layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = arrays["attention_norm"][i]
        state[p + "post_attention_layernorm.weight"] = arrays["ffn_norm"][i]
        state[p + "self_attn.q_proj.weight"] = _permute_rotary(arrays["wq"][i], header.n_heads)
        state[p + "self_attn.k_proj.weight"] = _permute_rotary(arrays["wk"][i], header.n_kv_heads)
        state[p + "self_attn.v_proj.weight"] = arrays["wv"][i]
        state[p + "self_attn.o_proj.weight"] = arrays["wo"][i]
        state[p + "mlp.gate_proj.weight"] = arrays["w1"][i]
        state[p + "mlp.up_proj.weight"] = arrays["w3"][i]
        state[p + "mlp.down_proj.weight"] = arrays["w2"][i]
    return state


def convert_llama2c(checkpoint: str | Path, tokenizer: str | Path, output: str | Path) -> Path:
    """Write a Hugging Face Llama directory (config, model.safetensors, tokenizer) to `output`."""
    header, arrays = read_llama2c_checkpoint(checkpoint)
    records = read_llama2c_tokenizer(tokenizer, vocab_size=header.vocab_size)
    try:
        hf_tokenizer = build_tokenizer(records)
    except ValueError as e:
        raise ValueError(f"{tokenizer}: {e}") from None
    model = LlamaForCausalLM(llama_config(header))
    model.load_state_dict(hf_state_dict(header, arrays), strict=True)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output, safe_serialization=True)
    hf_tokenizer.save_pretrained(output)
    return output
