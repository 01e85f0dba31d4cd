"""`quartet pipeline`: SFT -> reward -> PPO from one file, each stage reading the previous final/."""

import json
import random

import yaml

from quartet.cli import main
from quartet.runs.metrics import read_metrics

FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"]


def _lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_pipeline_runs_three_stages_in_order(tmp_path):
    rng = random.Random(0)
    prompt = "List some fruits:"
    sft = [{"prompt": prompt, "completion": " " + " ".join(rng.choice(FRUITS) for _ in range(4))} for _ in range(200)]
    prefs = [{"prompt": prompt, "chosen": " apple " + " ".join(rng.choice(FRUITS) for _ in range(3)),
              "rejected": " " + " ".join(rng.choice(FRUITS[1:]) for _ in range(4))} for _ in range(200)]
    config = {
        "output_dir": str(tmp_path / "out"),
        "sft": {"model": {"preset": "nano", "vocab_size": 300}, "data": {"train": _lines(tmp_path / "sft.jsonl", sft)},
                "train": {"lr": 3e-3, "max_steps": 30, "batch_size": 16}},
        "reward": {"data": {"train": _lines(tmp_path / "prefs.jsonl", prefs)},
                   "train": {"lr": 3e-3, "max_steps": 20, "batch_size": 16}},
        "ppo": {"data": {"train": _lines(tmp_path / "prompts.jsonl", [{"prompt": prompt}])},
                "rollout": {"max_new_tokens": 8},
                "batch": {"rollout_batch_size": 8, "mini_batch_size": 4}, "train": {"steps": 3}},
    }
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    assert main(["pipeline", "--config", str(tmp_path / "pipeline.yaml"), "--ppo.algorithm.beta", "0.2"]) == 0
    out = tmp_path / "out"
    for stage in ("sft", "reward", "ppo"):
        assert (out / stage / "final" / "model.safetensors").exists(), stage
    reward_cfg = yaml.safe_load((out / "reward" / "config.yaml").read_text())
    ppo_cfg = yaml.safe_load((out / "ppo" / "config.yaml").read_text())
    assert reward_cfg["model"]["path"] == str(out / "sft" / "final")
    assert ppo_cfg["models"]["actor"] == str(out / "sft" / "final")
    assert ppo_cfg["models"]["reward"] == str(out / "reward" / "final")
    assert ppo_cfg["algorithm"]["beta"] == 0.2
    assert len(read_metrics(out / "ppo" / "metrics.jsonl")) == 3
    # the critic starts from the reward model (DeepSpeed-Chat's default)
    assert (out / "ppo" / "final_critic" / "model.safetensors").exists()
