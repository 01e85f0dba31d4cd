"""The SFT stage end to end on a tiny model: loss goes down, the run directory is complete."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from quartet.cli import main
from quartet.config import SFTConfig, build_config
from quartet.runs.metrics import read_metrics
from quartet.stages.sft import run_sft

ROWS = [{"prompt": f"Q: what comes after {i}?\nA:", "completion": f" {i + 1}."} for i in range(60)]


def _config(tmp_path, **train):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return build_config(SFTConfig, {
        "run": {"output_dir": str(tmp_path / "run")},
        "model": {"preset": "nano", "vocab_size": 300},
        "data": {"train": str(data), "eval_fraction": 0.1, "max_length": 32},
        "train": {"lr": 3e-3, "max_steps": 40, "batch_size": 8, "eval_every": 20, "log_every": 5, **train},
    })


def test_sft_lowers_held_out_loss_and_writes_a_loadable_model(tmp_path):
    summary = run_sft(_config(tmp_path))
    assert summary["eval/loss"] < summary["initial_eval/loss"] - 1.0
    run = tmp_path / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 40
    records = read_metrics(run / "metrics.jsonl")
    assert records[0]["step"] == 0 and "eval/loss" in records[0]
    assert records[-1]["step"] == 40 and "train/loss" in records[-1]
    assert any((run / "tensorboard").iterdir())
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    ids = tokenizer("Q: what comes after 3?\nA:", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_sft_is_reproducible_with_the_same_seed(tmp_path):
    a = run_sft(_config(tmp_path / "a", max_steps=6))
    b = run_sft(_config(tmp_path / "b", max_steps=6))
    assert a["eval/loss"] == b["eval/loss"]
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "run" / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "run" / "final").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "completion": "yo"}\n{"prompt": "hi",\n')
    code = main(["sft", "--output", str(tmp_path / "r"), "--data.train", str(bad), "--model.preset", "nano"])
    err = capsys.readouterr().err
    assert code == 2
    assert "bad.jsonl, line 2" in err and "Traceback" not in err
    code = main(["sft", "--train.lrr", "1"])
    assert code == 2 and "did you mean 'train.lr'" in capsys.readouterr().err


def test_cli_lists_the_stages(capsys):
    main([])
    out = capsys.readouterr().out
    for stage in ("sft", "reward", "ppo", "pipeline", "demo", "score", "report", "convert"):
        assert stage in out


def test_gradient_accumulation_is_exact(tmp_path):
    """One step on 8 examples equals one step on 2 micro-batches of 4 (same examples, same update)."""
    whole = run_sft(_config(tmp_path / "whole", max_steps=1, batch_size=8, grad_accum=1, warmup_ratio=0.0))
    split = run_sft(_config(tmp_path / "split", max_steps=1, batch_size=4, grad_accum=2, warmup_ratio=0.0))
    assert whole["train/loss"] == pytest.approx(split["train/loss"], rel=1e-5)
    assert whole["train/grad_norm"] == pytest.approx(split["train/grad_norm"], rel=1e-4)  # same gradient scale
    wa = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "run" / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(tmp_path / "split" / "run" / "final").state_dict()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4)


def test_lora_and_gradient_checkpointing_save_a_plain_merged_model(tmp_path):
    cfg = _config(tmp_path, max_steps=8)
    cfg.lora.enabled = True
    cfg.lora.r = 4
    cfg.model.gradient_checkpointing = True
    summary = run_sft(cfg)
    assert summary["eval/loss"] < summary["initial_eval/loss"]
    final = tmp_path / "run" / "final"
    assert not (final / "adapter_config.json").exists()  # merged: plain transformers loads it
    model = AutoModelForCausalLM.from_pretrained(final)
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_a_skipped_first_step_moves_the_schedule_on_without_a_warning(tmp_path, monkeypatch):
    """A non-finite first step skips the optimizer but not the schedule: no PyTorch scheduler-order
    warning, and every step's learning rate is still the warm-up/cosine value of its step number."""
    import warnings

    import quartet.stages.sft as sft_stage
    from quartet.runs.optim import warmup_cosine_factor

    real, calls = sft_stage.sft_loss, {"n": 0}

    def first_step_nan(model, batch):
        out = real(model, batch)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 1:
                out.loss_sum = out.loss_sum * float("nan")
        return out

    monkeypatch.setattr(sft_stage, "sft_loss", first_step_nan)
    cfg = _config(tmp_path, max_steps=6, log_every=1, warmup_ratio=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = run_sft(cfg)
    assert summary["train/skipped_nonfinite"] == 1 and summary["steps"] == 6
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/lr" in r]
    assert records[0]["train/loss"] == "nan"
    # LambdaLR's value after k scheduler steps is lr * factor(k); warm-up 3 of 6 steps
    assert [r["train/lr"] for r in records] == pytest.approx([3e-3 * warmup_cosine_factor(k, 3, 6) for k in range(1, 7)])
