"""Tiny model presets built from config, so every stage runs with no download."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

# name -> (architecture, sizes). Parameter counts are for a 2048-token vocabulary.
PRESETS: dict[str, tuple[str, dict]] = {
    # ~0.2 M parameters: for unit tests.
    "nano": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, max_position_embeddings=256)),
    # ~1.6 M parameters: the demo's default, seconds per step on a laptop CPU.
    "tiny": ("llama", dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=4, max_position_embeddings=512)),
    # ~5 M parameters.
    "small": ("llama", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
                            num_key_value_heads=8, max_position_embeddings=1024)),
    # GPT-2 architecture at the benchmark anchors' shapes (4 layers, width 256), with their activation:
    # the tanh GELU as one fused kernel, the same math as stock GPT-2's gelu_new (five element-wise
    # kernels, about 10 % of a GRPO step on config D's shape)
    "gpt2-tiny": ("gpt2", dict(n_embd=256, n_layer=4, n_head=4, n_positions=256,
                               activation_function="gelu_pytorch_tanh")),
}


def preset_config(name: str, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The transformers config of preset `name`, sized to `tokenizer`'s vocabulary and special tokens."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset '{name}'; choose one of: {', '.join(PRESETS)}")
    arch, sizes = PRESETS[name]
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if arch == "llama":
        return LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, rms_norm_eps=1e-5, **sizes, **special)
    return GPT2Config(vocab_size=len(tokenizer), tie_word_embeddings=True, **sizes, **special)


def build_preset_model(name: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0, scalar: bool = False) -> PreTrainedModel:
    """A freshly initialised model of preset `name` (deterministic for a given seed).

    `scalar=True` gives a one-output sequence classifier (reward model / critic) instead of a causal LM.
    """
    config = preset_config(name, tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if scalar:
            config.num_labels = 1
            return AutoModelForSequenceClassification.from_config(config)
        return AutoModelForCausalLM.from_config(config)
