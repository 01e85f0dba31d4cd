"""The reward stage: learns a clear preference signal, saves a model plain transformers scores the same."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from quartet.cli import main
from quartet.config import RewardConfig, build_config
from quartet.models.forward import sequence_scores
from quartet.rl.losses import pairwise_loss
from quartet.stages.reward import make_reward_loss, reward_std_from_moments, run_reward

WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "piano", "candle", "forest"]


def _pairs(n, seed):
    """Chosen answers are polite ("thank you"), rejected ones rude ("go away"): a clear signal."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b = (WORDS[int(i)] for i in torch.randint(len(WORDS), (2,), generator=g))
        rows.append({"prompt": f"Tell me about the {a}.", "chosen": f" The {b} is lovely, thank you.",
                     "rejected": f" The {b} is boring, go away."})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reward")
    cfg = build_config(RewardConfig, {
        "run": {"output_dir": str(tmp / "run")},
        "model": {"preset": "nano", "vocab_size": 300},
        "data": {"train": str(_write(tmp / "train.jsonl", _pairs(200, 0))),
                 "eval": str(_write(tmp / "eval.jsonl", _pairs(60, 1))), "max_length": 32},
        "train": {"lr": 3e-3, "max_steps": 30, "batch_size": 16, "eval_every": 30},
    })
    return tmp, run_reward(cfg)


def test_clear_signal_is_learned(trained):
    _, summary = trained
    assert summary["eval/accuracy"] > 0.95
    assert summary["eval/loss"] < summary["initial_eval/loss"]


def test_saved_reward_model_scores_the_same_in_plain_transformers(trained):
    tmp, summary = trained
    final = tmp / "run" / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.reward_std == pytest.approx(summary["reward_std"])  # stored for PPO's normalisation
    texts = ["Tell me about the river. The stone is lovely, thank you.<|endoftext|>",
             "Tell me about the tiger. The lemon is boring, go away.<|endoftext|>"]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = sequence_scores(model, enc["input_ids"], enc["attention_mask"])
        theirs = model(**enc).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert ours[0] > ours[1]


def test_score_command_writes_scores(trained, tmp_path):
    tmp, _ = trained
    rows = [{"prompt": "Tell me about the maple.", "response": " The piano is lovely, thank you."},
            {"prompt": "Tell me about the maple.", "response": " The piano is boring, go away."}]
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--model", str(tmp / "run" / "final"), "--input", str(_write(tmp_path / "in.jsonl", rows)),
                 "--output", str(out)]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["response"] for r in scored] == [r["response"] for r in rows]
    assert scored[0]["score"] > scored[1]["score"]



def test_stage_loss_is_the_pairwise_loss_over_the_concatenated_batch():
    scores = torch.tensor([2.0, 0.5, 1.0, 1.5])  # chosen = [2.0, 0.5], rejected = [1.0, 1.5]
    values = torch.zeros(4, 3)
    values[:, 2] = scores  # read at the last real token (no padding here)
    values[:, :2] = 9.0  # earlier positions must not be read

    def values_model(ids, mask):
        return values

    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3),
             "margin": torch.tensor([0.5, 0.0])}
    out = make_reward_loss(use_margin=True, center_coef=0.1)(values_model, batch)
    import math
    expected = (-math.log(1 / (1 + math.exp(-(2.0 - 1.0 - 0.5)))) - math.log(1 / (1 + math.exp(-(0.5 - 1.5))))
                + 0.1 * ((2.0 + 1.0) ** 2 + (0.5 + 1.5) ** 2))
    assert float(out.loss_sum) == pytest.approx(expected, rel=1e-6)
    assert out.n_units == 2 and out.metric_sums["accuracy"] == 1.0
    no_margin = make_reward_loss(use_margin=False, center_coef=0.0)(values_model, batch)
    assert float(no_margin.loss_sum) == pytest.approx(2 * float(pairwise_loss(scores[:2], scores[2:])), rel=1e-6)
    stats = reward_std_from_moments({"reward_mean": 1.0, "reward_sq": 1.25})
    assert stats["reward_std"] == pytest.approx(0.5) and "reward_sq" not in stats
