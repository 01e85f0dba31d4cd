"""Shared fixtures: a tokenizer trained here and tiny models saved as Hugging Face directories."""

import os

import pytest
import torch

from quartet.models.loading import save_model
from quartet.models.presets import build_preset_model
from quartet.models.tokenizer import train_bpe_tokenizer

os.environ.setdefault("QUARTET_PROGRESS", "0")
torch.set_num_threads(2)

CORPUS = [
    "Once upon a time there was a little robot who liked apples and bananas.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Question: what is two plus two? Answer: four.",
    "Try Lotus Garden near the station: cheap noodles, get the beef broth.",
    "Human: how do I bake bread? Assistant: mix flour, water, salt and yeast.",
] * 20


@pytest.fixture(scope="session")
def tokenizer():
    return train_bpe_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory, tokenizer):
    """A nano Llama causal LM with its tokenizer, saved as a model directory."""
    path = tmp_path_factory.mktemp("lm")
    save_model(build_preset_model("nano", tokenizer, seed=0), tokenizer, path)
    return path


@pytest.fixture(scope="session")
def scalar_dir(tmp_path_factory, tokenizer):
    """A nano one-output sequence classifier (reward model / critic), saved as a model directory."""
    path = tmp_path_factory.mktemp("rm")
    save_model(build_preset_model("nano", tokenizer, seed=1, scalar=True), tokenizer, path)
    return path
