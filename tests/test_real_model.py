"""Every stage on a real pretrained model: Karpathy's stories260K, converted from llama2.c."""

import json
import math
from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification

from asset_paths import HH_SAMPLE, STORIES260K
from quartet.config import RewardConfig, RLConfig, SFTConfig, build_config, load_config
from quartet.models.llama2c import convert_llama2c
from quartet.runs.metrics import read_metrics
from quartet.stages.reward import run_reward
from quartet.stages.rl import run_rl
from quartet.stages.sft import run_sft

STORIES = STORIES260K
HH = HH_SAMPLE
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    out = tmp_path_factory.mktemp("stories") / "hf"
    return convert_llama2c(STORIES / "stories260K.bin", STORIES / "tok512.bin", out)


def _fifth(records, key, part):
    k = max(1, len(records) // 5)
    chunk = records[:k] if part == "first" else records[-k:]
    return sum(r[key] for r in chunk) / k


def test_ppo_makes_stories_happier_and_stays_fluent(stories, tmp_path):
    cfg = load_config(RLConfig, CONFIGS / "ppo_stories260k.yaml",
                      ["--models.actor", str(stories), "--run.output_dir", str(tmp_path / "ppo"),
                       "--data.train", str(CONFIGS / "story_prompts.jsonl")])
    run_rl(cfg)
    records = read_metrics(tmp_path / "ppo" / "metrics.jsonl")
    first, last = _fifth(records, "score/mean", "first"), _fifth(records, "score/mean", "last")
    print(f"happy score {first:.3f} -> {last:.3f}; KL {_fifth(records, 'kl/ref', 'last'):.2f}; reference perplexity "
          f"{_fifth(records, 'response/ref_perplexity', 'first'):.2f} -> {_fifth(records, 'response/ref_perplexity', 'last'):.2f}")
    # Over seeds 0-4 and float-level changes of equal numerics (1e-5 in log-probs), this 30-step run
    # ended 1.39x to 3.05x above its start (a 1.5x bound failed on seeds 3 and 4 with the old code too)
    assert last > 1.25 * first
    assert _fifth(records, "kl/ref", "last") < 12.0  # nats per 32-token response
    # still text the reference model finds likely: not degenerate gibberish
    assert _fifth(records, "response/ref_perplexity", "last") < 1.5 * _fifth(records, "response/ref_perplexity", "first")


def test_sft_and_reward_model_on_the_real_model(stories, tmp_path):
    rows = [json.loads(line) for line in HH.read_text().splitlines()[:96]]
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = run_sft(build_config(SFTConfig, {
        "run": {"output_dir": str(tmp_path / "sft")}, "model": {"path": str(stories)},
        "data": {"train": str(data), "completion_field": "chosen", "eval_fraction": 0.15, "max_length": 128,
                 "max_prompt_length": 96},
        "train": {"lr": 1e-3, "max_steps": 12, "batch_size": 8, "eval_every": 12}}))
    assert sft["eval/loss"] < sft["initial_eval/loss"]
    reward = run_reward(build_config(RewardConfig, {
        "run": {"output_dir": str(tmp_path / "rm")}, "model": {"path": str(tmp_path / "sft" / "final")},
        "data": {"train": str(data), "eval_fraction": 0.15, "max_length": 128, "max_prompt_length": 96},
        "train": {"lr": 1e-3, "max_steps": 12, "batch_size": 8, "eval_every": 12}}))
    assert math.isfinite(reward["eval/loss"]) and reward["reward_std"] > 0
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "final")
    assert rm.config.num_labels == 1 and rm.config.reward_mean == pytest.approx(reward["reward_mean"])
