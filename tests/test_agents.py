"""Multi-turn episodes through the one trainer: every algorithm runs on an environment, the episode's
rewards and turns are logged, observations are not trained on, and a failing environment is named."""

import json

import pytest
import torch

from quartet.config import RLConfig, build_config
from quartet.envs import EnvironmentFailure
from quartet.runs.metrics import read_metrics
from quartet.stages.rl import run_rl


def _config(fruit, name, algorithm, env="agent_envs:AppleRounds", steps=3, **sections):
    n = 1 if algorithm in ("ppo", "reinforce++") else 4
    return build_config(RLConfig, {
        "run": {"output_dir": str(fruit / name)},
        "models": {"actor": str(fruit / "sft" / "final"), **sections.pop("models", {})},
        "data": {"train": str(fruit / "prompts.jsonl")},
        "algorithm": {"name": algorithm, **sections.pop("algorithm", {})},
        "rollout": {"max_new_tokens": 8, "n": n, "env": env, "max_turns": 3, "max_observation_tokens": 32, **sections.pop("rollout", {})},
        "batch": {"rollout_batch_size": 8, "mini_batch_size": 8 if n > 1 else 4},
        "optim": {"actor_lr": 3e-4},
        "train": {"steps": steps, "n_samples": 2},
        **sections,
    })


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "rloo", "reinforce++", "reinforce++-baseline"])
def test_every_algorithm_trains_on_a_multi_turn_environment(fruit, algorithm):
    models = {"critic_init": "actor"} if algorithm == "ppo" else {}
    summary = run_rl(_config(fruit, f"agent_{algorithm}", algorithm, models=models))
    records = read_metrics(fruit / f"agent_{algorithm}" / "metrics.jsonl")
    assert summary["steps"] == 3 and len(records) == 3
    for r in records:
        assert 1.0 <= r["turns/mean"] <= 2.0 and r["turns/max"] <= 2  # the environment ends after two rounds
        assert 0.0 <= r["env/reward"] <= 2.0
        assert abs(r["episodes/ended_done"] + r["episodes/ended_length"] + r["episodes/ended_max_turns"]
                   + r["episodes/ended_budget"] - 1.0) < 1e-9
        assert all(torch.isfinite(torch.tensor(v)) for k, v in r.items() if isinstance(v, float))
    # the score is the environment's reward (no reward model or function)
    assert records[0]["score/mean"] == pytest.approx(records[0]["env/reward"], abs=1e-5)


def test_sample_tables_and_the_report_show_the_environments_tokens_apart(fruit):
    run_rl(_config(fruit, "agent_tables", "grpo", steps=2))
    samples = [json.loads(line) for line in (fruit / "agent_tables" / "samples.jsonl").read_text().splitlines()]
    two_turns = [s for s in samples if "action" in s]
    assert two_turns, "a sample with a second turn"
    for s in two_turns:
        observed = "".join(t for t, a in zip(s["tokens"], s["action"]) if not a)
        assert "More fruits:" in observed and "More fruits:" in s["response"]
        assert all(s["actor_logprob"][i] == 0.0 for i, a in enumerate(s["action"]) if not a)
        assert any(s["actor_logprob"][i] != 0.0 for i, a in enumerate(s["action"]) if a)
    from quartet.report.html import render_report, token_table

    table = token_table(two_turns[0])
    assert "Shaded rows are the environment" in table
    assert table.count('style="background:#eef2f7') == two_turns[0]["action"].count(0)
    assert render_report(fruit / "agent_tables").is_file()


def test_the_samples_of_a_prompt_face_the_same_seeded_environment(fruit):
    run_rl(_config(fruit, "agent_secret", "grpo", env="agent_envs:SecretFruit", steps=2))
    samples = [json.loads(line) for line in (fruit / "agent_secret" / "samples.jsonl").read_text().splitlines()]
    assert samples and all("letters" in s["prompt"] for s in samples)


def test_a_failing_environment_stops_the_run_naming_it_and_the_row(fruit):
    with pytest.raises(EnvironmentFailure, match=r"agent_envs:Broken.*row 0.*KeyError"):
        run_rl(_config(fruit, "agent_broken", "grpo", env="agent_envs:Broken", steps=1))
