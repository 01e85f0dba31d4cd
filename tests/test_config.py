"""Configs: YAML + dotted overrides, and errors that name the key and suggest the right one."""

import pytest
import yaml

from quartet.config import ConfigError, PPOConfig, RewardConfig, SFTConfig, dump_config, load_config, parse_overrides
from quartet.stages.pipeline import build_pipeline_configs


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\n  batch_size: 4\ndata:\n  train: d.jsonl\n")
    cfg = load_config(SFTConfig, path, ["--train.lr", "1e-4", "--lora.enabled=true", "--data.max_length", "128"])
    assert cfg.train.lr == pytest.approx(1e-4)  # the command line wins over the file
    assert cfg.train.batch_size == 4  # the file wins over the default
    assert cfg.lora.enabled is True
    assert cfg.data.max_length == 128 and cfg.data.train == "d.jsonl"


def test_override_values_are_typed():
    assert parse_overrides(["--a.b", "1e-4", "--c", "true", "--d=null", "--e", "[1, 2]", "--f", "text"]) == {
        "a.b": 1e-4, "c": True, "d": None, "e": [1, 2], "f": "text"}


@pytest.mark.parametrize("args, expected", [
    (["--train.lrr", "1"], "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
    (["--trian.lr", "1"], "did you mean 'train.lr'?"),
    (["--train.learning_rate", "1"], "did you mean 'train.lr'?"),
    (["--train.batch_size", "abc"], "config key 'train.batch_size'"),
    (["--train.lr", "-1"], "config key 'train.lr'"),
    (["--train.lr"], "needs a value"),
])
def test_override_errors_name_the_key(args, expected):
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, None, args)
    assert expected in str(err.value)


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochz: 2\n")
    with pytest.raises(ConfigError, match=r"'train.epochz'; did you mean 'train.epochs'"):
        load_config(SFTConfig, path)


def test_wrong_type_in_file_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: 3\n")
    with pytest.raises(ConfigError, match="'train' must be a section"):
        load_config(SFTConfig, path)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(RewardConfig, None, ["--loss.center_coef", "0.01", "--data.train", "p.jsonl"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(RewardConfig, tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["loss"]["center_coef"] == 0.01


def test_ppo_batch_arithmetic_is_checked_at_load():
    base = ["--models.actor", "a", "--models.reward", "r"]
    with pytest.raises(ConfigError, match=r"rollout_batch_size \(12\) must be a multiple of ppo.mini_batch_size \(8\)"):
        load_config(PPOConfig, None, base + ["--ppo.rollout_batch_size", "12"])
    with pytest.raises(ConfigError, match=r"mini_batch_size \(8\) must be a multiple of ppo.grad_accum \(3\)"):
        load_config(PPOConfig, None, base + ["--ppo.grad_accum", "3"])
    with pytest.raises(ConfigError, match=r"set models.reward \(a reward model directory\) or models.reward_fn"):
        load_config(PPOConfig, None, ["--models.actor", "a"])


def test_shared_trunk_refuses_a_separate_critic_and_lora():
    base = ["--models.actor", "a", "--models.reward", "r", "--ppo.shared_trunk", "true"]
    assert load_config(PPOConfig, None, base).ppo.shared_trunk
    with pytest.raises(ConfigError, match="ppo.shared_trunk builds the critic on the actor's trunk: leave models.critic"):
        load_config(PPOConfig, None, base + ["--models.critic", "c"])
    with pytest.raises(ConfigError, match="ppo.shared_trunk does not combine with LoRA"):
        load_config(PPOConfig, None, base + ["--lora.enabled", "true"])
    # the value head starts fresh on the actor's trunk: no reward model needed for the critic
    assert load_config(PPOConfig, None, ["--models.actor", "a", "--models.reward_fn", "m:f", "--ppo.shared_trunk", "true"])


def test_deepspeed_chat_preset_sits_under_overrides():
    base = ["--models.actor", "a", "--models.reward", "r", "--preset", "deepspeed-chat"]
    cfg = load_config(PPOConfig, None, base)
    p = cfg.ppo
    assert (p.beta, p.adaptive_kl, p.clip_reward_value, p.gamma, p.lam) == (0.1, False, 5.0, 1.0, 0.95)
    assert (p.whiten_advantages, p.ppo_epochs, p.cliprange, p.cliprange_value) == (False, 1, 0.2, 0.2)
    assert load_config(PPOConfig, None, base + ["--ppo.ppo_epochs", "3"]).ppo.ppo_epochs == 3
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config(PPOConfig, None, ["--models.actor", "a", "--models.reward", "r", "--preset", "nope"])


def test_pipeline_wires_each_stage_to_the_previous_one(tmp_path):
    sft, reward, ppo = build_pipeline_configs(
        {"output_dir": str(tmp_path), "sft": {"data": {"train": "s.jsonl"}}, "reward": {"data": {"train": "p.jsonl"}},
         "ppo": {"data": {"train": "q.jsonl"}}}, ["--ppo.ppo.steps", "7"])
    assert reward.model.path == str(tmp_path / "sft" / "final")
    assert ppo.models.actor == str(tmp_path / "sft" / "final")
    assert ppo.models.reward == str(tmp_path / "reward" / "final")
    assert ppo.ppo.steps == 7 and sft.run.output_dir == str(tmp_path / "sft")
    with pytest.raises(ConfigError, match="pipeline section 'reward': unknown config key 'train.lrr'"):
        build_pipeline_configs({"reward": {"train": {"lrr": 1}}})
