"""Asynchronous RL (rollout.max_staleness): a producer process samples while the trainer updates.

Real `python -m quartet` runs on tiny models. k = 0 must be the synchronous trainer bit for bit;
k > 0 samples each batch with exactly the policy k updates old; a producer that dies or stalls is
restarted and the run's numbers do not change; one that keeps failing stops the run with a
checkpoint; a trainer killed with SIGKILL resumes to the uninterrupted run's result.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from quartet.config import RLConfig
from quartet.runs.metrics import read_metrics
from quartet.stages.rl_async import check_async, policy_version
from test_distributed import assert_ranks_identical, two_processes
from test_kill_resume import (
    NEXT_NUMBER_ENV,
    _interrupt,
    _weights,
    _without_timings,
    assert_same_run,
    save_tiny_actor_and_reward_model,
)

TIMEOUT = 300
ASYNC_ONLY = {"offpolicy/staleness", "rollout/producer_restarts"}  # what an async run logs beyond a synchronous one


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "QUARTET_PROGRESS": "0", "OMP_NUM_THREADS": "1", **extra}


def _quartet(*args: str) -> list[str]:
    return [sys.executable, "-m", "quartet", *args]


def _run(work: Path, name: str, *args: str, expect: int = 0, **env: str) -> str:
    with open(work / f"{name}.log", "w") as out:
        done = subprocess.run(_quartet(*args), cwd=work, env=_env(**env), stdout=out, stderr=subprocess.STDOUT,
                              timeout=TIMEOUT)
    log = (work / f"{name}.log").read_text()
    assert done.returncode == expect, log[-4000:]
    return log


def _ppo(work: Path, out: str, *overrides: str, expect: int = 0, **env: str) -> str:
    return _run(work, out, "ppo", "--config", "ppo.yaml", "--output", out, *overrides, expect=expect, **env)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("async")
    rows = [{"prompt": f"Q: what comes after {i}?\nA:", "completion": f" {i + 1}."} for i in range(64)]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_tiny_actor_and_reward_model(root, [r["prompt"] + r["completion"] for r in rows])
    (root / "ppo.yaml").write_text(  # PPO with a reward model and a critic; an update moves the policy visibly
        "models: {actor: actor, reward: rm, critic_init: actor}\n"
        "data: {train: prompts.jsonl}\n"
        "algorithm: {beta: 0.1, adaptive_kl: true}\n"
        "rollout: {max_new_tokens: 8}\n"
        "optim: {actor_lr: 1.0e-3}\n"
        "batch: {rollout_batch_size: 8, mini_batch_size: 4, ppo_epochs: 2}\n"
        "train: {steps: 6, log_every: 1, save_every: 1}\n")
    # a multi-turn GRPO run from a model that has learnt to stop (so that episodes take a second turn), with a
    # seeded environment that asks again after the first answer
    (root / "sft.yaml").write_text(
        "model: {path: actor}\n"
        "data: {train: sft.jsonl, max_length: 32}\n"
        "train: {lr: 0.003, max_steps: 80, batch_size: 8}\n")
    _run(root, "sft", "sft", "--config", "sft.yaml", "--output", "sft")
    (root / "async_envs.py").write_text(NEXT_NUMBER_ENV)
    (root / "agent.yaml").write_text(
        "models: {actor: sft/final}\n"
        "data: {train: prompts.jsonl}\n"
        "algorithm: {name: grpo, beta: 0.05}\n"
        "rollout: {max_new_tokens: 6, n: 4, env: 'async_envs:NextNumber', max_turns: 3, max_observation_tokens: 16}\n"
        "batch: {rollout_batch_size: 8, mini_batch_size: 8}\n"
        "optim: {actor_lr: 1.0e-3}\n"
        "train: {steps: 4, log_every: 1}\n")
    # reward functions that fail in the producer's process on the Nth call, once (a flag file says when)
    (root / "async_faults.py").write_text(
        "import multiprocessing, os, signal, time\n"
        "from pathlib import Path\n"
        "def _fault_now():\n"
        "    flag = Path('fault-at')\n"
        "    if multiprocessing.current_process().name != 'quartet-rollout-producer' or not flag.exists():\n"
        "        return None\n"
        "    calls = Path('fault-calls')\n"
        "    n = int(calls.read_text()) + 1 if calls.exists() else 1\n"
        "    calls.write_text(str(n))\n"
        "    kind, at, times = flag.read_text().split()\n"
        "    if n < int(at) or n >= int(at) + int(times):\n"
        "        return None\n"
        "    return kind\n"
        "def length(prompts, responses):\n"
        "    kind = _fault_now()\n"
        "    if kind == 'kill':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    if kind == 'stall':\n"
        "        time.sleep(60)\n"
        "    if kind == 'raise':\n"
        "        raise ValueError('the reward function broke')\n"
        "    return [len(r) / 10.0 for r in responses]\n"
        "def has_a_one(prompts, responses):\n"
        "    return [1.0 if '1' in r else 0.0 for r in responses]\n")
    # DAPO's dynamic sampling: the producer samples more rounds until groups with a signal fill the batch
    (root / "dapo.yaml").write_text(
        "preset: dapo\n"
        "models: {actor: actor, reward_fn: 'async_faults:has_a_one'}\n"
        "data: {train: prompts.jsonl}\n"
        "algorithm: {beta: 0.05, kl_penalty: loss, max_sampling_rounds: 3}\n"
        "rollout: {max_new_tokens: 6, n: 4}\n"
        "batch: {rollout_batch_size: 16, mini_batch_size: 8}\n"
        "optim: {actor_lr: 1.0e-3}\n"
        "train: {steps: 4, log_every: 1}\n")
    (root / "faults.yaml").write_text(
        "models: {actor: actor, reward_fn: 'async_faults:length'}\n"
        "data: {train: prompts.jsonl}\n"
        "algorithm: {name: grpo, beta: 0.05}\n"
        "rollout: {max_new_tokens: 6, n: 4, max_staleness: 1}\n"
        "batch: {rollout_batch_size: 8, mini_batch_size: 8}\n"
        "optim: {actor_lr: 1.0e-3}\n"
        "train: {steps: 5, log_every: 1, save_every: 1}\n")
    return root


def _set_fault(work: Path, kind: str | None, at: int = 0, times: int = 1) -> None:
    for name in ("fault-at", "fault-calls"):
        (work / name).unlink(missing_ok=True)
    if kind:
        (work / "fault-at").write_text(f"{kind} {at} {times}")


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = _weights(a), _weights(b)
    assert x.keys() == y.keys()
    different = [k for k in x if not torch.equal(x[k], y[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# ------------------------------------------------------------------------------ the schedule


def test_policy_versions_and_the_batches_in_flight_against_a_loop():
    from quartet.stages.rl_async import RolloutProducer

    for k in range(4):
        for step in range(7):
            assert policy_version(step, k) == (step - k if step >= k else 0)
            producer = RolloutProducer.__new__(RolloutProducer)
            producer.k = k
            expected = []
            for later in range(step, step + k):  # the batches sampled but not yet trained on after `step` updates
                version = later - k if later >= k else 0
                if version != step and version not in expected:
                    expected.append(version)
            assert producer.in_flight_versions(step) == sorted(expected)


def test_what_the_producer_cannot_do_is_refused_before_the_run():
    cfg = RLConfig.model_validate({"models": {"actor": "actor", "reward": "rm"}, "rollout": {"max_staleness": 1, "n": 4},
                                  "algorithm": {"dynamic_sampling": True}})
    one = SimpleNamespace(device=torch.device("cpu"), shards_parameters=False, distributed=False)
    check_async(cfg, one)
    with pytest.raises(ValueError, match="CPU only"):
        check_async(cfg, SimpleNamespace(**{**vars(one), "device": torch.device("cuda")}))
    with pytest.raises(ValueError, match="FSDP and DeepSpeed"):
        check_async(cfg, SimpleNamespace(**{**vars(one), "shards_parameters": True}))
    with pytest.raises(ValueError, match="dynamic_sampling runs on one process"):
        check_async(cfg, SimpleNamespace(**{**vars(one), "distributed": True}))


# ------------------------------------------------------------------------------ k = 0 and k > 0


@pytest.mark.parametrize("config,models", [("ppo", ("final", "final_critic")), ("agent", ("final",)),
                                           ("dapo", ("final",))])
def test_k0_is_the_synchronous_trainer_bit_for_bit(work, config, models):
    command = "ppo" if config == "ppo" else "grpo"
    _run(work, f"{config}-sync", command, "--config", f"{config}.yaml", "--output", f"{config}-sync")
    _run(work, f"{config}-k0", command, "--config", f"{config}.yaml", "--output", f"{config}-k0",
         "--rollout.max_staleness", "0")
    for name in models:
        assert_same_weights(work / f"{config}-sync" / name, work / f"{config}-k0" / name)
    sync, k0 = read_metrics(work / f"{config}-sync/metrics.jsonl"), read_metrics(work / f"{config}-k0/metrics.jsonl")
    assert len(sync) == len(k0) > 0
    for a, b in zip(sync, k0):
        a, b = _without_timings(a), _without_timings(b)
        assert set(b) - set(a) == ASYNC_ONLY and set(a) <= set(b)
        assert {k: b[k] for k in a} == a
        assert b["offpolicy/staleness"] == 0 and b["rollout/producer_restarts"] == 0
    if config == "agent":
        assert max(r["turns/mean"] for r in k0) > 1.0  # episodes of several turns went through the producer
    if config == "dapo":
        assert max(r["sampling/rounds"] for r in k0) > 1  # the producer sampled more rounds for some steps


def test_each_batch_is_sampled_exactly_k_updates_old(work):
    """k = 2 with the decoupled correction: the staleness metric counts versions, and the importance weights
    see the policy move exactly from the step the batches start being stale."""
    _ppo(work, "k2", "--rollout.max_staleness", "2", "--algorithm.offpolicy_correction", "decoupled")
    records = read_metrics(work / "k2/metrics.jsonl")
    assert [r["offpolicy/staleness"] for r in records] == [0, 1, 2, 2, 2, 2]
    first, later = records[0], records[1:]
    assert first["offpolicy/abs_log_ratio"] < 1e-5  # sampled by the policy it trains: only rounding differs
    assert min(r["offpolicy/abs_log_ratio"] for r in later) > 1e-4  # sampled by an older one
    # a checkpoint keeps the weights of the batches in flight: after 3 updates, those of steps 4 and 5
    assert sorted(p.name for p in (work / "k2/checkpoints/step-5/rollout_producer").iterdir()) == [
        "version-3.safetensors", "version-4.safetensors"]
    k2 = load_file(str(work / "k2/checkpoints/step-5/rollout_producer/version-4.safetensors"))
    v4 = _weights(work / "k2/checkpoints/step-4/actor")
    assert all(torch.equal(k2[k], v4[k]) for k in v4)  # version 4 is the actor after 4 updates


def test_sigkill_of_the_trainer_then_resume_is_bit_identical(work):
    _ppo(work, "k2-straight", "--rollout.max_staleness", "2")
    cmd = _quartet("ppo", "--config", "ppo.yaml", "--output", "k2-killed", "--rollout.max_staleness", "2")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QUARTET_PROGRESS", "0")
        patch.setenv("OMP_NUM_THREADS", "1")
        # after step 3 or 4: a checkpoint exists, and its batches in flight were sampled by older weights
        step = _interrupt(cmd, work, work / "k2-killed/metrics.jsonl", 6, signal.SIGKILL, "k2-killed.log",
                          step=int(os.environ.get("QUARTET_KILL_STEP", random.randint(3, 4))))
    resumed = subprocess.run([*cmd, "--resume"], cwd=work, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert re.search(r"resuming from k2-killed/checkpoints/step-[234] ", resumed.stdout + resumed.stderr), \
        resumed.stdout[-3000:]
    assert_same_run(work / "k2-straight", work / "k2-killed", ("final", "final_critic"))
    print("killed after step", step)


# ------------------------------------------------------------------------------ a failing producer


@pytest.fixture(scope="module")
def faults_straight(work) -> Path:
    _set_fault(work, None)
    _run(work, "faults-straight", "grpo", "--config", "faults.yaml", "--output", "faults-straight")
    return work / "faults-straight"


@pytest.mark.parametrize("kind,overrides,said", [
    ("kill", (), r"pid \d+ exited \(code -9\) while making step 3's batch; restarting it \(try 1 of 2\)"),
    ("stall", ("--rollout.producer_timeout", "3"),
     r"pid \d+ made no batch in 3 s \(rollout.producer_timeout\) while making step 3's batch; restarting it"),
])
def test_a_producer_that_dies_or_stalls_is_restarted_and_the_run_is_unchanged(work, faults_straight, kind, overrides,
                                                                                said):
    _set_fault(work, kind, at=3)  # the third batch's scoring
    log = _run(work, f"faults-{kind}", "grpo", "--config", "faults.yaml", "--output", f"faults-{kind}", *overrides)
    _set_fault(work, None)
    assert re.search(said, log), log[-3000:]
    assert_same_weights(faults_straight / "final", work / f"faults-{kind}" / "final")
    records = read_metrics(work / f"faults-{kind}/metrics.jsonl")
    assert [r["rollout/producer_restarts"] for r in records] == [0, 0, 1, 1, 1]
    straight = read_metrics(faults_straight / "metrics.jsonl")
    assert [{k: v for k, v in _without_timings(r).items() if k != "rollout/producer_restarts"} for r in records] == \
           [{k: v for k, v in _without_timings(r).items() if k != "rollout/producer_restarts"} for r in straight]


def test_a_producer_that_keeps_dying_stops_the_run_with_a_checkpoint_to_resume(work, faults_straight):
    _set_fault(work, "kill", at=3, times=100)
    log = _run(work, "faults-down", "grpo", "--config", "faults.yaml", "--output", "faults-down",
               "--rollout.producer_restarts", "1", expect=1)
    assert re.search(r"the rollout producer \(pid \d+\) exited \(code -9\) while making step 3's batch, on try 2 of 2 "
                     r"\(rollout.producer_restarts = 1\)", log), log[-3000:]
    assert "stopped before step 3, checkpoint saved in faults-down/checkpoints/step-2" in log
    pids = [int(p) for p in re.findall(r"pid (\d+)", log)]
    assert pids and not any(Path(f"/proc/{pid}").exists() and "quartet" in Path(f"/proc/{pid}/cmdline").read_text()
                            for pid in pids)
    _set_fault(work, None)  # fixed: the run resumes where it stopped, to the same result
    _run(work, "faults-down-resumed", "grpo", "--config", "faults.yaml", "--output", "faults-down", "--resume")
    assert_same_weights(faults_straight / "final", work / "faults-down" / "final")


def test_a_script_without_a_main_guard_is_told_so_and_does_not_hang(work):
    """The producer is spawned: it imports the script that started the run again. Unguarded, the script
    would start a second run in it; it is stopped at once, and the trainer stops cleanly."""
    (work / "unguarded.py").write_text(
        "import sys\nfrom quartet.cli import main\n"
        "sys.exit(main(['grpo', '--config', 'faults.yaml', '--output', 'unguarded', '--train.steps', '2',"
        " '--rollout.producer_restarts', '0']))\n")
    with open(work / "unguarded.log", "w") as out:
        done = subprocess.run([sys.executable, "unguarded.py"], cwd=work, env=_env(), stdout=out,
                              stderr=subprocess.STDOUT, timeout=120)
    log = (work / "unguarded.log").read_text()
    assert done.returncode == 1, log[-3000:]
    assert "put the script's run behind `if __name__ == \"__main__\":`" in log
    assert re.search(r"the rollout producer \(pid \d+\) exited \(code 1\) while making step 1's batch", log)
    assert not (work / "unguarded" / "final").exists()


def test_an_error_in_the_producer_stops_the_run_with_its_traceback(work):
    _set_fault(work, "raise", at=2)
    log = _run(work, "faults-raise", "grpo", "--config", "faults.yaml", "--output", "faults-raise", expect=1)
    _set_fault(work, None)
    assert "the rollout producer failed making step 2's batch" in log, log[-3000:]
    assert "ValueError: the reward function broke" in log and "async_faults.py" in log


# ------------------------------------------------------------------------------ two processes


def test_two_processes_k0_is_their_synchronous_run_and_k1_keeps_the_ranks_equal(work):
    sync = two_processes(work, "ppo", "--config", "ppo.yaml", "--output", "two-sync", "--train.steps", "3")
    k0 = two_processes(work, "ppo", "--config", "ppo.yaml", "--output", "two-k0", "--train.steps", "3",
                       "--rollout.max_staleness", "0")
    assert_same_weights(work / "two-sync/final", work / "two-k0/final")
    assert [{k: v for k, v in _without_timings(r).items() if k not in ASYNC_ONLY}
            for r in read_metrics(work / "two-k0/metrics.jsonl")] == \
           [_without_timings(r) for r in read_metrics(work / "two-sync/metrics.jsonl")]
    k1 = two_processes(work, "ppo", "--config", "ppo.yaml", "--output", "two-k1", "--train.steps", "3",
                       "--rollout.max_staleness", "1")
    for dump in (sync, k0, k1):
        assert_ranks_identical(dump, "final")
    assert [r["offpolicy/staleness"] for r in read_metrics(work / "two-k1/metrics.jsonl")] == [0, 1, 1]
