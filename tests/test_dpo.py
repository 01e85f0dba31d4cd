"""The DPO stage: learns a clear preference, answer tokens only, the three references, a plain final/."""

from __future__ import annotations

import html
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import quartet.stages.dpo as dpo_stage
from quartet.cli import main
from quartet.config import ConfigError, DPOConfig, DPOLossConfig, build_config
from quartet.data import PreferenceExample, collate_preference_answers, tokenize_preferences
from quartet.models.presets import build_preset_model
from quartet.report import render_report
from quartet.rl.dpo import dpo_loss
from quartet.runs.checkpoint import list_checkpoints
from quartet.runs.metrics import read_metrics
from quartet.stages.dpo import (
    REF_LOGPS_FILE,
    Reference,
    answer_logps,
    answer_token_logps,
    make_dpo_loss,
    run_dpo,
)

WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "lemon", "piano", "candle", "forest"]


def _pairs(n: int, seed: int) -> list[dict]:
    """Chosen answers are polite ("thank you"), rejected ones rude ("go away"): a clear signal."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        a, b = (WORDS[int(i)] for i in torch.randint(len(WORDS), (2,), generator=g))
        rows.append({"prompt": f"Tell me about the {a}.", "chosen": f" The {b} is lovely, thank you.",
                     "rejected": f" The {b} is boring, go away."})
    return rows


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("dpo-data")
    return {"train": _write(tmp / "train.jsonl", _pairs(160, 0)), "eval": _write(tmp / "eval.jsonl", _pairs(32, 1))}


def _config(files: dict[str, str], out: Path, **sections: dict) -> DPOConfig:
    data = {"run": {"output_dir": str(out)}, "model": {"preset": "nano", "vocab_size": 300},
            "data": {"train": files["train"], "eval": files["eval"], "max_length": 32},
            "train": {"lr": 1e-3, "max_steps": 20, "batch_size": 16, "eval_every": 10, "log_every": 1}}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return build_config(DPOConfig, data)


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dpo") / "run"
    return out, run_dpo(_config(files, out))


# --------------------------------------------------------------------------- learning

def test_dpo_raises_held_out_accuracy_and_margin_and_lowers_the_loss(trained):
    _, summary = trained
    # at the start the policy is the reference: every implicit reward is 0, every pair a tie (half right)
    assert summary["initial_eval/rewards/margins"] == 0.0 and summary["initial_eval/rewards/accuracies"] == 0.5
    assert summary["initial_eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["eval/rewards/accuracies"] > 0.95
    assert summary["eval/rewards/margins"] > 0.5
    assert summary["eval/rewards/chosen"] > summary["eval/rewards/rejected"]
    assert summary["eval/loss"] < summary["initial_eval/loss"] - 0.2
    assert summary["stage"] == "dpo" and summary["steps"] == 20


def test_metrics_use_trl_names_for_train_and_eval(trained):
    out, _ = trained
    records = read_metrics(out / "metrics.jsonl")
    names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected", "loss")
    assert all(f"train/{name}" in records[-1] for name in names)
    evaluated = [r["step"] for r in records if "eval/rewards/margins" in r]
    assert evaluated == [0, 10, 20]
    assert all(f"eval/{name}" in records[-1] for name in names)


def test_final_is_a_plain_causal_lm_whose_implicit_rewards_are_the_samples(trained, files):
    """final/ loads with plain transformers, and beta * (its log-probs - the reference's) gives the
    held-out implicit rewards written to dpo_samples.jsonl."""
    out, summary = trained
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    reference = build_preset_model("nano", tokenizer, seed=0).eval()  # the starting model (run.seed 0)
    samples = [json.loads(line) for line in (out / "dpo_samples.jsonl").read_text().splitlines()]
    assert 0 < len(samples) <= 8
    assert {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "margin"} <= samples[0].keys()
    pairs = [PreferenceExample(s["prompt"], s["chosen"], s["rejected"]) for s in samples]
    data, _ = tokenize_preferences(pairs, tokenizer, 32, 256)
    batch = collate_preference_answers(data, tokenizer.pad_token_id)
    with torch.no_grad():
        rewards = summary["beta"] * (answer_logps(model, batch) - answer_logps(reference, batch))
    n = len(samples)
    torch.testing.assert_close(rewards[:n], torch.tensor([s["chosen_reward"] for s in samples]), atol=1e-4, rtol=0)
    torch.testing.assert_close(rewards[n:], torch.tensor([s["rejected_reward"] for s in samples]), atol=1e-4, rtol=0)
    assert all(s["margin"] > 0 for s in samples)


def test_report_of_a_dpo_run(trained):
    out, _ = trained
    page = render_report(out).read_text(encoding="utf-8")
    assert "DPO run" in page and "Reward margin" in page and "Preference accuracy" in page
    assert page.count('src="data:image/png;base64,') >= 4  # margins, accuracies, loss, rewards
    first = json.loads((out / "dpo_samples.jsonl").read_text().splitlines()[0])
    assert html.escape(first["chosen"], quote=True) in page
    assert "Token by token" not in page  # the PPO page's sections are not there


# --------------------------------------------------------------------------- the reference

def _comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("time/")}


def test_precomputed_reference_matches_the_live_one_and_is_reused_on_resume(files, tmp_path, monkeypatch):
    short = {"max_steps": 6, "eval_every": 3, "save_every": 3}
    run_dpo(_config(files, tmp_path / "live", train=short))
    run_dpo(_config(files, tmp_path / "pre", train=short, dpo={"precompute_ref_logprobs": True}))
    live, pre = read_metrics(tmp_path / "live" / "metrics.jsonl"), read_metrics(tmp_path / "pre" / "metrics.jsonl")
    assert [r["step"] for r in live] == [r["step"] for r in pre]
    for a, b in zip(live, pre):
        a, b = _comparable(a), _comparable(b)
        assert a.keys() == b.keys()
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
    stored = load_file(str(tmp_path / "pre" / REF_LOGPS_FILE))
    assert stored["train_chosen"].shape == (160,) and stored["eval_rejected"].shape == (32,)
    assert (stored["train_chosen"] < 0).all()

    # the run as it was at its step-3 checkpoint, resumed: the stored log-probs are read, no reference is built
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "pre", resumed, ignore=shutil.ignore_patterns("final", "summary.json", "dpo_samples.jsonl"))
    for step, path in list_checkpoints(resumed / "checkpoints"):
        if step > 3:
            shutil.rmtree(path)
    ref_file = resumed / REF_LOGPS_FILE
    before = (ref_file.read_bytes(), ref_file.stat().st_mtime_ns)
    with pytest.raises(ValueError, match="other data or another reference"):  # stored for other data: refused
        run_dpo(_config(files, resumed, train=short, data={"limit": 100}, dpo={"precompute_ref_logprobs": True}),
                resume=True)

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference was built or its log-probs recomputed on resume")

    monkeypatch.setattr(dpo_stage, "build_reference", no_reference)
    monkeypatch.setattr(dpo_stage, "compute_reference_logps", no_reference)
    run_dpo(_config(files, resumed, train=short, dpo={"precompute_ref_logprobs": True}), resume=True)
    assert (ref_file.read_bytes(), ref_file.stat().st_mtime_ns) == before
    a, b = load_file(str(tmp_path / "pre" / "final" / "model.safetensors")), load_file(str(resumed / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [_comparable(r) for r in read_metrics(resumed / "metrics.jsonl")] == [_comparable(r) for r in pre]


def test_with_lora_the_reference_is_the_model_with_adapters_off(files, tmp_path, monkeypatch):
    built = []
    real_build = dpo_stage.build_reference

    def build_and_keep(cfg, policy):
        built.append(real_build(cfg, policy))
        return built[-1]

    monkeypatch.setattr(dpo_stage, "build_reference", build_and_keep)
    summary = run_dpo(_config(files, tmp_path / "lora", lora={"enabled": True, "r": 4},
                              train={"lr": 3e-3, "max_steps": 6, "eval_every": 6}))
    (reference,) = built
    assert reference.model is None and reference.adapters_of is not None  # no second copy of the model
    # adapters start as zero updates: policy == reference exactly, so every implicit reward is exactly 0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert summary[f"initial_eval/{key}"] == 0.0, key
    assert summary["eval/rewards/margins"] > 0.1 and summary["eval/rewards/accuracies"] > 0.9
    weights = load_file(str(tmp_path / "lora" / "final" / "model.safetensors"))
    assert not [k for k in weights if "lora" in k]  # merged: a plain model
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "final")
    start = build_preset_model("nano", AutoTokenizer.from_pretrained(tmp_path / "lora" / "final"), seed=0)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, start.model.layers[0].self_attn.q_proj.weight)


# --------------------------------------------------------------------------- answer tokens only

class FixedLogits(torch.nn.Module):
    """A stand-in causal LM whose logits are a given tensor [rows, T, vocab], whatever the input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=False):
        return SimpleNamespace(logits=self.logits[:, : input_ids.shape[1]].clone())


def _two_pairs(tokenizer) -> list[dict]:
    examples = [PreferenceExample("Question: what is two plus two?", " Answer: four.", " Answer: five, the quick fox."),
                PreferenceExample("Hi", " The quick brown fox.", " No.")]
    data, _ = tokenize_preferences(examples, tokenizer, 64, 32)
    assert data[0]["prompt_len"] != data[1]["prompt_len"]
    return data


def test_sequence_logps_sum_the_answer_tokens_only(tokenizer):
    data = _two_pairs(tokenizer)
    batch = collate_preference_answers(data, tokenizer.pad_token_id)
    rows, width = batch["input_ids"].shape
    logits = torch.randn(rows, width, len(tokenizer), generator=torch.Generator().manual_seed(0))
    got = answer_logps(FixedLogits(logits), batch)
    seqs = [d["chosen_ids"] for d in data] + [d["rejected_ids"] for d in data]
    prompt_lens = [d["prompt_len"] for d in data] * 2
    for i, (ids, p) in enumerate(zip(seqs, prompt_lens)):  # plain Python: answer token t predicted at t - 1
        expected = sum(float(torch.log_softmax(logits[i, t - 1], -1)[ids[t]]) for t in range(p, len(ids)))
        assert float(got[i]) == pytest.approx(expected, abs=1e-4)
        assert int(batch["answer_mask"][i].sum()) == len(ids) - p
    # the logits at positions that predict prompt tokens (or padding, or nothing) do not matter ...
    changed = logits.clone()
    for i, (ids, p) in enumerate(zip(seqs, prompt_lens)):
        changed[i, : p - 1] = 1e4 * torch.randn(p - 1, len(tokenizer))
        changed[i, len(ids) - 1 :] = float("nan")
    torch.testing.assert_close(answer_logps(FixedLogits(changed), batch), got, atol=0, rtol=0)
    # ... the one that predicts the first answer token does
    changed[0, prompt_lens[0] - 1, seqs[0][prompt_lens[0]]] += 5.0
    assert float(answer_logps(FixedLogits(changed), batch)[0]) > float(got[0]) + 1.0


def test_left_and_right_padding_give_the_same_answer_logps(tokenizer):
    model = build_preset_model("nano", tokenizer, seed=0).eval()
    data = _two_pairs(tokenizer)
    with torch.no_grad():
        right = answer_logps(model, collate_preference_answers(data, tokenizer.pad_token_id, side="right"))
        left = answer_logps(model, collate_preference_answers(data, tokenizer.pad_token_id, side="left"))
        alone = torch.stack([answer_logps(model, collate_preference_answers([d], tokenizer.pad_token_id))
                             for d in data], 1).reshape(-1)  # each pair alone: other padding
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone, right, atol=1e-5, rtol=0)


@pytest.mark.parametrize("loss_type,rpo_alpha", [("sigmoid", None), ("ipo", None), ("sigmoid", 0.5), ("robust", None)])
def test_the_loss_is_a_sum_over_pairs_so_micro_batches_add_up(tokenizer, loss_type, rpo_alpha):
    model = build_preset_model("nano", tokenizer, seed=0)
    examples = [PreferenceExample(f"Question {w}?", f" The {w} is lovely.", f" The {w} is boring, go away.")
                for w in WORDS[:4]]
    data, _ = tokenize_preferences(examples, tokenizer, 64, 32)
    for d, c in zip(data, (-30.0, -25.0, -40.0, -35.0)):  # precomputed reference log-probs
        d["ref_chosen_logp"], d["ref_rejected_logp"] = c, c - 2.0
    settings = DPOLossConfig(loss_type=loss_type, rpo_alpha=rpo_alpha, label_smoothing=0.1 if loss_type == "robust" else 0)
    loss_fn = make_dpo_loss(settings, Reference())
    collate = lambda b: collate_preference_answers(b, tokenizer.pad_token_id)  # noqa: E731
    whole = loss_fn(model, collate(data))
    halves = [loss_fn(model, collate(data[:1])), loss_fn(model, collate(data[1:]))]
    assert whole.n_units == 4 and sum(h.n_units for h in halves) == 4
    assert float(whole.loss_sum) == pytest.approx(sum(float(h.loss_sum) for h in halves), rel=1e-5)
    for key, value in whole.metric_sums.items():
        assert value == pytest.approx(sum(h.metric_sums[key] for h in halves), rel=1e-5, abs=1e-6), key
    # the same number by hand: rl/dpo.py's per-pair losses (+ alpha x each chosen answer's mean token NLL)
    batch = collate(data)
    with torch.no_grad():
        logps, mask = answer_token_logps(model, batch)
        sums, counts = (logps * mask).sum(1), mask.sum(1)
        policy = sums / counts if loss_type == "ipo" else sums
        ref = batch["ref_logps"] / counts if loss_type == "ipo" else batch["ref_logps"]
        losses, _, _ = dpo_loss(policy[:4], policy[4:], ref[:4], ref[4:], loss_type=loss_type,
                                label_smoothing=settings.label_smoothing)
        if rpo_alpha:
            losses = losses + rpo_alpha * -(sums[:4] / counts[:4])
    assert float(whole.loss_sum) == pytest.approx(float(losses.sum()), rel=1e-5)
    assert ("nll_loss" in whole.metric_sums) == bool(rpo_alpha)
    whole.loss_sum.backward()  # gradients reach the policy
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- config and command line

def test_config_is_checked_up_front_naming_the_keys():
    good = {"model": {"path": "sft/final"}, "data": {"train": "p.jsonl"}}
    cfg = build_config(DPOConfig, good)
    assert (cfg.dpo.beta, cfg.dpo.loss_type, cfg.dpo.label_smoothing, cfg.dpo.rpo_alpha) == (0.1, "sigmoid", 0.0, None)
    assert cfg.dpo.reference is None and not cfg.dpo.precompute_ref_logprobs
    assert cfg.run.output_dir == "runs/dpo" and cfg.train.lr == 5e-6
    with pytest.raises(ConfigError, match=r"dpo.label_smoothing \(0.1\) is not defined for dpo.loss_type 'hinge'"):
        build_config(DPOConfig, good, {"dpo.loss_type": "hinge", "dpo.label_smoothing": 0.1})
    with pytest.raises(ConfigError, match="config key 'dpo.beta'"):
        build_config(DPOConfig, good, {"dpo.beta": 0})
    with pytest.raises(ConfigError, match="config key 'dpo.loss_type'"):
        build_config(DPOConfig, good, {"dpo.loss_type": "kto"})
    with pytest.raises(ConfigError, match="model.path is required"):
        build_config(DPOConfig, {"data": {"train": "p.jsonl"}})


def test_help_lists_the_dpo_keys(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["dpo", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for key in ("--dpo.beta", "--dpo.loss_type", "--dpo.label_smoothing", "--dpo.rpo_alpha", "--dpo.reference",
                "--dpo.precompute_ref_logprobs", "--model.path", "--train.lr", "--lora.enabled"):
        assert key in text, key
    # the type column wraps after a '|': sigmoid|ipo|hinge| on the key's row, robust below it
    assert "sigmoid|ipo|hinge|" in text.split("--dpo.loss_type", 1)[1].splitlines()[0]
    assert text.split("--dpo.loss_type", 1)[1].splitlines()[1].split()[0] == "robust" and "runs/dpo" in text


def test_reference_precompute_shows_progress_and_the_pair_counts_once(files, tmp_path, monkeypatch, capsys,
                                                                      recording_bars):
    make, bars = recording_bars
    monkeypatch.setattr(dpo_stage, "progress_bar", make)
    run_dpo(_config(files, tmp_path / "run", train={"max_steps": 1}, dpo={"precompute_ref_logprobs": True}))
    (bar,) = bars  # the training loop's bar is the run loop's own
    assert bar.desc == "reference log-probs" and bar.total == 160 + 32 and bar.n == bar.total
    assert bar.updates == [16] * 10 + [16] * 2  # batches of train.batch_size, train split then held-out split
    out = capsys.readouterr().out
    assert out.count("160 training / 32 held-out pairs") == 1
