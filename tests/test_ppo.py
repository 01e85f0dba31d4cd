"""The PPO stage end to end on tiny models: it learns a rule reward, beta holds it back, it resumes."""

import json
import random
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from quartet.config import PPOConfig, SFTConfig, build_config
from quartet.runs.metrics import read_metrics
from quartet.stages.ppo import run_ppo
from quartet.stages.sft import run_sft
from rule_rewards import apple_fraction

FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"]


@pytest.fixture(scope="module")
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


def _ppo_config(root, name, beta, steps=30, **ppo):
    return build_config(PPOConfig, {
        "run": {"output_dir": str(root / name)},
        "models": {"actor": str(root / "sft" / "final"), "reward_fn": "rule_rewards:apple_fraction",
                   "critic_init": "actor"},
        "data": {"train": str(root / "prompts.jsonl")},
        "generation": {"max_new_tokens": 10},
        "ppo": {"steps": steps, "rollout_batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 4, "actor_lr": 3e-4,
                "critic_lr": 1e-3, "beta": beta, **ppo},
    })


def _mean(records, key, part):
    values = [r[key] for r in records]
    k = len(values) // 5
    return sum(values[:k] if part == "first" else values[-k:]) / k


def test_rule_reward_rises_while_kl_stays_bounded(fruit):
    run_ppo(_ppo_config(fruit, "ppo_small_beta", beta=0.1))
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
    run_ppo(_ppo_config(fruit, "ppo_huge_beta", beta=100.0))
    huge = read_metrics(fruit / "ppo_huge_beta" / "metrics.jsonl")
    small = read_metrics(fruit / "ppo_small_beta" / "metrics.jsonl")
    assert _mean(huge, "score/mean", "last") < _mean(huge, "score/mean", "first") + 0.1
    assert _mean(huge, "kl/ref", "last") < 0.5 * _mean(small, "kl/ref", "last")


def test_shared_trunk_raises_the_reward_and_saves_a_critic_on_the_final_trunk(fruit):
    from transformers import AutoModelForSequenceClassification

    run_ppo(_ppo_config(fruit, "ppo_shared", beta=0.1, shared_trunk=True))
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
    cfg = _ppo_config(fruit, "ppo_api", beta=0.5, steps=4, adaptive_kl=True, kl_target=0.01, kl_horizon=100)
    cfg.models.reward_fn = None
    summary = run_ppo(cfg, reward_fn=apple_fraction)
    records = read_metrics(fruit / "ppo_api" / "metrics.jsonl")
    assert summary["steps"] == 4
    betas = [r["kl/beta"] for r in records]
    assert betas[-1] > betas[0]  # KL above a tiny target raises beta


def test_checkpoint_resume_gives_identical_weights(fruit):
    run_ppo(_ppo_config(fruit, "ppo_straight", beta=0.1, steps=4, save_every=2))
    straight = AutoModelForCausalLM.from_pretrained(fruit / "ppo_straight" / "final").state_dict()
    checkpoint = fruit / "ppo_straight" / "checkpoints" / "step-2"
    assert (checkpoint / "COMPLETE").exists() and (checkpoint / "actor" / "model.safetensors").exists()
    resumed_dir = fruit / "ppo_resumed"
    shutil.copytree(fruit / "ppo_straight" / "checkpoints", resumed_dir / "checkpoints")
    run_ppo(_ppo_config(fruit, "ppo_resumed", beta=0.1, steps=4, save_every=2), resume=True)
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
    cfg = build_config(PPOConfig, {
        "run": {"output_dir": str(tmp_path / "run")},
        "models": {"actor": str(fruit / "sft" / "final"), "reward": str(tmp_path / "rm")},
        "data": {"train": str(fruit / "prompts.jsonl")}, "generation": {"max_new_tokens": 6},
        "ppo": {"steps": 2, "rollout_batch_size": 4, "mini_batch_size": 2, "grad_accum": 2, "n_samples": 2,
                "sample_every": 1},
        "lora": {"enabled": True, "r": 4},
    })
    run_ppo(cfg)
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
    from types import SimpleNamespace

    from quartet.stages.ppo import PPOTrainer

    prompts = [[i] for i in range(10)]
    trainer = SimpleNamespace(p=SimpleNamespace(rollout_batch_size=4), cfg=SimpleNamespace(run=SimpleNamespace(seed=3)),
                              prompts=prompts, _order_epoch=-1, _order=[])
    trainer._epoch_order = lambda epoch: PPOTrainer._epoch_order(trainer, epoch)
    got = [ids[0] for step in range(5) for ids in PPOTrainer.prompt_batch(trainer, step)]  # 20 rows: 2 epochs
    expected = []
    for epoch in range(2):  # the plain definition: one seeded shuffle per epoch
        order = list(range(10))
        random.Random(3 * 7919 + epoch).shuffle(order)
        expected += order
    assert got == expected
    assert sorted(got[:10]) == list(range(10)) and got[:10] != got[10:]
    # asking for an earlier step again (a resume) gives the same rows
    assert [ids[0] for ids in PPOTrainer.prompt_batch(trainer, 1)] == expected[4:8]
