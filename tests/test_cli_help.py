"""`quartet ... --help`: each RL command lists its own algorithm's defaults and keys, the columns of
every listing line up, and help and config errors come before torch is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from quartet.cli import RL_COMMANDS, main
from quartet.config import RL_PRESETS, RLConfig, critic_only_keys
from quartet.rl.algorithms import get_algorithm

SRC = str(Path(__file__).resolve().parents[1] / "src")
HEAVY = ("torch", "transformers", "numpy")


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def _table(text: str) -> list[str]:
    """The lines of the key listing: key rows and their continuation lines (section headings left out)."""
    body = text[text.index("config keys ("):].splitlines()[2:]
    return [line for line in body if line.startswith("  ")]


def _columns(lines: list[str]) -> tuple[int, int, int]:
    """Where the type, default and description columns start, read off the first key row whose
    cells have no spaces inside."""
    for line in lines:
        cells = line.split()
        if line.startswith("  --") and len(cells) >= 4:
            type_at = line.index(cells[1], len("  ") + len(cells[0]))
            default_at = line.index(cells[2], type_at + len(cells[1]))
            return type_at, default_at, line.index(cells[3], default_at + len(cells[2]))
    raise AssertionError("no key row found")


def _rows(text: str) -> dict[str, tuple[str, str]]:
    """key -> (type, default) of every key row, each cell joined over its wrapped lines."""
    lines = _table(text)
    type_at, default_at, text_at = _columns(lines)
    rows: dict[str, tuple[str, str]] = {}
    for line in lines:
        if line.startswith("  --"):
            key = line.split()[0]
            rows[key] = ("", "")
        type_name, default = rows[key]
        rows[key] = (type_name + line[type_at:default_at].strip(), default + line[default_at:text_at].strip())
    return rows


@pytest.mark.parametrize("command", ["sft", "reward", "dpo", *RL_COMMANDS])
def test_every_row_of_a_listing_is_aligned(capsys, command):
    lines = _table(_help(capsys, command))
    type_at, default_at, text_at = _columns(lines)
    for line in lines:
        assert len(line) <= 120, line
        for gutter in (type_at, default_at, text_at):  # two blanks before each column, on every line
            assert line[gutter - 2:gutter] in ("  ", " ", ""), line
        if line.startswith("  --"):  # a key row: the key, then a type and a default exactly at their columns
            assert line[type_at] != " " and line[default_at] != " ", line
            assert " " not in line[2:type_at].rstrip(), line
        else:  # a continuation line: nothing in the key column
            assert not line[:type_at].strip(), line
    wrapped = [line for line in lines if not line.startswith("  --") and line[type_at:default_at].strip()]
    if command in ("ppo", "grpo"):  # the long loss_aggregation type wraps inside its column
        assert wrapped and all(len(line[type_at:default_at].rstrip()) <= default_at - type_at - 2 for line in wrapped)


@pytest.mark.parametrize("command", [c for c, (algorithm, _) in RL_COMMANDS.items() if algorithm])
def test_rl_help_shows_the_algorithm_s_own_defaults(capsys, command):
    algorithm = RL_COMMANDS[command][0]
    text = _help(capsys, command)
    rows = _rows(text)
    assert rows["--algorithm.name"][1] == algorithm
    for section, keys in RL_PRESETS.get(algorithm, {}).items():
        for key, value in keys.items():
            if f"--{section}.{key}" in rows:
                assert rows[f"--{section}.{key}"][1] == str(value), (section, key)
    defaults = RLConfig.model_fields
    not_in_preset = [k for k in ("data.max_prompt_length", "train.steps", "optim.actor_lr")
                     if k.split(".")[1] not in RL_PRESETS.get(algorithm, {}).get(k.split(".")[0], {})]
    for key in not_in_preset:  # keys the preset leaves alone keep the section's default
        section, leaf = key.split(".")
        assert rows[f"--{key}"][1] == str(getattr(defaults[section].get_default(call_default_factory=True), leaf))


def test_grpo_help_rows_show_group_size_and_beta(capsys):
    rows = _rows(_help(capsys, "grpo"))
    assert rows["--rollout.n"] == ("int", "8") and rows["--algorithm.beta"] == ("float", "0.04")
    assert rows["--algorithm.kl_estimator"][1] == "k3" and rows["--batch.ppo_epochs"][1] == "1"
    rows = _rows(_help(capsys, "ppo"))
    assert rows["--rollout.n"] == ("int", "1") and rows["--algorithm.beta"] == ("float", "0.1")


@pytest.mark.parametrize("command", list(RL_COMMANDS))
def test_critic_keys_listed_only_for_algorithms_with_a_critic(capsys, command):
    critic_keys = critic_only_keys(RLConfig)
    assert {"models.critic", "models.critic_init", "algorithm.vf_coef", "algorithm.cliprange_value",
            "algorithm.lam", "optim.critic_lr"} <= set(critic_keys)
    text = _help(capsys, command)
    rows = _rows(text)
    needs_critic = get_algorithm(RL_COMMANDS[command][0] or "ppo").needs_critic
    assert command != "ppo" or needs_critic
    assert command != "grpo" or not needs_critic
    for key in critic_keys:
        assert (f"--{key}" in rows) == needs_critic, key
    assert ("trains no critic: the critic's keys are left out" in text) == (not needs_critic)
    for key in ("--algorithm.gamma", "--algorithm.beta", "--rollout.n", "--optim.actor_lr"):
        assert key in rows  # the keys every algorithm reads stay


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def _imported(importtime: str) -> set[str]:
    """Top-level package names in a `python -X importtime` report."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in importtime.splitlines()
            if line.startswith("import time:") and "|" in line}


def test_cli_and_config_import_no_torch():
    code = ("import sys, quartet.cli, quartet.config\n"
            "from quartet.cli import build_parser\n"
            "parser, _ = build_parser()\n"
            "parser.format_help()\n"
            "from quartet.config import RLConfig, SFTConfig, describe_config, load_config\n"
            "describe_config(SFTConfig)\n"
            "load_config(SFTConfig, None, ['--train.lr', '1e-4'])\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = _python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_help_and_a_misspelt_key_come_before_torch():
    result = _python("-X", "importtime", "-m", "quartet", "--help")
    assert result.returncode == 0 and "grpo" in result.stdout
    assert "quartet" in _imported(result.stderr) and not _imported(result.stderr) & set(HEAVY)
    result = _python("-X", "importtime", "-m", "quartet", "grpo", "--train.lrr", "1")
    assert result.returncode == 2
    assert "error: unknown config key 'train.lrr'" in result.stderr
    assert "quartet" in _imported(result.stderr) and not _imported(result.stderr) & set(HEAVY)
