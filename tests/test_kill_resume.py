"""Kill real training processes and resume them: the result equals an uninterrupted run, bit for bit.

Each stage runs three times as a separate `python -m quartet` process: straight through; killed
with SIGKILL (or stopped with SIGTERM) at a random step; resumed with `--resume`. Final weights,
metrics (all but wall-clock timings) and summaries must be identical. The random step is printed,
and QUARTET_KILL_STEP=N replays one; QUARTET_KILL_STAGE=dpo replays the demo test's stage.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quartet.models.loading import save_model
from quartet.models.presets import build_preset_model
from quartet.runs.checkpoint import list_checkpoints
from quartet.runs.metrics import read_metrics

TIMEOUT = 300


def _env() -> dict[str, str]:
    return {**os.environ, "QUARTET_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def _quartet(*args: str) -> list[str]:
    return [sys.executable, "-m", "quartet", *args]


def _run(cmd: list[str], cwd: Path, log: str) -> subprocess.CompletedProcess:
    with open(cwd / log, "w") as out:
        return subprocess.run(cmd, cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT, timeout=TIMEOUT)


def _last_logged_step(metrics: Path) -> int:
    records = read_metrics(metrics) if metrics.exists() else []
    return records[-1]["step"] if records else -1


def wait_until_logged(proc: subprocess.Popen, watch: Path, step: int, log: Path | None, timeout: float = TIMEOUT) -> None:
    """Poll `watch` (a metrics.jsonl) until it logs `step`; fail if `proc` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while _last_logged_step(watch) < step:
        assert proc.poll() is None, (f"the run ended (rc {proc.returncode}) before step {step}: "
                                     + (log.read_text()[-2000:] if log else ""))
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.002)


def _interrupt(cmd: list[str], cwd: Path, watch: Path, last_step: int, sig: int, log: str,
               step: int | None = None, max_delay: float = 0.03) -> int:
    """Start `cmd`, wait until `watch` logs `step` (default: a random one), then send `sig`; returns the step."""
    rng = random.Random()
    if step is None:
        step = int(os.environ.get("QUARTET_KILL_STEP", rng.randint(1, last_step * 3 // 4)))
    delay = rng.uniform(0.0, max_delay)  # land anywhere in the following step, checkpoint writes included
    print(f"{signal.Signals(sig).name} after step {step} (+{delay * 1000:.0f} ms)")
    with open(cwd / log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until_logged(proc, watch, step, cwd / log)
            time.sleep(delay)
            proc.send_signal(sig)
            proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
    return step


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    assert state, f"no weights in {path}"
    return state


def _without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("time/") and k not in ("seconds", "time")}


def assert_same_run(straight: Path, resumed: Path, model_dirs: tuple[str, ...] = ("final",)) -> None:
    for name in model_dirs:
        a, b = _weights(straight / name), _weights(resumed / name)
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"
    a, b = read_metrics(straight / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert _without_timings(ra) == _without_timings(rb), f"metrics differ at step {ra['step']}"
    sa = json.loads((straight / "summary.json").read_text())
    sb = json.loads((resumed / "summary.json").read_text())
    paths = {k: sa[k] for k in ("final_dir", "reference") if k in sa}  # name the run's own directories
    assert _without_timings(sa) == _without_timings({**sb, **paths})


# --------------------------------------------------------------------------- stage set-ups

SFT_STEPS = 200
REWARD_STEPS = 150
PPO_STEPS = 40
GRPO_STEPS = 30
DPO_STEPS = 80
AGENT_STEPS = 20
COMMANDS = {"agent": "grpo"}  # runs named apart from the command that runs them
# a seeded environment that asks again after the first answer: episodes of two turns when the model stops
NEXT_NUMBER_ENV = (
    "class NextNumber:\n"
    "    def __init__(self, rng):\n"
    "        self.digit, self.turn = str(rng.randrange(10)), 0\n"
    "    def reset(self):\n"
    "        return None\n"
    "    def step(self, action):\n"
    "        self.turn += 1\n"
    "        reward = float(self.digit in action)\n"
    "        return ('And after that?', reward, False) if self.turn < 2 else (None, reward, True)\n")


def save_tiny_actor_and_reward_model(root: Path, texts: list[str]) -> None:
    """`root/actor` and `root/rm`: nano Llamas (a causal LM and a one-output scorer) on a tokenizer of `texts`."""
    from quartet.models.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    save_model(build_preset_model("nano", tokenizer, seed=0), tokenizer, root / "actor")
    save_model(build_preset_model("nano", tokenizer, seed=1, scalar=True), tokenizer, root / "rm")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Data files, stage configs and a tiny actor + reward model, shared by the stage runs."""
    root = tmp_path_factory.mktemp("kill")
    sft = [{"prompt": f"Q: what comes after {i}?\nA:", "completion": f" {i + 1}."} for i in range(80)]
    prefs = [{"prompt": f"Q: is {i} a number?\nA:", "chosen": " yes.", "rejected": f" no, {i} is a fish."}
             for i in range(80)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in sft))
    (root / "sft.yaml").write_text(
        "model: {preset: nano, vocab_size: 300}\n"
        "data: {train: sft.jsonl, eval_fraction: 0.1, max_length: 32}\n"
        f"train: {{lr: 0.003, max_steps: {SFT_STEPS}, batch_size: 8, eval_every: 25, log_every: 1, save_every: 1}}\n")
    (root / "reward.yaml").write_text(
        "model: {preset: nano, vocab_size: 300}\n"
        "data: {train: prefs.jsonl, eval_fraction: 0.1, max_length: 32}\n"
        f"train: {{lr: 0.001, max_steps: {REWARD_STEPS}, batch_size: 8, eval_every: 25, log_every: 1, save_every: 1,"
        " keep_checkpoints: 1}\n")
    save_tiny_actor_and_reward_model(root, [r["prompt"] + r["completion"] for r in sft])
    (root / "ppo.yaml").write_text(
        "models: {actor: actor, reward: rm, critic_init: actor}\n"
        "data: {train: prompts.jsonl}\n"
        "algorithm: {beta: 0.1, adaptive_kl: true}\n"
        "rollout: {max_new_tokens: 8}\n"
        "batch: {rollout_batch_size: 8, mini_batch_size: 4, ppo_epochs: 2}\n"
        f"train: {{steps: {PPO_STEPS}, log_every: 1, save_every: 1, sample_every: 5, n_samples: 2}}\n")
    # GRPO with DAPO's dynamic sampling (the prompt stream moves a varying amount per step) and a KL
    # loss term; a 0/1 rule reward, so some groups carry no signal and are replaced
    (root / "kill_rewards.py").write_text(
        "def has_a_one(prompts, responses):\n    return [1.0 if '1' in r else 0.0 for r in responses]\n")
    (root / "grpo.yaml").write_text(
        "preset: dapo\n"
        "models: {actor: actor, reward_fn: 'kill_rewards:has_a_one'}\n"
        "data: {train: prompts.jsonl}\n"
        "algorithm: {beta: 0.05, kl_penalty: loss, max_sampling_rounds: 3}\n"
        "rollout: {max_new_tokens: 6, n: 4}\n"
        "batch: {rollout_batch_size: 16, mini_batch_size: 8}\n"
        "optim: {actor_lr: 1.0e-3}\n"
        f"train: {{steps: {GRPO_STEPS}, log_every: 1, save_every: 1, sample_every: 5, n_samples: 2}}\n")
    # multi-turn episodes (GRPO) with a seeded environment, from the SFT run's model (it has learnt to stop,
    # so episodes take a second turn): the environments' draws must replay after a resume
    (root / "kill_envs.py").write_text(NEXT_NUMBER_ENV)
    (root / "agent.yaml").write_text(
        "models: {actor: sft-straight/final}\n"
        "data: {train: prompts.jsonl}\n"
        "algorithm: {name: grpo, beta: 0.05}\n"
        "rollout: {max_new_tokens: 6, n: 4, env: 'kill_envs:NextNumber', max_turns: 3, max_observation_tokens: 16}\n"
        "batch: {rollout_batch_size: 16, mini_batch_size: 8}\n"
        "optim: {actor_lr: 1.0e-3}\n"
        f"train: {{steps: {AGENT_STEPS}, log_every: 1, save_every: 1, sample_every: 5, n_samples: 2}}\n")
    # DPO from the saved actor on the reward model's preference pairs; the live reference is a copy
    # of the starting model, which a resumed run must rebuild from model.path, not from the checkpoint
    (root / "dpo.yaml").write_text(
        "model: {path: actor}\n"
        "data: {train: prefs.jsonl, eval_fraction: 0.1, max_length: 32}\n"
        f"train: {{lr: 0.001, max_steps: {DPO_STEPS}, batch_size: 8, grad_accum: 2, eval_every: 20, log_every: 1,"
        " save_every: 1, keep_checkpoints: 1}\n")
    return root


@pytest.fixture(scope="module")
def straight(work) -> dict[str, Path]:
    """Each stage run once, uninterrupted."""
    stages = ("sft", "reward", "ppo", "grpo", "dpo", "agent")
    for stage in stages:
        done = _run(_quartet(COMMANDS.get(stage, stage), "--config", f"{stage}.yaml", "--output", f"{stage}-straight"),
                    work, f"{stage}.log")
        assert done.returncode == 0, (work / f"{stage}.log").read_text()[-3000:]
    return {stage: work / f"{stage}-straight" for stage in stages}


@pytest.mark.parametrize("stage,last_step,models", [
    ("sft", SFT_STEPS, ("final",)),
    ("reward", REWARD_STEPS, ("final",)),
    ("ppo", PPO_STEPS, ("final", "final_critic")),
    ("grpo", GRPO_STEPS, ("final",)),
    ("dpo", DPO_STEPS, ("final",)),
    ("agent", AGENT_STEPS, ("final",)),
])
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(work, straight, stage, last_step, models):
    out = work / f"{stage}-killed"
    cmd = _quartet(COMMANDS.get(stage, stage), "--config", f"{stage}.yaml", "--output", out.name)
    _interrupt(cmd, work, out / "metrics.jsonl", last_step, signal.SIGKILL, f"{stage}-killed.log")
    assert not (out / "summary.json").exists()
    resumed = _run([*cmd, "--resume"], work, f"{stage}-resumed.log")
    assert resumed.returncode == 0, (work / f"{stage}-resumed.log").read_text()[-3000:]
    assert not list((out / "checkpoints").glob(".tmp-*")), "a half-written checkpoint was left behind"
    assert_same_run(straight[stage], out, models)
    if stage == "agent":
        assert max(r["turns/mean"] for r in read_metrics(out / "metrics.jsonl")) > 1.0  # episodes of several turns
    if stage in ("ppo", "grpo", "agent"):  # the sample log is cut back to the checkpoint too
        a = (straight[stage] / "samples.jsonl").read_text().splitlines()
        b = (out / "samples.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in a] == [json.loads(x)["step"] for x in b]
    if stage == "dpo":  # the held-out pairs' implicit rewards, written at the end
        assert (straight[stage] / "dpo_samples.jsonl").read_text() == (out / "dpo_samples.jsonl").read_text()


def test_sigterm_saves_a_checkpoint_exits_cleanly_and_resumes(work, straight):
    out = work / "sft-term"
    cmd = _quartet("sft", "--config", "sft.yaml", "--output", out.name, "--train.save_every", "50")
    _interrupt(cmd, work, out / "metrics.jsonl", SFT_STEPS, signal.SIGTERM, "sft-term.log")
    log = (work / "sft-term.log").read_text()
    stopped = _last_logged_step(out / "metrics.jsonl")
    assert "SIGTERM received: stopped after step" in log and "--resume" in log
    checkpoints = [step for step, _ in list_checkpoints(out / "checkpoints")]
    assert checkpoints[-1] == stopped  # saved where it stopped, not at the last save_every
    resumed = _run([*cmd, "--resume"], work, "sft-term-resumed.log")
    assert resumed.returncode == 0
    assert_same_run(straight["sft"], out)


def test_sigterm_exit_status_is_128_plus_the_signal(work):
    out = work / "sft-term-rc"
    cmd = _quartet("sft", "--config", "sft.yaml", "--output", out.name)
    with open(work / "rc.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + TIMEOUT
        while _last_logged_step(out / "metrics.jsonl") < 1 and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 128 + signal.SIGTERM


@pytest.mark.parametrize("stage,steps", [("sft", 40), ("grpo", 20)])
def test_ctrl_c_with_the_output_pipe_gone_saves_a_checkpoint_and_resumes_by_its_directory(work, stage, steps):
    """`quartet STAGE ... 2>&1 | tee log`, then Ctrl-C: the signal kills `tee` too, so every write to
    stdout or stderr (the signal's own message, the progress bar, the closing line) meets a pipe with
    no reader. The run still finishes its step, writes its checkpoint and exits 130; then
    `quartet STAGE --output RUN --resume`, without the original arguments, continues it to the end."""
    out = work / f"{stage}-pipe"
    steps_key = "--train.max_steps" if stage == "sft" else "--train.steps"
    cmd = _quartet(stage, "--config", f"{stage}.yaml", "--output", out.name, steps_key, str(steps),
                   "--train.save_every", "1000")  # the only checkpoint is the one the signal asks for
    env = {**_env(), "QUARTET_PROGRESS": "1"}  # the progress bar writes into the dead pipe too
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until_logged(proc, out / "metrics.jsonl", 2, None)
        proc.stdout.close()  # the pipe's reader is gone...
        proc.stderr.close()
        proc.send_signal(signal.SIGINT)  # ...when the signal arrives
        assert proc.wait(timeout=TIMEOUT) == 128 + signal.SIGINT
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped = _last_logged_step(out / "metrics.jsonl")
    assert 2 <= stopped < steps
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [stopped]
    resumed = _run(_quartet(stage, "--output", out.name, "--resume"), work, f"{stage}-pipe-resumed.log")
    log = (work / f"{stage}-pipe-resumed.log").read_text()
    assert resumed.returncode == 0, log[-3000:]
    assert f"resuming from {out.name}/checkpoints/step-{stopped} (step {stopped} of {steps})" in log
    assert f"{steps - stopped} steps in " in log and f"(resumed at step {stopped})" in log
    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == steps
    assert json.loads((out / "summary.json").read_text())["steps"] == steps


def test_demo_killed_in_any_stage_resumes_to_the_same_result(tmp_path):
    """The demo (tiny sizes) killed while a random stage trains; `--resume` keeps finished stages."""
    tiny = {"n_sft": 200, "sft_epochs": 1.0, "n_rm_prompts": 60, "rm_epochs": 1.0, "n_rm_eval_prompts": 20,
            "ppo_steps": 3, "rollout_batch_size": 8, "mini_batch_size": 4, "n_eval_prompts": 16, "preset": "nano",
            "dpo_epochs": 1.0}
    script = ("import json, sys; from quartet.demo.run import run_demo; "
              "run_demo(sys.argv[1], seed=2, overrides=json.loads(sys.argv[2]), resume=sys.argv[3] == '1')")

    def demo(out: str, resume: bool) -> list[str]:
        return [sys.executable, "-c", script, out, json.dumps(tiny), "1" if resume else "0"]

    assert _run(demo("straight", False), tmp_path, "straight.log").returncode == 0
    stage = os.environ.get("QUARTET_KILL_STAGE") or random.choice(["sft", "reward", "ppo", "dpo"])
    print(f"killing the demo during {stage}")
    # The tiny stages log few steps: kill at a random moment soon after the stage's first record. Each stage
    # runs 150-400 ms past that record here, so the delay stays well inside it; the last stage (dpo) with a
    # longer delay let the demo finish before the signal.
    _interrupt(demo("killed", False), tmp_path, tmp_path / "killed" / stage / "metrics.jsonl", 1, signal.SIGKILL,
               "killed.log", step=0, max_delay=0.05)
    assert not (tmp_path / "killed" / stage / "summary.json").exists(), f"the kill landed after {stage} finished"
    assert not (tmp_path / "killed" / "summary.json").exists()
    refused = _run(demo("killed", False), tmp_path, "refused.log")
    assert refused.returncode != 0 and "--resume" in (tmp_path / "refused.log").read_text()
    assert _run(demo("killed", True), tmp_path, "resumed.log").returncode == 0, (tmp_path / "resumed.log").read_text()
    a = json.loads((tmp_path / "straight" / "summary.json").read_text())
    b = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert _without_timings(a) == _without_timings(b)
    for name in ("sft", "reward", "ppo", "dpo"):
        assert_same_run(tmp_path / "straight" / name, tmp_path / "killed" / name)
