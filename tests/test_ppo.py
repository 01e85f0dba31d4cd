"""The PPO stage end to end on tiny models: it learns a rule reward, beta holds it back, it resumes."""

import json
import random
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from quartet.config import RLConfig, build_config
from quartet.runs.metrics import read_metrics
from quartet.stages.rl import run_rl
from rule_rewards import apple_fraction


def _ppo_config(root, name, beta, steps=30, algorithm=None, models=None, train=None):
    return build_config(RLConfig, {
        "run": {"output_dir": str(root / name)},
        "models": {"actor": str(root / "sft" / "final"), "reward_fn": "rule_rewards:apple_fraction",
                   "critic_init": "actor", **(models or {})},
        "data": {"train": str(root / "prompts.jsonl")},
        "algorithm": {"beta": beta, **(algorithm or {})},
        "rollout": {"max_new_tokens": 10},
        "batch": {"rollout_batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 4},
        "optim": {"actor_lr": 3e-4, "critic_lr": 1e-3},
        "train": {"steps": steps, **(train or {})},
    })


def _mean(records, key, part):
    values = [r[key] for r in records]
    k = len(values) // 5
    return sum(values[:k] if part == "first" else values[-k:]) / k


def test_rule_reward_rises_while_kl_stays_bounded(fruit):
    run_rl(_ppo_config(fruit, "ppo_small_beta", beta=0.1))
    records = read_metrics(fruit / "ppo_small_beta" / "metrics.jsonl")
    print("score per step:", [round(r["score/mean"], 2) for r in records])
    print("KL per step:   ", [round(r["kl/ref"], 2) for r in records])
    assert records[0]["kl/ref"] == pytest.approx(0.0, abs=1e-6)  # actor == reference before any update
    assert _mean(records, "score/mean", "last") > _mean(records, "score/mean", "first") + 0.25
    assert max(r["kl/ref"] for r in records) < 15.0
    for key in ("score/std", "reward/total", "policy/entropy", "policy/clipfrac", "value/clipfrac", "policy/approx_kl",
                "loss/policy", "loss/value", "value/explained_variance", "response/length", "response/eos_rate",
                "time/generation", "time/scoring", "time/training", "time/tokens_per_second"):
        assert key in records[-1], key


def test_huge_beta_keeps_the_policy_at_the_reference(fruit):
    run_rl(_ppo_config(fruit, "ppo_huge_beta", beta=100.0))
    huge = read_metrics(fruit / "ppo_huge_beta" / "metrics.jsonl")
    small = read_metrics(fruit / "ppo_small_beta" / "metrics.jsonl")
    assert _mean(huge, "score/mean", "last") < _mean(huge, "score/mean", "first") + 0.1
    assert _mean(huge, "kl/ref", "last") < 0.5 * _mean(small, "kl/ref", "last")


def test_shared_trunk_raises_the_reward_and_saves_a_critic_on_the_final_trunk(fruit):
    from transformers import AutoModelForSequenceClassification

    run_rl(_ppo_config(fruit, "ppo_shared", beta=0.1, models={"shared_trunk": True}))
    records = read_metrics(fruit / "ppo_shared" / "metrics.jsonl")
    print("score per step:", [round(r["score/mean"], 2) for r in records])
    assert records[0]["kl/ref"] == pytest.approx(0.0, abs=1e-6)
    assert _mean(records, "score/mean", "last") > _mean(records, "score/mean", "first") + 0.25
    assert _mean(records, "value/explained_variance", "last") > _mean(records, "value/explained_variance", "first")
    actor = AutoModelForCausalLM.from_pretrained(fruit / "ppo_shared" / "final")
    critic = AutoModelForSequenceClassification.from_pretrained(fruit / "ppo_shared" / "final_critic")
    sft = AutoModelForCausalLM.from_pretrained(fruit / "sft" / "final")
    trunk, critic_trunk, sft_trunk = (m.base_model.state_dict() for m in (actor, critic, sft))
    assert trunk.keys() == critic_trunk.keys()
    assert all(torch.equal(trunk[k], critic_trunk[k]) for k in trunk)  # one trunk, saved twice
    assert not all(torch.equal(trunk[k], sft_trunk[k]) for k in trunk)  # and it was trained


def test_callable_reward_and_adaptive_kl_through_the_python_api(fruit):
    cfg = _ppo_config(fruit, "ppo_api", beta=0.5, steps=4,
                      algorithm={"adaptive_kl": True, "kl_target": 0.01, "kl_horizon": 100})
    cfg.models.reward_fn = None
    summary = run_rl(cfg, reward_fn=apple_fraction)
    records = read_metrics(fruit / "ppo_api" / "metrics.jsonl")
    assert summary["steps"] == 4
    betas = [r["kl/beta"] for r in records]
    assert betas[-1] > betas[0]  # KL above a tiny target raises beta


def test_checkpoint_resume_gives_identical_weights(fruit):
    run_rl(_ppo_config(fruit, "ppo_straight", beta=0.1, steps=4, train={"save_every": 2}))
    straight = AutoModelForCausalLM.from_pretrained(fruit / "ppo_straight" / "final").state_dict()
    checkpoint = fruit / "ppo_straight" / "checkpoints" / "step-2"
    assert (checkpoint / "COMPLETE").exists() and (checkpoint / "actor" / "model.safetensors").exists()
    resumed_dir = fruit / "ppo_resumed"
    shutil.copytree(fruit / "ppo_straight" / "checkpoints", resumed_dir / "checkpoints")
    run_rl(_ppo_config(fruit, "ppo_resumed", beta=0.1, steps=4, train={"save_every": 2}), resume=True)
    resumed = AutoModelForCausalLM.from_pretrained(resumed_dir / "final").state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    steps = [r["step"] for r in read_metrics(resumed_dir / "metrics.jsonl")]
    assert steps == [3, 4]


def test_reward_model_critic_and_lora_reference(fruit, tmp_path):
    """The four-model path with a real reward model; with LoRA the reference is the actor with adapters off."""
    from quartet.models.loading import load_scalar_model, save_model
    from quartet.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(fruit / "sft" / "final")
    save_model(load_scalar_model(fruit / "sft" / "final"), tokenizer, tmp_path / "rm")
    cfg = build_config(RLConfig, {
        "run": {"output_dir": str(tmp_path / "run")},
        "models": {"actor": str(fruit / "sft" / "final"), "reward": str(tmp_path / "rm")},
        "data": {"train": str(fruit / "prompts.jsonl")}, "rollout": {"max_new_tokens": 6},
        "batch": {"rollout_batch_size": 4, "mini_batch_size": 2, "grad_accum": 2},
        "train": {"steps": 2, "n_samples": 2, "sample_every": 1},
        "lora": {"enabled": True, "r": 4},
    })
    run_rl(cfg)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[0]["kl/ref"] == pytest.approx(0.0, abs=1e-6)  # adapters start at zero: actor == reference
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final") is not None
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(len(s["tokens"]) == len(s["advantage"]) == len(s["kl_penalty"]) for s in samples)
    # a reward model reads token ids, so texts are decoded only for the sample rows: the same texts
    specials = set(tokenizer.all_special_tokens)
    for s in samples:
        assert s["prompt"].endswith("List some fruits:")
        assert s["response"].strip() == "".join(t for t in s["tokens"] if t not in specials).strip()


def test_prompt_batches_walk_seeded_epochs():
    """Each epoch visits every prompt once in a seeded order; batches run across epoch boundaries."""
    from quartet.data.schedule import PromptSchedule

    prompts = [[i] for i in range(10)]
    schedule = PromptSchedule(prompts, batch_size=4, seed=3)
    got = [ids[0] for step in range(5) for ids in schedule.batch(step)]  # 20 rows: 2 epochs
    expected = []
    for epoch in range(2):  # the plain definition: one seeded shuffle per epoch
        order = list(range(10))
        random.Random(3 * 7919 + epoch).shuffle(order)
        expected += order
    assert got == expected
    assert sorted(got[:10]) == list(range(10)) and got[:10] != got[10:]
    # asking for an earlier step again (a resume) gives the same rows
    assert [ids[0] for ids in schedule.batch(1)] == expected[4:8]


def test_a_critic_free_algorithm_is_a_registry_entry_of_a_few_lines(fruit):
    """REINFORCE with a batch-mean baseline, registered here: no critic is loaded, trained, saved or resumed."""
    from quartet.rl import broadcast_to_tokens
    from quartet.rl.algorithms import ADVANTAGE_ESTIMATORS, ALGORITHMS, Algorithm, register_advantage, register_algorithm

    @register_advantage("batch-mean-baseline")
    def batch_mean_baseline(batch, settings):
        returns = batch.rewards.sum(1)  # each response's score minus its KL penalty
        return broadcast_to_tokens(returns - returns.mean(), batch.mask), None

    register_algorithm(Algorithm("reinforce-test", advantage="batch-mean-baseline"))
    try:
        run_rl(_ppo_config(fruit, "reinforce", beta=0.1, algorithm={"name": "reinforce-test"}))
        records = read_metrics(fruit / "reinforce" / "metrics.jsonl")
        assert _mean(records, "score/mean", "last") > _mean(records, "score/mean", "first") + 0.25
        assert not any(k.startswith(("loss/value", "value/", "grad_norm/critic", "return/")) for k in records[-1])
        assert "grad_norm/actor" in records[-1] and "loss/policy" in records[-1]
        assert not (fruit / "reinforce" / "final_critic").exists()
        assert json.loads((fruit / "reinforce" / "summary.json").read_text())["stage"] == "reinforce-test"
        samples = [json.loads(line) for line in (fruit / "reinforce" / "samples.jsonl").read_text().splitlines()]
        assert samples and all("value" not in s and "return" not in s and s["advantage"] for s in samples)

        # checkpoints hold the actor only, and resume as such to the same weights
        straight = _ppo_config(fruit, "reinforce_straight", beta=0.1, steps=4, algorithm={"name": "reinforce-test"},
                               train={"save_every": 2})
        run_rl(straight)
        checkpoint = fruit / "reinforce_straight" / "checkpoints" / "step-2"
        assert (checkpoint / "actor").is_dir() and not (checkpoint / "critic").exists()
        shutil.copytree(fruit / "reinforce_straight" / "checkpoints", fruit / "reinforce_resumed" / "checkpoints")
        resumed = _ppo_config(fruit, "reinforce_resumed", beta=0.1, steps=4, algorithm={"name": "reinforce-test"},
                              train={"save_every": 2})
        run_rl(resumed, resume=True)
        a, b = (AutoModelForCausalLM.from_pretrained(fruit / name / "final").state_dict()
                for name in ("reinforce_straight", "reinforce_resumed"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    finally:
        del ALGORITHMS["reinforce-test"], ADVANTAGE_ESTIMATORS["batch-mean-baseline"]


def _reward_fn_ppo(actor, root, **models):
    return build_config(RLConfig, {
        "run": {"output_dir": str(root / "run")},
        "models": {"actor": str(actor), "reward_fn": "rule_rewards:apple_fraction", **models},
        "data": {"train": str(root / "prompts.jsonl")}, "rollout": {"max_new_tokens": 4},
        "batch": {"rollout_batch_size": 4, "mini_batch_size": 4}, "train": {"steps": 1},
    })


def test_ppo_with_a_reward_function_starts_its_critic_from_the_actor_and_says_so(lm_dir, tmp_path, capsys, monkeypatch):
    import quartet.stages.rl_setup as rl_setup
    from quartet.config import ConfigError

    cfg = _reward_fn_ppo(lm_dir, tmp_path)  # no models.critic_init: there is no reward model to start from
    assert cfg.models.critic_init == "actor" and cfg.models.critic_init_defaulted
    with pytest.raises(ConfigError, match="critic_init is 'reward' but there is no reward model"):
        _reward_fn_ppo(lm_dir, tmp_path, critic_init="reward")  # asked for outright: refused, not overruled
    spelt = _reward_fn_ppo(lm_dir, tmp_path, critic_init="actor")
    assert spelt.models.critic_init == "actor" and not spelt.models.critic_init_defaulted
    with_rm = build_config(RLConfig, {"models": {"actor": "sft", "reward": "rm"}})
    assert with_rm.models.critic_init == "reward" and not with_rm.models.critic_init_defaulted
    grpo = build_config(RLConfig, {"models": {"actor": "sft", "reward_fn": "m:f"}, "algorithm": {"name": "grpo"}})
    assert not grpo.models.critic_init_defaulted  # no critic, nothing to say

    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Question {i}:"}) + "\n" for i in range(4)))
    sources = []
    real = rl_setup.load_scalar_model

    def recording(source, *args, **kwargs):
        sources.append(str(source))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(rl_setup, "load_scalar_model", recording)
    run_rl(cfg)
    out = capsys.readouterr().out
    assert sources == [str(lm_dir)]
    assert out.count("the critic starts from the actor (models.critic_init=actor)") == 1
