"""Tokenizers: load a local Hugging Face tokenizer, or train a tiny byte-level BPE from text.

Training a tokenizer locally is what lets the whole pipeline run with no download.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Each message is "<|role|>content<|endoftext|>", so an assistant turn ends in EOS and a
# model trained on it learns to stop. `add_generation_prompt` opens the assistant's turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|endoftext|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2,
                        split_digits: bool = True) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (any text encodes: bytes are the fallback).

    `split_digits`: every digit is a token of its own and no merge spans two digits (as Llama 3,
    Qwen and DeepSeek do), so a number reads digit by digit; without it BPE merges frequent
    numbers into single tokens, which a small model cannot take apart (reverse, add, compare).
    A vocabulary smaller than `vocab_size` (too few distinct merges in the data) is said in one line.
    """
    special = [EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, *ROLE_TOKENS]
    backend = Tokenizer(models.BPE(unk_token=None))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if split_digits else byte_level)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    trained = backend.get_vocab_size()
    if trained < vocab_size:
        print(f"tokenizer: trained {trained:,} of {vocab_size:,} tokens: the data has too few distinct merges "
              f"(pairs seen at least {min_frequency} times)", file=sys.stderr)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
    )
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give `tokenizer` a pad token if it has none: EOS when there is one (no new embedding needed)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give `tokenizer` Quartet's simple chat template if it has none, so `messages` data renders."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE.replace("<|endoftext|>", tokenizer.eos_token or "")
    return tokenizer


# Any one of these marks a directory a Hugging Face tokenizer can be loaded from.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory, with a pad token and a chat template guaranteed."""
    # a local import: loading imports this module
    from quartet.models.loading import ModelLoadError, require_local_dir

    directory = require_local_dir(path, what="tokenizer")
    if not any((directory / name).exists() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{directory}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); save the tokenizer "
                             "beside the model (tokenizer.save_pretrained) or point model.tokenizer_path at one")
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return ensure_chat_template(ensure_pad_token(tokenizer))
