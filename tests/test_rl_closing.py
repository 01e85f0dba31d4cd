"""What an RL run tells the user as it goes and as it ends: the progress bar's `kl=` (the KL to the
reference), the closing line's sampled score at the rollout's temperature, and held-out greedy accuracy
where a verifier judges held-out prompts (checked against greedy decoding by transformers)."""

import json

import torch
from transformers import AutoModelForCausalLM

from quartet.config import RLConfig, SamplingConfig, build_config
from quartet.models.tokenizer import load_tokenizer
from quartet.runs.metrics import read_metrics
from quartet.stages.rl import RLTrainer, closing_line, run_rl

TARGETS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"]  # the fruit fixture's fruits


def test_the_progress_bar_labels_the_kl_to_the_reference_kl():
    shown = RLTrainer.postfix(None, {"score/mean": 0.25, "kl/ref": 0.0123, "response/length": 7.0})
    assert shown == {"mean": "0.25", "kl": "0.0123", "length": "7"}


def test_the_closing_line_says_what_each_number_is():
    summary = {"stage": "grpo", "steps": 20, "seconds": 12.34, "final_dir": "runs/grpo/final",
               "first/score/mean": 0.1, "last/score/mean": 0.45, "last/kl/ref": 0.0321,
               "initial_greedy_eval/accuracy/exact_answer": 0.25, "greedy_eval/accuracy/exact_answer": 0.5}
    assert closing_line(summary, SamplingConfig(temperature=0.7)) == (
        "[grpo] 20 steps in 12.3s; sampled score (T=0.7) 0.100 -> 0.450 (first -> last fifth of the steps); "
        "held-out greedy accuracy (exact_answer) 0.250 -> 0.500; KL to reference 0.032; actor in runs/grpo/final")
    plain = {k: v for k, v in summary.items() if "greedy" not in k and "kl" not in k}
    assert closing_line(plain, SamplingConfig()) == (
        "[grpo] 20 steps in 12.3s; sampled score (T=1) 0.100 -> 0.450 (first -> last fifth of the steps); "
        "actor in runs/grpo/final")


def _greedy_accuracy(model_dir, max_new_tokens: int) -> float:
    """The share of held-out rows whose transformers-greedy response starts with the row's target."""
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([tokenizer("List some fruits:", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    first_word = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split()[:1]
    return sum(first_word == [t] for t in TARGETS) / len(TARGETS)


def test_an_rl_run_ends_with_its_sampled_score_and_held_out_greedy_accuracy(fruit, capsys):
    (fruit / "verified.jsonl").write_text("".join(json.dumps({"prompt": "List some fruits:", "target": t}) + "\n"
                                                  for t in TARGETS))
    out = fruit / "closing"
    summary = run_rl(build_config(RLConfig, {
        "run": {"output_dir": str(out)},
        "models": {"actor": str(fruit / "sft" / "final"), "reward_fn": "rule_rewards:first_word_is_target"},
        "data": {"train": str(fruit / "verified.jsonl"), "eval": str(fruit / "verified.jsonl")},
        "algorithm": {"name": "grpo"},
        "rollout": {"max_new_tokens": 6, "n": 4, "temperature": 0.7},
        "batch": {"rollout_batch_size": 16, "mini_batch_size": 8},
        "optim": {"actor_lr": 3e-3},
        "train": {"steps": 2, "eval_every": 1, "n_samples": 0},
    }))
    key = "greedy_eval/accuracy/first_word_is_target"
    assert summary[f"initial_{key}"] == _greedy_accuracy(fruit / "sft" / "final", 6) > 0  # one fruit is right
    assert summary[key] == _greedy_accuracy(out / "final", 6)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if key in r] == [0, 2]  # greedy only before training and at the end
    assert [r["step"] for r in records if "eval/accuracy/first_word_is_target" in r] == [0, 1, 2]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("[grpo] 2 steps in ") and "; sampled score (T=0.7) " in last
    assert (f"; held-out greedy accuracy (first_word_is_target) {summary[f'initial_{key}']:.3f} -> "
            f"{summary[key]:.3f}; ") in last
