"""What every stage does the same way: tokenizer and model set-up, LoRA, held-out split, FSDP checks."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quartet.config import LoraConfig, ModelConfig
from quartet.data import load_preference_examples, read_rows, tokenize_preferences
from quartet.models.loading import load_causal_lm
from quartet.models.presets import build_preset_model
from quartet.models.tokenizer import load_tokenizer, train_bpe_tokenizer

T = TypeVar("T")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def corpus_texts(paths: list[str | Path]) -> list[str]:
    """Every string in the rows of `paths` (field-agnostic), to train a preset's tokenizer on."""
    texts: list[str] = []
    for path in paths:
        for row in read_rows(path):
            texts.extend(_strings(row.data))
    return texts


def resolve_tokenizer(model_cfg: ModelConfig, corpus: list[str | Path]) -> PreTrainedTokenizerBase:
    """The tokenizer of a local model, or for a preset a BPE tokenizer trained on the stage's data."""
    source = model_cfg.tokenizer_path or model_cfg.path
    if source:
        return load_tokenizer(source, trust_remote_code=model_cfg.trust_remote_code)
    return train_bpe_tokenizer(corpus_texts(corpus), vocab_size=model_cfg.vocab_size, split_digits=model_cfg.split_digits)


def resolve_causal_lm(model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """Load the configured causal LM, or build its preset; embeddings grow to fit added tokens."""
    if model_cfg.path:
        model = load_causal_lm(model_cfg.path, model_cfg.trust_remote_code, model_cfg.allow_pickle)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    else:
        model = build_preset_model(model_cfg.preset, tokenizer, seed=seed)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


def apply_lora(model: PreTrainedModel, lora_cfg: LoraConfig, task_type: str = "CAUSAL_LM") -> PreTrainedModel:
    """Wrap `model` with peft LoRA adapters when enabled (only adapters train)."""
    if not lora_cfg.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                              target_modules=lora_cfg.target_modules, task_type=task_type)
    return get_peft_model(model, peft_cfg)


def unwrap_lora(model: PreTrainedModel) -> PreTrainedModel:
    """A plain transformers model with any LoRA adapters merged in (what final/ holds)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def split_held_out(items: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Seeded split into (train, held_out); at least one held-out item when fraction > 0."""
    if fraction <= 0 or len(items) < 2:
        return list(items), []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_held = max(1, int(round(fraction * len(items))))
    held = set(order[:n_held])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def check_context_length(model: PreTrainedModel, longest: int, what: str, setting: str) -> None:
    """Refuse, before training starts, sequences longer than the model's position table.

    `longest` is the longest sequence the stage will actually build (after truncation), so a
    generous `max_length` with short data is fine.
    """
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and longest > limit:
        raise ValueError(f"{what} reach {longest} tokens but the model's context is {limit} tokens "
                         f"(max_position_embeddings); set {setting} so they fit")


def check_fsdp_options(ranks, lora: bool, shared_trunk: bool = False, compile: bool = False,
                       episodes: bool = False) -> None:
    """Refuse, before the run directory is touched, what FSDP sharding (`ranks.fsdp`) does not combine with."""
    if ranks.fsdp is None:
        return
    for on, what in ((lora, "LoRA (lora.enabled)"), (shared_trunk, "models.shared_trunk"), (compile, "train.compile"),
                     (episodes, "multi-turn episodes (rollout.env or rollout.tools)")):
        if on:
            raise ValueError(f"{what} does not combine with FSDP sharding (run.fsdp, or an Accelerate FSDP config); "
                             "turn one of them off (DDP runs it on several processes)")


def load_preference_data(data_cfg, tokenizer: PreTrainedTokenizerBase, seed: int, stage: str, ranks
                         ) -> tuple[list, list, dict[str, int], Any]:
    """Tokenised training and held-out preference pairs (the reward model's and DPO's data): data.eval, or a
    seeded data.eval_fraction of data.train held out; what was skipped or truncated is printed once.
    Returns (train, held_out, skipped rows by reason, truncation stats)."""
    train_examples, skipped = load_preference_examples(data_cfg.train, tokenizer)
    if data_cfg.limit:
        train_examples = train_examples[: data_cfg.limit]
    if data_cfg.eval:
        eval_examples, _ = load_preference_examples(data_cfg.eval, tokenizer)
    else:
        train_examples, eval_examples = split_held_out(train_examples, data_cfg.eval_fraction, seed)
    train_data, stats = tokenize_preferences(train_examples, tokenizer, data_cfg.max_length, data_cfg.max_prompt_length)
    eval_data, _ = tokenize_preferences(eval_examples, tokenizer, data_cfg.max_length, data_cfg.max_prompt_length)
    skipped_text = ", ".join(f"{n} {why}" for why, n in skipped.items() if n) or "none"
    ranks.print(f"[{stage}] {len(train_data)} training / {len(eval_data)} held-out pairs; skipped: {skipped_text}; "
                f"{stats.summary()}")
    return train_data, eval_data, skipped, stats
