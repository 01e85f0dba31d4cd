"""Shared fixtures: a tokenizer trained here and tiny models saved as Hugging Face directories."""

import json
import os
import random

import pytest
import torch

from quartet.config import SFTConfig, build_config
from quartet.models.loading import save_model
from quartet.models.presets import build_preset_model
from quartet.models.tokenizer import train_bpe_tokenizer
from quartet.stages.sft import run_sft

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


FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"]


@pytest.fixture(scope="session")
def fruit(tmp_path_factory):
    """An SFT model that lists random fruits (each about 1/8 of the time), and a prompt file."""
    root = tmp_path_factory.mktemp("fruit")
    rng = random.Random(0)
    rows = [{"prompt": "List some fruits:", "completion": " " + " ".join(rng.choice(FRUITS) for _ in range(6))}
            for _ in range(400)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "prompts.jsonl").write_text(json.dumps({"prompt": "List some fruits:"}) + "\n")
    run_sft(build_config(SFTConfig, {
        "run": {"output_dir": str(root / "sft")}, "model": {"preset": "nano", "vocab_size": 300},
        "data": {"train": str(root / "sft.jsonl"), "eval_fraction": 0.05, "max_length": 32},
        "train": {"lr": 3e-3, "max_steps": 60, "batch_size": 16, "eval_every": 60}}))
    return root


class RecordingBar:
    """Stands in for quartet.runs.progress.progress_bar: records its total and how far it advanced."""

    def __init__(self, total: int, desc: str, initial: int = 0, disable: bool = False):
        self.total, self.desc, self.n, self.disable = total, desc, initial, disable
        self.updates: list[int] = []

    def update(self, n: int = 1) -> None:
        self.updates.append(n)
        self.n += n

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


@pytest.fixture
def recording_bars():
    """A progress_bar replacement (monkeypatch it where a module imported it) and the bars it made."""
    bars: list[RecordingBar] = []

    def make(*args, **kwargs) -> RecordingBar:
        bars.append(RecordingBar(*args, **kwargs))
        return bars[-1]

    return make, bars
