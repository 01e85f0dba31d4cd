"""Numerical faults and resume paths in-process: NaN steps are skipped and counted, too many stop the
run with the last good checkpoint intact, and LoRA runs resume to the same weights."""

import json
import math
import os
import shutil
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file

import quartet.stages.sft as sft_stage
from quartet.cli import main
from quartet.config import RLConfig, SFTConfig, build_config
from quartet.runs.checkpoint import list_checkpoints
from quartet.runs.faults import GracefulStop, NumericalFault, say
from quartet.runs.metrics import read_metrics
from quartet.stages.rl import run_rl
from quartet.stages.sft import run_sft

ROWS = [{"prompt": f"Q: what comes after {i}?\nA:", "completion": f" {i + 1}."} for i in range(40)]


def _sft_config(root, **train):
    root.mkdir(parents=True, exist_ok=True)
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return build_config(SFTConfig, {
        "run": {"output_dir": str(root / "run")},
        "model": {"preset": "nano", "vocab_size": 300},
        "data": {"train": str(root / "sft.jsonl"), "eval_fraction": 0.1, "max_length": 32},
        "train": {"lr": 3e-3, "max_steps": 8, "batch_size": 8, "eval_every": 4, "log_every": 1, "save_every": 1,
                  "keep_checkpoints": 20, **train},
    })


def _poison_training_calls(monkeypatch, bad_calls):
    """Make the SFT loss NaN on the given 1-based training calls (held-out evaluation untouched)."""
    calls = {"n": 0}
    real = sft_stage.sft_loss

    def loss(model, batch):
        out = real(model, batch)
        if model.training:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                out.loss_sum = out.loss_sum * float("nan")
        return out

    monkeypatch.setattr(sft_stage, "sft_loss", loss)


def _model_weights(checkpoint):
    return load_file(str(checkpoint / "model" / "model.safetensors"))


def test_nan_steps_are_skipped_counted_and_leave_weights_and_optimizer_untouched(tmp_path, monkeypatch, capsys):
    _poison_training_calls(monkeypatch, {3, 4})
    summary = run_sft(_sft_config(tmp_path))
    assert "non-finite loss or gradient; update skipped" in capsys.readouterr().err
    assert summary["train/skipped_nonfinite"] == 2 and summary["steps"] == 8
    records = {r["step"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")}
    assert records[3]["train/loss"] == "nan" and records[5]["train/skipped_nonfinite"] == 2
    assert math.isfinite(records[5]["train/loss"])
    ckpts = dict(list_checkpoints(tmp_path / "run" / "checkpoints"))
    assert sorted(ckpts) == [1, 2, 5, 6, 7]  # no checkpoint of a skipped step
    adam = torch.load(ckpts[5] / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    assert all(float(s["step"]) == 3 for s in adam.values())  # Adam stepped on steps 1, 2 and 5 only
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in final.values())


def test_too_many_nan_steps_in_a_row_stop_with_the_last_good_checkpoint_intact(tmp_path, monkeypatch, capsys):
    _poison_training_calls(monkeypatch, set(range(4, 100)))
    cfg = _sft_config(tmp_path, save_every=2, max_nonfinite_steps=3)
    code = main(["sft", "--config", _write_yaml(tmp_path, cfg)])
    err = capsys.readouterr().err
    assert code == 1
    assert "3 non-finite steps in a row (limit 3); stopped at step 6" in err and "step-2" in err
    assert [s for s, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [2]  # step 4 was not finite: not saved
    assert all(torch.isfinite(t).all() for t in _model_weights(tmp_path / "run" / "checkpoints" / "step-2").values())
    assert not (tmp_path / "run" / "final").exists()
    with pytest.raises(NumericalFault):  # the Python API raises the same fault
        shutil.rmtree(tmp_path / "run")
        run_sft(cfg)


def _write_yaml(root, cfg) -> str:
    from quartet.config import dump_config

    path = root / "cfg.yaml"
    dump_config(cfg, path)
    return str(path)


def test_ppo_step_with_a_nan_score_is_skipped_and_counted(lm_dir, tmp_path, capsys):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Question {i}:"}) + "\n" for i in range(8)))
    calls = {"n": 0}

    def reward(prompts, responses):
        calls["n"] += 1
        return [float("nan") if calls["n"] == 2 else len(r) / 40 for r in responses]

    cfg = build_config(RLConfig, {
        "run": {"output_dir": str(tmp_path / "run")},
        "models": {"actor": str(lm_dir), "critic_init": "actor", "reward_fn": "rule_rewards:apple_fraction"},
        "data": {"train": str(tmp_path / "prompts.jsonl")}, "rollout": {"max_new_tokens": 6},
        "batch": {"rollout_batch_size": 4, "mini_batch_size": 2}, "train": {"steps": 4, "save_every": 1, "keep_checkpoints": 5},
    })
    summary = run_rl(cfg, reward_fn=reward)  # the Python callable takes the place of the configured one
    assert summary["steps"] == 4 and "update skipped" in capsys.readouterr().err
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["skipped_nonfinite"] for r in records] == [0, 1, 1, 1]
    ckpts = dict(list_checkpoints(tmp_path / "run" / "checkpoints"))
    assert sorted(ckpts) == [1, 3]  # no checkpoint of the skipped step

    def adam_steps(step):
        state = torch.load(ckpts[step] / "trainer_state.pt", weights_only=True)["optimizer"]["state"]  # actor and critic
        return {float(s["step"]) for s in state.values()}

    (after_one,) = adam_steps(1)
    assert adam_steps(3) == {2 * after_one}  # step 2 made no update


def test_lora_run_resumes_from_its_adapter_checkpoint_to_the_same_weights(tmp_path):
    straight_cfg = _sft_config(tmp_path / "straight", max_steps=6, save_every=3)
    straight_cfg.lora.enabled, straight_cfg.lora.r = True, 4
    run_sft(straight_cfg)
    assert (tmp_path / "straight" / "run" / "checkpoints" / "step-3" / "model" / "adapter_model.safetensors").exists()
    resumed_cfg = _sft_config(tmp_path / "resumed", max_steps=6, save_every=3)
    resumed_cfg.lora.enabled, resumed_cfg.lora.r = True, 4
    shutil.copytree(tmp_path / "straight" / "run" / "checkpoints" / "step-3",
                    tmp_path / "resumed" / "run" / "checkpoints" / "step-3")
    run_sft(resumed_cfg, resume=True)
    a = load_file(str(tmp_path / "straight" / "run" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "run" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed" / "run" / "metrics.jsonl")]
    assert min(steps) == 4 and max(steps) == 6  # only the steps after the checkpoint were run here


def _pipe_without_reader():
    """A text stream writing into a pipe whose reader is gone, as after Ctrl-C under `quartet ... | tee log`."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return open(write_end, "w")


def _points_at_devnull(stream) -> bool:
    here, devnull = os.fstat(stream.fileno()), os.stat(os.devnull)
    return (here.st_dev, here.st_ino) == (devnull.st_dev, devnull.st_ino)


def test_the_stop_flag_is_set_even_when_the_signal_s_message_cannot_be_written(monkeypatch):
    broken = _pipe_without_reader()
    with pytest.raises(BrokenPipeError):  # what the handler's print() used to raise inside the step
        os.write(broken.fileno(), b"x")
    monkeypatch.setattr(sys, "stderr", broken)
    with GracefulStop() as stop:
        stop._handle(signal.SIGINT, None)  # must not raise
        assert stop.requested and stop.signum == signal.SIGINT
        assert _points_at_devnull(broken)  # later writes, from anyone holding the stream, go nowhere
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C still means now
            stop._handle(signal.SIGINT, None)
    broken.close()


def test_writes_into_a_pipe_without_reader_go_nowhere_inside_a_run(monkeypatch):
    broken = _pipe_without_reader()
    monkeypatch.setattr(sys, "stdout", broken)
    with GracefulStop():
        print("a sample table" * 1000)  # more than the stream buffers: the write reaches the pipe
        sys.stdout.flush()
        assert _points_at_devnull(broken)
    assert sys.stdout is broken  # the run's streams are given back as they were
    last = _pipe_without_reader()
    monkeypatch.setattr(sys, "stderr", last)
    say("SIGINT received: stopped after step 3")  # the command's last line, after the checkpoint: it must not raise
    assert _points_at_devnull(last)
    last.close(), broken.close()
