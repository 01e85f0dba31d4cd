"""Every row of the bad-input table in docs/reliability.md, through the `quartet` command.

Each bad input must give exit status 2 and one `error:` line that names the culprit, before any
training starts, and must leave an output directory that already holds work byte-for-byte as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from quartet.cli import main
from quartet.models.loading import save_model
from quartet.models.presets import build_preset_model

GOOD_SFT = [{"prompt": f"Q: {i}?\nA:", "completion": f" {i + 1}."} for i in range(20)]
GOOD_PREFS = [{"prompt": f"Q: {i}?\nA:", "chosen": " yes.", "rejected": " no."} for i in range(20)]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def earlier_run(tmp_path) -> Path:
    """An output directory holding an unfinished earlier run: its files must survive a bad start.

    Its checkpoint was torn mid-write (no COMPLETE marker): over a complete one, a start without
    --resume is refused before the inputs are read (`test_a_fresh_start_over_an_interrupted_run_is_refused`).
    """
    out = tmp_path / "out"
    (out / "checkpoints" / "step-3").mkdir(parents=True)
    (out / "checkpoints" / "step-3" / "model.safetensors").write_text("half\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n')
    (out / "config.yaml").write_text("run: {seed: 7}\n")
    return out


def _fails_cleanly(argv: list[str], earlier_run: Path, capsys, *needles: str) -> str:
    before = _snapshot(earlier_run)
    code = main([*argv, "--output", str(earlier_run)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert _snapshot(earlier_run) == before, "a failed start changed the output directory"
    print(errors[0])  # the table in docs/reliability.md quotes these
    return errors[0]


def _sft(data: str, *more: str) -> list[str]:
    return ["sft", "--data.train", data, "--model.preset", "nano", "--model.vocab_size", "300", *more]


# --------------------------------------------------------------------------- data files

def test_malformed_json(tmp_path, earlier_run, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n')
    _fails_cleanly(_sft(str(bad)), earlier_run, capsys, "bad.jsonl, line 2", "JSON")


def test_wrong_type(tmp_path, earlier_run, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [*GOOD_SFT, {"prompt": "a", "completion": 5}])
    _fails_cleanly(_sft(data), earlier_run, capsys, "line 21", "'completion'", "int")


def test_missing_field(tmp_path, earlier_run, capsys):
    data = _jsonl(tmp_path / "p.jsonl", [*GOOD_PREFS, {"prompt": "a", "chosen": "b"}])
    _fails_cleanly(["reward", "--data.train", data, "--model.preset", "nano"], earlier_run, capsys,
                   "line 21", "rejected")


def test_missing_field_in_dpo_preferences(tmp_path, earlier_run, capsys):
    data = _jsonl(tmp_path / "p.jsonl", [*GOOD_PREFS, {"prompt": "a", "rejected": "b"}])
    _fails_cleanly(["dpo", "--data.train", data, "--model.preset", "nano"], earlier_run, capsys,
                   "p.jsonl", "line 21", "'chosen'")


def test_empty_text(tmp_path, earlier_run, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [*GOOD_SFT, {"prompt": "a", "completion": "   "}])
    _fails_cleanly(_sft(data), earlier_run, capsys, "line 21", "empty")


def test_empty_file(tmp_path, earlier_run, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    _fails_cleanly(_sft(str(tmp_path / "empty.jsonl")), earlier_run, capsys, "empty.jsonl", "empty")


def test_non_utf8_bytes(tmp_path, earlier_run, capsys):
    bad = tmp_path / "latin1.jsonl"
    good = "".join(json.dumps(r) + "\n" for r in GOOD_SFT[:2]).encode()
    bad.write_bytes(good + '{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1"))
    _fails_cleanly(_sft(str(bad)), earlier_run, capsys, "latin1.jsonl, line 3", "UTF-8")


def test_missing_data_file(tmp_path, earlier_run, capsys):
    _fails_cleanly(_sft(str(tmp_path / "nowhere.jsonl")), earlier_run, capsys, "nowhere.jsonl")


def test_prompts_file_without_prompt_fields(tmp_path, lm_dir, earlier_run, capsys):
    data = _jsonl(tmp_path / "q.jsonl", [{"question": "hi"}])
    _fails_cleanly(["ppo", "--models.actor", str(lm_dir), "--models.reward_fn", "rule_rewards:apple_fraction",
                    "--models.critic_init", "actor", "--data.train", data], earlier_run, capsys, "q.jsonl, line 1", "prompt")


# --------------------------------------------------------------------------- lengths

def test_sequences_longer_than_the_context(tmp_path, earlier_run, capsys):
    long_rows = [{"prompt": "Q: " + " ".join(str(i) for i in range(200)), "completion": " yes."}] * 4
    data = _jsonl(tmp_path / "long.jsonl", long_rows)
    _fails_cleanly(_sft(data, "--data.max_length", "400", "--data.max_prompt_length", "390"), earlier_run, capsys,
                   "context is 256 tokens", "data.max_length")


def test_prompt_plus_response_longer_than_the_context(tmp_path, lm_dir, earlier_run, capsys):
    data = _jsonl(tmp_path / "q.jsonl", [{"prompt": "apples and bananas " * 120}])
    _fails_cleanly(["ppo", "--models.actor", str(lm_dir), "--models.reward_fn", "rule_rewards:apple_fraction",
                    "--models.critic_init", "actor", "--data.train", data, "--data.max_prompt_length", "250",
                    "--rollout.max_new_tokens", "32"], earlier_run, capsys,
                   "context is 256 tokens", "rollout.max_new_tokens")


# --------------------------------------------------------------------------- models

def _ppo(actor: Path, reward: Path, prompts: str) -> list[str]:
    return ["ppo", "--models.actor", str(actor), "--models.reward", str(reward), "--data.train", prompts]


def test_model_directory_without_weights(tmp_path, lm_dir, scalar_dir, earlier_run, capsys):
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text((lm_dir / "config.json").read_text())
    prompts = _jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}])
    _fails_cleanly(_ppo(empty, scalar_dir, prompts), earlier_run, capsys, "no_weights", "no model weights")


def test_model_directory_without_tokenizer(tmp_path, lm_dir, earlier_run, capsys):
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        (weights_only / name).write_bytes((lm_dir / name).read_bytes())
    data = _jsonl(tmp_path / "d.jsonl", GOOD_SFT)
    _fails_cleanly(["sft", "--data.train", data, "--model.path", str(weights_only)], earlier_run, capsys,
                   "weights_only", "no tokenizer files", "model.tokenizer_path")


def test_missing_model_directory(tmp_path, scalar_dir, earlier_run, capsys):
    prompts = _jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}])
    _fails_cleanly(_ppo(tmp_path / "typo", scalar_dir, prompts), earlier_run, capsys, "typo", "not found")


def test_pickle_weights_are_refused(tmp_path, lm_dir, scalar_dir, tokenizer, earlier_run, capsys):
    pickled = tmp_path / "pickled"
    model = build_preset_model("nano", tokenizer, seed=0)
    model.save_pretrained(str(pickled), safe_serialization=False)
    tokenizer.save_pretrained(str(pickled))
    if not (pickled / "pytorch_model.bin").exists():  # newer transformers always write safetensors
        for f in pickled.glob("*.safetensors"):
            f.unlink()
        torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    prompts = _jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}])
    _fails_cleanly(_ppo(pickled, scalar_dir, prompts), earlier_run, capsys, "pickle", "allow_pickle")


def test_reward_model_that_is_a_causal_lm(tmp_path, lm_dir, earlier_run, capsys):
    prompts = _jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}])
    _fails_cleanly(_ppo(lm_dir, lm_dir, prompts), earlier_run, capsys, "models.reward", "not a reward model",
                   "quartet reward")


def test_reward_model_with_two_outputs(tmp_path, lm_dir, tokenizer, earlier_run, capsys):
    two = tmp_path / "two_labels"
    model = build_preset_model("nano", tokenizer, seed=0, scalar=True)
    model.config.num_labels = 2
    model.score = torch.nn.Linear(model.config.hidden_size, 2, bias=False)
    save_model(model, tokenizer, two)
    prompts = _jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}])
    _fails_cleanly(_ppo(lm_dir, two, prompts), earlier_run, capsys, "models.reward", "2 outputs", "num_labels=1")


def test_tokenizer_without_pad_token_is_given_one(tmp_path, lm_dir, scalar_dir):
    """Not an error: a tokenizer without a pad token pads with its EOS token (as TRL does)."""
    from transformers import AutoTokenizer

    from quartet.models.tokenizer import load_tokenizer

    no_pad = tmp_path / "no_pad"
    raw = AutoTokenizer.from_pretrained(str(lm_dir))
    raw.pad_token = None
    raw.save_pretrained(str(no_pad))
    assert AutoTokenizer.from_pretrained(str(no_pad)).pad_token is None
    loaded = load_tokenizer(no_pad)
    assert loaded.pad_token is not None and loaded.pad_token_id == loaded.eos_token_id


# --------------------------------------------------------------------------- configs

def test_unknown_config_key_on_the_command_line(tmp_path, earlier_run, capsys):
    data = _jsonl(tmp_path / "d.jsonl", GOOD_SFT)
    _fails_cleanly(_sft(data, "--train.lrr", "1e-4"), earlier_run, capsys, "train.lrr", "did you mean 'train.lr'")


def test_unknown_config_key_in_a_file(tmp_path, earlier_run, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{train: {_jsonl(tmp_path / 'd.jsonl', GOOD_SFT)}}}\ntrain: {{batchsize: 8}}\n")
    _fails_cleanly(["sft", "--config", str(cfg)], earlier_run, capsys, "train.batchsize", "train.batch_size")


def test_wrong_type_in_config(tmp_path, earlier_run, capsys):
    data = _jsonl(tmp_path / "d.jsonl", GOOD_SFT)
    _fails_cleanly(_sft(data, "--train.lr", "fast"), earlier_run, capsys, "train.lr")


def test_impossible_value(tmp_path, earlier_run, capsys):
    data = _jsonl(tmp_path / "d.jsonl", GOOD_SFT)
    _fails_cleanly(_sft(data, "--train.lr", "-1"), earlier_run, capsys, "train.lr", "greater than 0")


def test_batch_not_divisible_by_mini_batch(tmp_path, lm_dir, scalar_dir, earlier_run, capsys):
    prompts = _jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}])
    _fails_cleanly([*_ppo(lm_dir, scalar_dir, prompts), "--batch.rollout_batch_size", "10", "--batch.mini_batch_size", "4"],
                   earlier_run, capsys, "batch.rollout_batch_size (10)", "batch.mini_batch_size (4)")


def test_output_path_that_is_a_file(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", GOOD_SFT)
    (tmp_path / "taken").write_text("keep me")
    code = main([*_sft(data), "--output", str(tmp_path / "taken")])
    assert code == 2 and "is a file" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "keep me"


def test_resume_of_a_finished_run_and_a_fresh_start_over_one(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", GOOD_SFT)
    argv = [*_sft(data, "--train.max_steps", "2", "--data.eval_fraction", "0"), "--output", str(tmp_path / "done")]
    assert main(argv) == 0
    finished = _snapshot(tmp_path / "done")
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2 and "already finished; nothing to resume" in capsys.readouterr().err
    assert main(argv) == 2 and "already holds a finished sft run" in capsys.readouterr().err
    assert _snapshot(tmp_path / "done") == finished


def test_a_fresh_start_over_an_interrupted_run_is_refused(tmp_path, capsys):
    """A run stopped after its step-2 checkpoint: starting the same command again without --resume would
    begin at step 0 and rotate that checkpoint out; it is refused, and the short `--resume` continues it."""
    data = _jsonl(tmp_path / "d.jsonl", GOOD_SFT)
    out = tmp_path / "stopped"
    argv = [*_sft(data, "--train.max_steps", "4", "--train.save_every", "2", "--data.eval_fraction", "0"),
            "--output", str(out)]
    assert main(argv) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]  # the last step saves final/ instead
    shutil.rmtree(out / "final")  # as if killed during step 3 or 4
    (out / "summary.json").unlink()
    before = _snapshot(out)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {out} holds an interrupted sft run (its checkpoint {out}/checkpoints/step-2); "
                   "continue it with --resume, or choose another --output\n")
    assert _snapshot(out) == before
    assert main(["sft", "--output", str(out), "--resume"]) == 0  # the run's own config.yaml: no other argument
    stdout = capsys.readouterr().out
    assert f"[sft] resuming from {out}/checkpoints/step-2 (step 2 of 4)" in stdout
    assert "[sft] 2 steps in " in stdout and "s (resumed at step 2); model in" in stdout
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_resume_with_no_checkpoint_says_it_starts_fresh(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", GOOD_SFT)
    out = tmp_path / "new"
    assert main([*_sft(data, "--train.max_steps", "2", "--data.eval_fraction", "0"), "--output", str(out), "--resume"]) == 0
    stdout = capsys.readouterr().out
    assert f"[sft] no checkpoint in {out}: starting fresh\n" in stdout
    assert "[sft] resuming from" not in stdout and "(resumed at step" not in stdout and "[sft] 2 steps in " in stdout
