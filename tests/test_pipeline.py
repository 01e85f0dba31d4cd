"""`quartet pipeline`: SFT -> reward -> PPO (or SFT -> DPO) from one file, each stage reading the previous final/."""

import json
import random

import pytest
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


def test_pipeline_runs_sft_then_dpo_from_the_same_preference_file(tmp_path):
    rng = random.Random(0)
    prompt = "List some fruits:"
    sft = [{"prompt": prompt, "completion": " " + " ".join(rng.choice(FRUITS) for _ in range(4))} for _ in range(200)]
    prefs = [{"prompt": prompt, "chosen": " apple " + " ".join(rng.choice(FRUITS) for _ in range(3)),
              "rejected": " " + " ".join(rng.choice(FRUITS[1:]) for _ in range(4))} for _ in range(200)]
    config = {
        "output_dir": str(tmp_path / "out"),
        "sft": {"model": {"preset": "nano", "vocab_size": 300}, "data": {"train": _lines(tmp_path / "sft.jsonl", sft)},
                "train": {"lr": 3e-3, "max_steps": 20, "batch_size": 16}},
        "dpo": {"data": {"train": _lines(tmp_path / "prefs.jsonl", prefs)},
                "train": {"lr": 1e-3, "max_steps": 10, "batch_size": 16, "eval_every": 10}},
    }
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config))
    assert main(["pipeline", "--config", str(tmp_path / "pipeline.yaml"), "--dpo.dpo.beta", "0.2"]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["dpo", "sft"]
    dpo_cfg = yaml.safe_load((out / "dpo" / "config.yaml").read_text())
    assert dpo_cfg["model"]["path"] == str(out / "sft" / "final") and dpo_cfg["dpo"]["beta"] == 0.2
    summary = json.loads((out / "dpo" / "summary.json").read_text())
    assert summary["stage"] == "dpo" and summary["steps"] == 10
    assert summary["eval/rewards/accuracies"] > summary["initial_eval/rewards/accuracies"]
    assert (out / "dpo" / "final" / "model.safetensors").exists()


def test_a_pipeline_file_takes_one_path(tmp_path):
    from quartet.config import ConfigError
    from quartet.stages.pipeline import build_pipeline_configs

    sft, dpo = build_pipeline_configs({"output_dir": str(tmp_path), "sft": {"data": {"train": "s.jsonl"}},
                                       "dpo": {"data": {"train": "p.jsonl"}}}, ["--dpo.train.max_steps", "7"])
    assert dpo.model.path == str(tmp_path / "sft" / "final") and dpo.run.output_dir == str(tmp_path / "dpo")
    assert dpo.train.max_steps == 7
    with pytest.raises(ConfigError, match="sft -> reward -> ppo or sft -> dpo"):
        build_pipeline_configs({"sft": {}, "reward": {}, "dpo": {}})
    with pytest.raises(ConfigError, match="must start with one of"):
        build_pipeline_configs({"sft": {}, "dpo": {}}, ["--ppo.train.steps", "3"])


@pytest.mark.parametrize("name", ["pipeline_hh.yaml", "pipeline_hh_dpo.yaml"])
def test_the_shipped_pipeline_files_validate_and_find_their_data_in_the_repository(name, monkeypatch):
    from pathlib import Path

    from quartet.config import read_yaml
    from quartet.stages.pipeline import build_pipeline_configs

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # their paths are relative to the repository root
    configs = build_pipeline_configs(read_yaml(root / "configs" / name))
    assert [type(c).__name__ for c in configs][-1] == ("DPOConfig" if "dpo" in name else "RLConfig")
    for cfg in configs:
        assert Path(cfg.data.train).is_file(), cfg.data.train
