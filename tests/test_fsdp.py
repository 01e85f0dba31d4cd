"""FSDP2 sharding on two processes (gloo on CPU) against the same run on one process.

The code that shards here is the code that shards on GPUs (quartet.runs.sharding: torch's
`fully_shard` on every transformer block, then the root). Each stage (SFT, reward model, DPO with
its reference, PPO with all four models, GRPO) runs sharded on 2 ranks and is compared with one
process within the tolerances of tests/test_distributed.py (rounding only); a sharded checkpoint
resumes on one process and on two, Adam's moments included; a sharded run killed with SIGKILL at
a random step resumes bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from quartet.runs.checkpoint import list_checkpoints
from quartet.runs.sharding import (
    SHARDED_STATE,
    check_launcher_settings,
    fsdp_requested,
    is_sharded_checkpoint,
    reshard_after_forward,
)
from test_distributed import (
    RANK_DUMP,
    TIMEOUT,
    _env,
    _run,
    assert_metrics_close,
    assert_weights_close,
    write_stage_inputs,
)
from test_kill_resume import assert_same_run, wait_until_logged

ACCELERATE_FSDP = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp.yaml"
MOMENTS_WARNING = "moments restart"


def one_process(cwd: Path, stage: str, out: str, *args: str) -> str:
    _run([sys.executable, "-m", "quartet", stage, "--config", f"{stage}.yaml", "--output", out, *args], cwd, f"{out}.log")
    return (cwd / f"{out}.log").read_text()


def torchrun(cwd: Path, stage: str, out: str, *args: str, script: tuple[str, ...] = ("-m", "quartet"), **env: str) -> str:
    """`quartet <stage>` on 2 ranks under torchrun, sharded by the config switch (run.fsdp)."""
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *script, stage,
          "--config", f"{stage}.yaml", "--output", out, "--run.fsdp", "true", *args], cwd, f"{out}.log", **env)
    return (cwd / f"{out}.log").read_text()


def accelerate_launch(cwd: Path, stage: str, out: str) -> str:
    """`quartet <stage>` on 2 ranks under `accelerate launch` with the example FSDP config: the
    switch users already pass (it sets ACCELERATE_USE_FSDP); nothing in the Quartet config."""
    with socket.socket() as s:  # the config's port 29500 may be taken on a shared machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_FSDP),
          "--num_processes", "2", "--main_process_port", str(port), "-m", "quartet", stage,
          "--config", f"{stage}.yaml", "--output", out], cwd, f"{out}.log")
    return (cwd / f"{out}.log").read_text()


def memory_per_rank(log: str) -> dict[int, dict[str, float]]:
    """The MiB each rank reported holding after the first step (the run loop's memory report)."""
    found = {}
    for rank, parts in re.findall(r"^  rank (\d+): (.*);", log, flags=re.M):
        found[int(rank)] = {name.strip(): float(mib) for name, mib in re.findall(r"([a-z ]+?) ([\d.]+) MiB", parts)}
    assert found, "no memory report in the log"
    return found


def assert_sharded_checkpoints(run_dir: Path) -> None:
    """Each checkpoint of a 2-rank FSDP run: torch.distributed.checkpoint shards of the model and the optimizer,
    the second rank's RNG state, and trainer_state.pt without the optimizer; no whole-model directory."""
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    assert checkpoints
    for _, path in checkpoints:
        assert is_sharded_checkpoint(path) and (path / "rng-rank1.pt").is_file()
        assert len(list((path / SHARDED_STATE).glob("*.distcp"))) == 2  # one file per rank
        assert not (path / "model").exists() and not (path / "actor").exists()
        assert torch.load(path / "trainer_state.pt", weights_only=True).get("optimizer") is None


def assert_moments_restored(dump: Path) -> None:
    """Adam's moments (and step counts) as the resumed run holds them equal those the checkpoint saved."""
    state = torch.load(dump, weights_only=True)
    restored, saved = state["restored"], state["saved"]
    assert restored.keys() == saved.keys() and restored
    for name in saved:
        for moment in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(restored[name][moment], saved[name][moment]), f"{name} {moment} not restored"
    assert any(float(s["exp_avg_sq"].abs().sum()) > 0 for s in saved.values())  # moments, not fresh zeros


def resume_on_one_process(work: Path, stage: str, two_dir: Path, step: int, models: tuple[str, ...],
                          *args: str) -> None:
    """Copy the sharded run as it was at checkpoint `step`, finish it on one process (`args`: the
    run's own overrides), compare."""
    out = work / f"{two_dir.name}-resumed-on-1"
    shutil.copytree(two_dir, out, ignore=shutil.ignore_patterns("final*", "summary.json", "tensorboard"))
    for later, path in list_checkpoints(out / "checkpoints"):
        if later > step:
            shutil.rmtree(path)
    dump = work / f"{out.name}-optimizer.pt"
    _run([sys.executable, str(RANK_DUMP), stage, "--config", f"{stage}.yaml", "--output", out.name, "--resume",
          *args], work, f"{out.name}.log", QUARTET_TEST_RESUME_DUMP=str(dump))
    assert MOMENTS_WARNING not in (work / f"{out.name}.log").read_text()
    assert_moments_restored(dump)
    for name in models:
        assert_weights_close(two_dir / name, out / name)
    assert_metrics_close(two_dir / "metrics.jsonl", out / "metrics.jsonl")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return write_stage_inputs(tmp_path_factory.mktemp("fsdp"))


# --------------------------------------------------------------------------- the switch


def test_fsdp_is_the_config_switch_else_the_launchers():
    assert fsdp_requested(None, {}) is False
    assert fsdp_requested(None, {"ACCELERATE_USE_FSDP": "true"}) is True  # accelerate launch, FSDP config
    assert fsdp_requested(False, {"ACCELERATE_USE_FSDP": "true"}) is False
    assert fsdp_requested(True, {}) is True
    assert reshard_after_forward(None, {}) is True
    assert reshard_after_forward(None, {"FSDP_RESHARD_AFTER_FORWARD": "false"}) is False
    assert reshard_after_forward(True, {"FSDP_RESHARD_AFTER_FORWARD": "false"}) is True
    check_launcher_settings({"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "false"})
    with pytest.raises(ValueError, match="fsdp_offload_params: true"):
        check_launcher_settings({"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"})


def test_run_fsdp_false_under_an_fsdp_launch_is_refused(monkeypatch):
    from types import SimpleNamespace

    from quartet.runs.distributed import Ranks

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    two_ranks = SimpleNamespace(process_index=0, num_processes=2, is_main_process=True, device=torch.device("cpu"),
                                distributed_type=None)
    with pytest.raises(ValueError, match="the Accelerate config asks for FSDP but run.fsdp is false"):
        Ranks(two_ranks, fsdp_setting=False)


def test_options_that_do_not_combine_with_sharding_are_refused_by_name():
    from types import SimpleNamespace

    from quartet.stages.common import check_fsdp_options

    sharded, plain = SimpleNamespace(fsdp=object()), SimpleNamespace(fsdp=None)
    check_fsdp_options(plain, lora=True, shared_trunk=True, compile=True)  # DDP and one process take them all
    check_fsdp_options(sharded, lora=False)
    for option, what in (({"lora": True}, "LoRA"), ({"lora": False, "shared_trunk": True}, "models.shared_trunk"),
                         ({"lora": False, "compile": True}, "train.compile")):
        with pytest.raises(ValueError, match=f"{what}.* does not combine with FSDP sharding"):
            check_fsdp_options(sharded, **option)


# --------------------------------------------------------------------------- 2 ranks vs 1 process


# DPO computes its reference's log-probs in every forward (not precomputed), the reference sharded too
STAGE_ARGS = {"sft": (), "reward": (), "dpo": ("--dpo.precompute_ref_logprobs", "false", "--run.fsdp_frozen", "true")}


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_supervised_stage_sharded_on_two_processes_matches_one_and_resumes_on_one(work, stage):
    args = STAGE_ARGS[stage]
    one = one_process(work, stage, f"{stage}-1proc", "--run.fsdp", "true", *args)  # one process: nothing to shard
    # SFT is sharded by the example Accelerate FSDP config, the reward model and DPO by run.fsdp
    two = accelerate_launch(work, stage, f"{stage}-fsdp") if stage == "sft" else torchrun(work, stage, f"{stage}-fsdp", *args)
    assert "sharded with FSDP2" in two and MOMENTS_WARNING not in two
    assert_sharded_checkpoints(work / f"{stage}-fsdp")
    final = json.loads((work / f"{stage}-fsdp" / "final" / "config.json").read_text())  # a plain HF directory
    assert final["architectures"] == ["LlamaForSequenceClassification" if stage == "reward" else "LlamaForCausalLM"]
    assert_weights_close(work / f"{stage}-1proc" / "final", work / f"{stage}-fsdp" / "final")
    assert_metrics_close(work / f"{stage}-1proc" / "metrics.jsonl", work / f"{stage}-fsdp" / "metrics.jsonl")
    whole, ranks = memory_per_rank(one)[0], memory_per_rank(two)
    # each rank holds about half of the parameters and of Adam's moments (and of DPO's reference)
    for rank in (0, 1):
        for part in ("trained parameters", "optimizer state", *(("frozen models",) if stage == "dpo" else ())):
            assert ranks[rank][part] <= 0.52 * whole[part], (rank, part, ranks[rank][part], whole[part])
    resume_on_one_process(work, stage, work / f"{stage}-fsdp", 6, ("final",), *args)


def test_ppo_with_all_four_models_sharded_matches_one_process(work):
    """Actor and critic trained, reference and reward model frozen: every one of them sharded."""
    one = one_process(work, "ppo", "ppo-1proc", "--run.fsdp", "true", "--run.fsdp_frozen", "true")
    two = torchrun(work, "ppo", "ppo-fsdp", "--run.fsdp_frozen", "true")
    assert_sharded_checkpoints(work / "ppo-fsdp")
    for name in ("final", "final_critic"):
        assert_weights_close(work / "ppo-1proc" / name, work / "ppo-fsdp" / name)
    assert_metrics_close(work / "ppo-1proc" / "metrics.jsonl", work / "ppo-fsdp" / "metrics.jsonl")
    whole, ranks = memory_per_rank(one)[0], memory_per_rank(two)
    for rank in (0, 1):
        for part in ("trained parameters", "optimizer state", "frozen models"):
            assert ranks[rank][part] <= 0.52 * whole[part], (rank, part, ranks[rank][part], whole[part])
        # the rollout gathers the actor alone: half of the trained parameters (actor + critic) of one process
        assert ranks[rank]["gathered for generation"] == pytest.approx(whole["trained parameters"] / 2, rel=0.01)


def test_grpo_sharded_on_two_processes_matches_one(work):
    one_process(work, "grpo", "grpo-1proc")
    torchrun(work, "grpo", "grpo-fsdp")
    assert_sharded_checkpoints(work / "grpo-fsdp")
    assert_weights_close(work / "grpo-1proc" / "final", work / "grpo-fsdp" / "final")
    assert_metrics_close(work / "grpo-1proc" / "metrics.jsonl", work / "grpo-fsdp" / "metrics.jsonl")


# --------------------------------------------------------------------------- kill and resume

KILL_STEPS = 30


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux /proc). torchrun starts each rank in a session of its own, so
    they are not in the launcher's process group."""
    tree, i = [pid], 0
    while i < len(tree):
        for task in Path(f"/proc/{tree[i]}/task").glob("*"):
            tree += [int(c) for c in (task / "children").read_text().split()]
        i += 1
    return tree


def _kill_at_a_random_step(cmd: list[str], cwd: Path, watch: Path, log: str) -> None:
    """Start a 2-rank run; after a random logged step (+ a random delay, so the kill may land in a
    checkpoint's write) SIGKILL the launcher and both ranks at once, as a lost node."""
    rng = random.Random()
    # from step 2 on a complete checkpoint exists (step 1's), so --resume has one to resume from
    step = int(os.environ.get("QUARTET_KILL_STEP", rng.randint(2, KILL_STEPS * 3 // 4)))
    delay = rng.uniform(0.0, 0.05)
    print(f"SIGKILL after step {step} (+{delay * 1000:.0f} ms)")
    with open(cwd / log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until_logged(proc, watch, step, cwd / log, timeout=TIMEOUT)
            time.sleep(delay)
        finally:
            tree = _process_tree(proc.pid)
            for pid in reversed(tree):  # the ranks first, then the launcher
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=TIMEOUT)
    assert len(tree) >= 3, f"expected the launcher and two ranks, found {tree}"


def test_sigkill_of_a_sharded_run_then_resume_is_bit_identical_with_the_moments_restored(work):
    """SFT of a model with dropout, so each rank's own random stream must come back too."""
    from quartet.models.loading import load_causal_lm, save_model
    from quartet.models.tokenizer import load_tokenizer

    actor = load_causal_lm(str(work / "actor"))
    actor.config.attention_dropout = 0.1
    save_model(actor, load_tokenizer(str(work / "actor")), work / "actor-dropout")
    (work / "sft-kill.yaml").write_text(
        "model: {path: actor-dropout}\n"
        "data: {train: sft.jsonl, eval: sft-eval.jsonl, max_length: 32}\n"
        f"train: {{lr: 0.003, max_steps: {KILL_STEPS}, batch_size: 8, grad_accum: 2, eval_every: 10, log_every: 1,"
        " save_every: 1}\n"
        "run: {fsdp: true}\n")

    def command(out: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(RANK_DUMP),
                "sft", "--config", "sft-kill.yaml", "--output", out, *extra]

    _run(command("kill-straight"), work, "kill-straight.log")
    _kill_at_a_random_step(command("kill-killed"), work, work / "kill-killed" / "metrics.jsonl", "kill-killed.log")
    assert not (work / "kill-killed" / "summary.json").exists()
    dump = work / "kill-resumed-optimizer.pt"
    _run(command("kill-killed", "--resume"), work, "kill-resumed.log", QUARTET_TEST_RESUME_DUMP=str(dump))
    assert MOMENTS_WARNING not in (work / "kill-resumed.log").read_text()
    assert not list((work / "kill-killed" / "checkpoints").glob(".tmp-*")), "a half-written checkpoint was left behind"
    assert_moments_restored(dump)
    assert_same_run(work / "kill-straight", work / "kill-killed")
