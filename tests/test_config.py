"""Configs: YAML + dotted overrides, and errors that name the key and suggest the right one."""

import pytest
import yaml

from quartet.cli import main
from quartet.config import (
    ConfigError,
    DPOConfig,
    RewardConfig,
    RLConfig,
    SFTConfig,
    build_config,
    dump_config,
    load_config,
    load_run_config,
    parse_overrides,
)
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
    with pytest.raises(ConfigError, match=r"rollout_batch_size \(12\) must be a multiple of batch.mini_batch_size \(8\)"):
        load_config(RLConfig, None, base + ["--batch.rollout_batch_size", "12"])
    with pytest.raises(ConfigError, match=r"mini_batch_size \(8\) must be a multiple of batch.grad_accum \(3\)"):
        load_config(RLConfig, None, base + ["--batch.grad_accum", "3"])
    with pytest.raises(ConfigError, match=r"set models.reward \(a reward model directory\), models.reward_fn .* or models.reward_url"):
        load_config(RLConfig, None, ["--models.actor", "a"])


def test_shared_trunk_refuses_a_separate_critic_and_lora():
    base = ["--models.actor", "a", "--models.reward", "r", "--models.shared_trunk", "true"]
    assert load_config(RLConfig, None, base).models.shared_trunk
    with pytest.raises(ConfigError, match="models.shared_trunk builds the critic on the actor's trunk: leave models.critic"):
        load_config(RLConfig, None, base + ["--models.critic", "c"])
    with pytest.raises(ConfigError, match="models.shared_trunk does not combine with LoRA"):
        load_config(RLConfig, None, base + ["--lora.enabled", "true"])
    # the value head starts fresh on the actor's trunk: no reward model needed for the critic
    assert load_config(RLConfig, None, ["--models.actor", "a", "--models.reward_fn", "m:f", "--models.shared_trunk", "true"])


def test_deepspeed_chat_preset_sits_under_overrides():
    base = ["--models.actor", "a", "--models.reward", "r", "--preset", "deepspeed-chat"]
    cfg = load_config(RLConfig, None, base)
    p = cfg.algorithm
    assert (p.beta, p.adaptive_kl, p.clip_reward_value, p.gamma, p.lam) == (0.1, False, 5.0, 1.0, 0.95)
    assert (p.whiten_advantages, cfg.batch.ppo_epochs, p.cliprange, p.cliprange_value) == (False, 1, 0.2, 0.2)
    assert load_config(RLConfig, None, base + ["--batch.ppo_epochs", "3"]).batch.ppo_epochs == 3
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config(RLConfig, None, ["--models.actor", "a", "--models.reward", "r", "--preset", "nope"])


def test_keys_of_the_flat_ppo_section_keep_working_under_their_new_names(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("models: {actor: a, reward: r}\ngeneration: {max_new_tokens: 12}\n"
                    "ppo: {steps: 7, beta: 0.3, actor_lr: 2.0e-5, rollout_batch_size: 8, shared_trunk: true}\n")
    with pytest.warns(FutureWarning, match=r"ppo.beta -> algorithm.beta.*ppo.ppo_epochs -> batch.ppo_epochs"):
        cfg = load_config(RLConfig, path, ["--ppo.ppo_epochs", "3"])
    assert (cfg.train.steps, cfg.algorithm.beta, cfg.optim.actor_lr, cfg.batch.rollout_batch_size) == (7, 0.3, 2e-5, 8)
    assert cfg.rollout.max_new_tokens == 12 and cfg.models.shared_trunk and cfg.batch.ppo_epochs == 3
    new = load_config(RLConfig, None, ["--models.actor", "a", "--models.reward", "r", "--rollout.max_new_tokens", "12",
                                       "--train.steps", "7", "--algorithm.beta", "0.3", "--optim.actor_lr", "2e-5",
                                       "--batch.rollout_batch_size", "8", "--models.shared_trunk", "true",
                                       "--batch.ppo_epochs", "3"])
    assert new == cfg
    # an old section's key that never existed is named, with the closest current key
    with pytest.raises(ConfigError, match=r"unknown config key 'ppo.betaa'; did you mean 'algorithm.beta'"):
        load_config(RLConfig, None, ["--models.actor", "a", "--models.reward", "r", "--ppo.betaa", "1"])


def test_an_unknown_algorithm_is_named_with_the_registered_ones():
    with pytest.raises(ConfigError, match=r"unknown algorithm 'ppoo'; registered: .*ppo"):
        load_config(RLConfig, None, ["--models.actor", "a", "--models.reward", "r", "--algorithm.name", "ppoo"])


def test_pipeline_wires_each_stage_to_the_previous_one(tmp_path):
    sft, reward, ppo = build_pipeline_configs(
        {"output_dir": str(tmp_path), "sft": {"data": {"train": "s.jsonl"}}, "reward": {"data": {"train": "p.jsonl"}},
         "ppo": {"data": {"train": "q.jsonl"}}}, ["--ppo.train.steps", "7"])
    assert reward.model.path == str(tmp_path / "sft" / "final")
    assert ppo.models.actor == str(tmp_path / "sft" / "final")
    assert ppo.models.reward == str(tmp_path / "reward" / "final")
    assert ppo.train.steps == 7 and sft.run.output_dir == str(tmp_path / "sft")
    with pytest.raises(ConfigError, match="pipeline section 'reward': unknown config key 'train.lrr'"):
        build_pipeline_configs({"reward": {"train": {"lrr": 1}}})


# --------------------------------------------------------------------------- --resume: the run's own config

RESUMABLE = {  # command -> the config its run writes (an RL command's algorithm, from the command or the file)
    "sft": (SFTConfig, {"data": {"train": "d.jsonl"}, "train": {"batch_size": 4}}),
    "reward": (RewardConfig, {"data": {"train": "p.jsonl"}}),
    "dpo": (DPOConfig, {"model": {"path": "sft/final"}, "data": {"train": "p.jsonl"}}),
    "ppo": (RLConfig, {"models": {"actor": "sft/final", "reward": "rm/final"}, "data": {"train": "q.jsonl"}}),
    "grpo": (RLConfig, {"algorithm": {"name": "grpo"}, "models": {"actor": "sft/final", "reward_fn": "m:f"},
                        "data": {"train": "q.jsonl"}, "batch": {"rollout_batch_size": 16}}),
    "rloo": (RLConfig, {"algorithm": {"name": "rloo"}, "models": {"actor": "sft/final", "reward_fn": "m:f"},
                        "data": {"train": "q.jsonl"}}),
    "reinforce": (RLConfig, {"algorithm": {"name": "reinforce++"}, "models": {"actor": "sft/final", "reward_fn": "m:f"},
                             "data": {"train": "q.jsonl"}}),
    "rl": (RLConfig, {"preset": "dapo", "models": {"actor": "sft/final", "reward_fn": "m:f"}, "data": {"train": "q.jsonl"}}),
}


def _written_run(tmp_path, command: str):
    """A run directory as `quartet COMMAND` leaves it: the resolved config in config.yaml."""
    config_cls, data = RESUMABLE[command]
    run_dir = tmp_path / command
    run_dir.mkdir()
    config = build_config(config_cls, {**data, "run": {"output_dir": str(run_dir), "seed": 3}})
    dump_config(config, run_dir / "config.yaml")
    return config_cls, config, run_dir


@pytest.mark.parametrize("command", list(RESUMABLE))
def test_resume_without_config_continues_with_the_run_s_own_config(tmp_path, command):
    config_cls, written, run_dir = _written_run(tmp_path, command)
    named = [] if command == "rl" else ["--algorithm.name", written.algorithm.name] if config_cls is RLConfig else []
    steps = "--train.steps" if config_cls is RLConfig else "--train.max_steps"
    loaded = load_run_config(config_cls, None, [*named, "--run.output_dir", str(run_dir), steps, "77",
                                                "--train.log_every", "3"], resume=True)
    expected = written.model_dump()
    section = expected["train"]
    section["steps" if config_cls is RLConfig else "max_steps"], section["log_every"] = 77, 3  # harmless: allowed
    assert loaded.model_dump() == expected


@pytest.mark.parametrize("command", list(RESUMABLE))
def test_resume_refuses_overrides_that_change_what_the_checkpoints_mean(tmp_path, command, capsys):
    config_cls, written, run_dir = _written_run(tmp_path, command)
    shape = "--batch.mini_batch_size" if config_cls is RLConfig else "--train.batch_size"
    before = (run_dir / "config.yaml").read_bytes()
    code = main([command, "--output", str(run_dir), "--resume", "--run.seed", "4", shape, "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --resume continues the run"), err
    assert "run.seed (the run's 3, here 4)" in err and f"{shape[2:]} (the run's" in err and "another --output" in err
    assert (run_dir / "config.yaml").read_bytes() == before and sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def test_resume_with_another_algorithm_or_model_is_refused_by_key(tmp_path, capsys):
    _, _, run_dir = _written_run(tmp_path, "grpo")
    assert main(["ppo", "--output", str(run_dir), "--resume"]) == 2
    assert "algorithm.name (the run's 'grpo', here 'ppo')" in capsys.readouterr().err
    assert main(["grpo", "--output", str(run_dir), "--resume", "--models.actor", "other/final"]) == 2
    assert "models.actor (the run's 'sft/final', here 'other/final')" in capsys.readouterr().err
    _, _, sft_run = _written_run(tmp_path, "sft")  # built from the tiny preset: a path would clash with it
    assert main(["sft", "--output", str(sft_run), "--resume", "--model.path", "sft/final"]) == 2
    assert "model.path (the run's None, here 'sft/final')" in capsys.readouterr().err
    # the long form is checked the same way: a --config of another run cannot continue this one
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**RESUMABLE["grpo"][1], "run": {"seed": 3}, "rollout": {"n": 4}}))
    assert main(["grpo", "--config", str(other), "--output", str(run_dir), "--resume"]) == 2
    assert "rollout.n (the run's 8, here 4)" in capsys.readouterr().err


def test_resume_of_a_directory_without_its_config_says_what_to_give(tmp_path, capsys):
    assert main(["grpo", "--output", str(tmp_path / "none"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "models.actor is required" in err and "holds no config.yaml to resume with: give the run's config with --config FILE" in err
    _, _, sft_run = _written_run(tmp_path, "sft")  # another stage's run
    assert main(["grpo", "--output", str(sft_run), "--resume"]) == 2
    assert "config.yaml does not load as this command's config (is it another stage's run?)" in capsys.readouterr().err
