"""Loading and saving models in Hugging Face format (safetensors only, no remote code by default)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

# Quartet draws its own progress bars; transformers' per-shard bars on tiny models are noise.
hf_logging.disable_progress_bar()

_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


class ModelLoadError(ValueError):
    """A model or tokenizer directory that cannot be used, with the reason."""


def require_local_dir(path: str | Path, what: str = "model") -> Path:
    """Check that `path` is an existing local directory (Quartet never downloads from a hub)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{what} directory not found: {path} (Quartet loads local Hugging Face directories only)")
    return path


def _check_weights(path: Path, allow_pickle: bool) -> bool:
    """Return whether to load safetensors; refuse pickle weights unless explicitly allowed."""
    has_safetensors = any(path.glob("*.safetensors"))
    if has_safetensors:
        return True
    pickles = [name for name in _PICKLE_WEIGHTS if (path / name).exists()]
    if pickles and not allow_pickle:
        raise ModelLoadError(
            f"{path}: only pickle weights ({pickles[0]}) found; pickle can run code when loaded. "
            "Convert them to safetensors, or set model.allow_pickle=true if you trust this file."
        )
    if not pickles:
        raise ModelLoadError(f"{path}: no model weights (*.safetensors) found")
    return False


def check_model_dir(path: str | Path, what: str, allow_pickle: bool = False) -> Path:
    """Cheap up-front check that `path` is a local model directory with usable weights."""
    try:
        path = require_local_dir(path)
        _check_weights(path, allow_pickle)
    except ModelLoadError as err:
        raise ModelLoadError(f"{what}: {err}") from None
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{what}: {path} has no config.json (not a Hugging Face model directory)")
    return path


def load_causal_lm(path: str | Path, trust_remote_code: bool = False, allow_pickle: bool = False,
                   dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a causal LM from a local directory."""
    path = require_local_dir(path)
    use_safetensors = _check_weights(path, allow_pickle)
    return AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=trust_remote_code, use_safetensors=use_safetensors, dtype=dtype
    )


def load_scalar_model(path: str | Path, trust_remote_code: bool = False, allow_pickle: bool = False,
                      dtype: torch.dtype = torch.float32, pad_token_id: int | None = None,
                      require_trained_head: bool = False) -> PreTrainedModel:
    """Load a one-output sequence-classification model (reward model or critic).

    From a reward/critic checkpoint the trained `score` head is loaded; from a causal LM
    checkpoint the transformer is reused and a fresh linear head is initialised, which suits a
    critic but not a reward model: `require_trained_head` refuses it.
    """
    path = require_local_dir(path)
    use_safetensors = _check_weights(path, allow_pickle)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if require_trained_head and not _is_sequence_classifier(config):
        raise ModelLoadError(
            f"{path}: not a reward model (architectures {config.architectures}, no trained score head); "
            "train one with `quartet reward`, or give a ...ForSequenceClassification model with num_labels=1"
        )
    if getattr(config, "num_labels", 1) != 1 and _is_sequence_classifier(config):
        raise ModelLoadError(
            f"{path}: this sequence-classification model has {config.num_labels} outputs; "
            "a reward model or critic needs exactly one (num_labels=1)"
        )
    config.num_labels = 1
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    # from a causal LM the score head is new by design: transformers' "MISSING ... newly initialized" report
    # would only alarm (the head is trained next, or is a critic's fresh head)
    fresh_head = not _is_sequence_classifier(config)
    verbosity = hf_logging.get_verbosity()
    if fresh_head:
        hf_logging.set_verbosity_error()
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            str(path), config=config, trust_remote_code=trust_remote_code, use_safetensors=use_safetensors, dtype=dtype
        )
    finally:
        hf_logging.set_verbosity(verbosity)


def _is_sequence_classifier(config) -> bool:
    return any(arch.endswith("ForSequenceClassification") for arch in (config.architectures or []))


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, output_dir: str | Path,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model` (safetensors) and `tokenizer` as a directory that plain transformers loads.

    `state_dict` replaces the model's own weights (the gathered copy of a sharded model).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir), safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(output_dir))
    return output_dir
