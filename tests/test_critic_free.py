"""GRPO, RLOO and REINFORCE++ (and DAPO's and Dr. GRPO's fixes) end to end on the fruit task: the
rule reward rises with no critic anywhere, KL goes where the algorithm puts it, dataset columns
reach the reward function, and dynamic sampling fills the batch with groups that carry a signal."""

import json
import re

import pytest
import torch

from quartet.config import RLConfig, build_config
from quartet.runs.metrics import read_metrics
from quartet.stages.rl import run_rl


def _config(fruit, name, algorithm, steps=20, reward_fn="rule_rewards:apple_fraction", data="prompts.jsonl",
            settings=None, **sections):
    return build_config(RLConfig, {
        "run": {"output_dir": str(fruit / name)},
        "models": {"actor": str(fruit / "sft" / "final"), "reward_fn": reward_fn},
        "data": {"train": str(fruit / data)},
        "algorithm": {"name": algorithm, **(settings or {})},
        "rollout": {"max_new_tokens": 10, "n": 8, **sections.pop("rollout", {})},
        "batch": {"rollout_batch_size": 32, "mini_batch_size": 16},
        "optim": {"actor_lr": 3e-4},
        "train": {"steps": steps, "n_samples": 2, **sections.pop("train", {})},
        **sections,
    })


def _mean(records, key, part):
    values = [r[key] for r in records]
    k = len(values) // 5
    return sum(values[:k] if part == "first" else values[-k:]) / k


@pytest.mark.parametrize("algorithm, preset", [("grpo", None), ("rloo", None), ("reinforce++", None),
                                               ("reinforce++-baseline", None), ("grpo", "dr-grpo")])
def test_the_rule_reward_rises_without_a_critic(fruit, algorithm, preset):
    name = f"cf_{preset or algorithm}"
    run_rl(_config(fruit, name, algorithm, **({"preset": preset} if preset else {})))
    records = read_metrics(fruit / name / "metrics.jsonl")
    print(algorithm, preset, "score per step:", [round(r["score/mean"], 2) for r in records])
    assert _mean(records, "score/mean", "last") > _mean(records, "score/mean", "first") + 0.1
    assert not (fruit / name / "final_critic").exists()
    assert not any(k.startswith(("value/", "loss/value", "grad_norm/critic")) for k in records[-1])
    summary = json.loads((fruit / name / "summary.json").read_text())
    assert summary["stage"] == algorithm and summary["steps"] == 20


def test_grpo_puts_the_kl_in_the_loss_and_dr_grpo_loads_no_reference(fruit):
    grpo = read_metrics(fruit / "cf_grpo" / "metrics.jsonl")
    assert all(r["loss/kl"] >= 0 for r in grpo) and grpo[0]["kl/ref"] == pytest.approx(0.0, abs=1e-6)
    assert all(r["reward/total"] == pytest.approx(r["score/mean"], abs=1e-6) for r in grpo)  # no KL in the reward
    assert all(0.0 <= r["groups/no_signal"] <= 1.0 for r in grpo)
    dr = read_metrics(fruit / "cf_dr-grpo" / "metrics.jsonl")
    assert not any(k.startswith("kl/") or k == "loss/kl" for k in dr[-1])  # beta 0: no reference, no KL
    rloo = read_metrics(fruit / "cf_rloo" / "metrics.jsonl")  # RLOO's KL penalty is in the reward
    assert "loss/kl" not in rloo[-1] and any(r["reward/total"] < r["score/mean"] - 1e-6 for r in rloo[1:])


def test_reward_functions_read_the_rows_dataset_columns(fruit):
    (fruit / "targets.jsonl").write_text("".join(json.dumps({"prompt": "List some fruits:", "target": t}) + "\n"
                                                 for t in ("apple", "plum")))
    run_rl(_config(fruit, "cf_columns", "grpo", steps=12, reward_fn="rule_rewards:target_fraction", data="targets.jsonl"))
    records = read_metrics(fruit / "cf_columns" / "metrics.jsonl")
    assert "reward/target_fraction/mean" in records[-1]
    samples = [json.loads(line) for line in (fruit / "cf_columns" / "samples.jsonl").read_text().splitlines()]
    # a sample's score counts the words of its own row's target, in the order of the prompt stream
    assert all(0.0 <= s["score"] <= 1.0 for s in samples) and any(s["score"] > 0 for s in samples)


def test_dapo_samples_more_prompts_until_the_groups_with_a_signal_fill_the_batch(fruit):
    run_rl(_config(fruit, "cf_dapo", "grpo", preset="dapo", steps=6,
                   settings={"max_sampling_rounds": 3, "mask_truncated": True}))
    records = read_metrics(fruit / "cf_dapo" / "metrics.jsonl")
    for r in records:
        assert 1 <= r["sampling/rounds"] <= 3
        assert r["sampling/kept_groups"] + r["sampling/filled_groups"] == 4  # 32 samples, groups of 8
        assert r["sampling/filled_groups"] == 0 or r["sampling/rounds"] == 3  # filled only when the rounds ran out
    assert "policy/clipfrac_high" in records[-1] and not any(k.startswith("kl/") for k in records[-1])


def test_a_group_algorithm_with_one_sample_per_prompt_is_refused_before_any_work(fruit, capsys):
    from quartet.cli import main

    out = fruit / "cf_refused"
    code = main(["grpo", "--models.actor", str(fruit / "sft" / "final"), "--models.reward_fn",
                 "rule_rewards:apple_fraction", "--data.train", str(fruit / "prompts.jsonl"), "--rollout.n", "1",
                 "--output", str(out)])
    assert code == 2 and "set rollout.n to 2 or more" in capsys.readouterr().err
    assert not out.exists()


def test_held_out_prompts_are_scored_during_training_and_a_token_budget_ends_the_run(fruit, capsys, monkeypatch):
    (fruit / "held_out.jsonl").write_text("".join(json.dumps({"prompt": "List some fruits:", "target": "apple"}) + "\n"
                                                  for _ in range(6)))
    cfg = _config(fruit, "cf_eval", "grpo", steps=50, reward_fn="rule_rewards:target_fraction", data="targets.jsonl",
                  train={"eval_every": 2, "max_generated_tokens": 1500})
    cfg.data.eval = str(fruit / "held_out.jsonl")
    monkeypatch.setenv("QUARTET_PROGRESS", "1")
    summary = run_rl(cfg)
    # the bar counts the budget's tokens, not the steps the budget cuts short
    assert re.search(r"1500/1500 \[[^\r\n]*tok", capsys.readouterr().err)
    records = read_metrics(fruit / "cf_eval" / "metrics.jsonl")
    tokens = [r["tokens/generated"] for r in records if "tokens/generated" in r]
    assert records[0]["step"] == 0 and "eval/reward/target_fraction/mean" in records[0]  # before any update
    assert tokens == sorted(tokens) and tokens[-1] >= 1500 and tokens[-2] < 1500  # stopped once the budget was spent
    assert summary["steps"] == len(tokens) < 50 and summary["generated_tokens"] == tokens[-1]
    evaluated = [r["step"] for r in records if "eval/score/mean" in r]
    assert evaluated == [0, *range(2, summary["steps"], 2), summary["steps"]] or evaluated == [0, *range(2, summary["steps"] + 1, 2)]
    assert "initial_eval/score/mean" in summary and "eval/score/mean" in summary


def test_sharing_each_prompt_across_its_group_trains_as_computing_it_per_row(fruit, capsys):
    """One mini-batch of the whole batch, so both runs see the same rows: computing the prompt once per
    group (reference and training forwards) gives the per-row numbers. (Two steps: later rollouts of
    actors that differ by rounding may sample a different token somewhere.)"""
    from safetensors.torch import load_file

    runs = {}
    for share in (False, True):
        name = f"cf_share_{share}"
        cfg = _config(fruit, name, "grpo", steps=2, rollout={"n": 4})
        cfg.batch.mini_batch_size, cfg.batch.rollout_batch_size, cfg.batch.share_prompts = 16, 16, share
        run_rl(cfg)
        runs[share] = (read_metrics(fruit / name / "metrics.jsonl"), load_file(fruit / name / "final" / "model.safetensors"))
    (per_row, w_row), (shared, w_shared) = runs[False], runs[True]
    for a, b in zip(per_row, shared):
        for key in ("score/mean", "kl/ref", "loss/policy", "loss/kl", "policy/entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert all(torch.allclose(w_row[k], w_shared[k], atol=1e-5, rtol=0) for k in w_row)
    # a micro-batch that is not whole groups falls back to per-row forwards, with a note
    cfg = _config(fruit, "cf_share_fallback", "grpo", steps=1, rollout={"n": 4})
    cfg.batch.rollout_batch_size, cfg.batch.mini_batch_size, cfg.batch.grad_accum = 16, 6, 1
    run_rl(cfg)
    assert "note: prompts are computed per row, not once per group: a micro-batch (6 rows per process)" in capsys.readouterr().out
