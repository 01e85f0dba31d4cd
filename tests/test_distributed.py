"""Every stage on two processes (torchrun, gloo on CPU) against the same run on one process.

The configs' batch sizes are global, so two ranks do the same arithmetic as one process,
only split: the rollouts are the same (each rank samples its rows of the global batch with
the same random numbers), gradients are averaged by DDP, metrics are reduced over ranks.
What may differ is floating-point rounding (other batch shapes, another summation order), so
metrics and weights are compared within tolerances far below any real effect of the
arithmetic; parameters on the two ranks must be identical.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quartet.models.loading import save_model
from quartet.models.presets import build_preset_model
from quartet.runs.checkpoint import list_checkpoints
from quartet.runs.metrics import read_metrics

TIMEOUT = 600
RANK_DUMP = Path(__file__).with_name("rank_dump.py")
# Rounding differences only. Weights get a looser bound: Adam divides by the gradient's own
# scale, so in a rarely used parameter (an embedding row seen once) rounding noise in a tiny
# gradient can move the weight by a fraction of one step (lr = 3e-3 here; 12 steps move up to 0.036).
METRIC_RTOL, METRIC_ATOL, WEIGHT_ATOL = 1e-4, 1e-6, 1e-4
# A clip fraction counts the tokens whose ratio lies past the clip range; a ratio within rounding of
# the boundary lands on either side (seen here: one value token of 128), so these get one token's slack.
FRACTION_ATOL = 1 / 64


def _env() -> dict[str, str]:
    return {**os.environ, "QUARTET_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], cwd: Path, log: str, **env: str) -> None:
    with open(cwd / log, "w") as out:
        done = subprocess.run(cmd, cwd=cwd, env={**_env(), **env}, stdout=out, stderr=subprocess.STDOUT, timeout=TIMEOUT)
    assert done.returncode == 0, (cwd / log).read_text()[-4000:]


def one_process(cwd: Path, *args: str) -> None:
    _run([sys.executable, "-m", "quartet", *args], cwd, f"{args[4]}.log")


def two_processes(cwd: Path, *args: str) -> Path:
    """`quartet <args>` under torchrun with 2 ranks; returns where each rank dumped its saved models."""
    dump = cwd / f"{args[4]}-ranks"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(RANK_DUMP), *args],
         cwd, f"{args[4]}.log", QUARTET_TEST_RANK_DUMP=str(dump))
    return dump


def _weights(path: Path) -> dict[str, torch.Tensor]:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    assert state, f"no weights in {path}"
    return state


def assert_ranks_identical(dump: Path, name: str) -> None:
    a, b = _weights(dump / f"{name}-rank0.safetensors"), _weights(dump / f"{name}-rank1.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{name}: the ranks disagree on {different[:3]}"


def assert_weights_close(a_dir: Path, b_dir: Path) -> None:
    a, b = _weights(a_dir), _weights(b_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=WEIGHT_ATOL, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


def _comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.startswith("time/") and k not in ("seconds", "time", "final_dir")}


def assert_metrics_close(a_path: Path, b_path: Path, after_step: int = -1) -> None:
    a = [r for r in read_metrics(a_path) if r["step"] > after_step]
    b = [r for r in read_metrics(b_path) if r["step"] > after_step]
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for ra, rb in zip(a, b):
        ra, rb = _comparable(ra), _comparable(rb)
        assert ra.keys() == rb.keys(), f"step {ra['step']}: different metrics"
        for key in ra:
            atol = FRACTION_ATOL if key.endswith(("clipfrac", "clipfrac_low", "clipfrac_high")) else METRIC_ATOL
            assert math.isclose(ra[key], rb[key], rel_tol=METRIC_RTOL, abs_tol=atol), \
                f"step {ra['step']} {key}: one process {ra[key]} vs two {rb[key]}"


def resume_on_one_process(work: Path, stage: str, two_dir: Path, step: int, models: tuple[str, ...],
                          config: str | None = None, **env: str) -> Path:
    """Copy the two-process run as it was at checkpoint `step`, finish it on one process, compare."""
    out = work / f"{two_dir.name}-resumed-on-1"
    shutil.copytree(two_dir, out, ignore=shutil.ignore_patterns("final*", "summary.json", "tensorboard"))
    for later, path in list_checkpoints(out / "checkpoints"):
        if later > step:
            shutil.rmtree(path)
    assert [s for s, _ in list_checkpoints(out / "checkpoints")][-1] == step
    _run([sys.executable, "-m", "quartet", stage, "--config", config or f"{stage}.yaml", "--output", out.name, "--resume"],
         work, f"{out.name}.log", **env)
    for name in models:
        assert_weights_close(two_dir / name, out / name)
    assert_metrics_close(two_dir / "metrics.jsonl", out / "metrics.jsonl")
    return out


# --------------------------------------------------------------------------- set-up

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return write_stage_inputs(tmp_path_factory.mktemp("dist"))


def write_stage_inputs(root: Path) -> Path:
    """Data files, stage configs (sft, reward, ppo, grpo) and a tiny actor + reward model in `root`."""
    sft = [{"prompt": f"Q: what comes after {i}?\nA:", "completion": f" {i + 1}."} for i in range(80)]
    prefs = [{"prompt": f"Q: is {i} a number?\nA:", "chosen": " yes.", "rejected": f" no, {i} is a fish."}
             for i in range(80)]
    # 71 training rows in micro-batches of 7: every epoch ends with a one-row micro-batch,
    # so one rank gets an empty share and must still take part in the gradient all-reduce
    for name, rows in (("sft", sft), ("prefs", prefs)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:71]))
        (root / f"{name}-eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[71:]))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in sft))
    train = "{lr: 0.003, max_steps: 12, batch_size: 7, grad_accum: 2, eval_every: 6, log_every: 1, save_every: 6}"
    (root / "sft.yaml").write_text("model: {preset: nano, vocab_size: 300}\n"
                                   "data: {train: sft.jsonl, eval: sft-eval.jsonl, max_length: 32}\n"
                                   f"train: {train}\n")
    (root / "reward.yaml").write_text("model: {preset: nano, vocab_size: 300}\n"
                                      "data: {train: prefs.jsonl, eval: prefs-eval.jsonl, max_length: 32}\n"
                                      f"train: {train}\n")
    # DPO with the reference log-probs precomputed: each rank scores its share of the pairs, the
    # shares are summed; the one-process resume reads the two-process run's stored file
    (root / "dpo.yaml").write_text("model: {path: actor}\n"
                                   "data: {train: prefs.jsonl, eval: prefs-eval.jsonl, max_length: 32}\n"
                                   "dpo: {precompute_ref_logprobs: true}\n"
                                   f"train: {train}\n")
    from quartet.models.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer([r["prompt"] + r["completion"] for r in sft], vocab_size=300)
    save_model(build_preset_model("nano", tokenizer, seed=0), tokenizer, root / "actor")
    save_model(build_preset_model("nano", tokenizer, seed=1, scalar=True), tokenizer, root / "rm")
    (root / "ppo.yaml").write_text(
        "models: {actor: actor, reward: rm, critic_init: actor}\n"
        "data: {train: prompts.jsonl}\n"
        "algorithm: {beta: 0.1, adaptive_kl: true, score_normalization: running}\n"
        "rollout: {max_new_tokens: 8, temperature: 0.9, top_k: 50}\n"
        "batch: {rollout_batch_size: 8, mini_batch_size: 4, ppo_epochs: 2}\n"
        "train: {steps: 4, log_every: 1, save_every: 2, keep_checkpoints: 2, n_samples: 0}\n")
    # GRPO: 4 prompts x 4 samples, so each rank samples two whole groups; advantages are computed on the
    # gathered batch, whose groups came from both ranks
    (root / "grpo.yaml").write_text(
        "models: {actor: actor, reward: rm}\n"
        "data: {train: prompts.jsonl}\n"
        "algorithm: {name: grpo, beta: 0.05}\n"
        "rollout: {max_new_tokens: 8, temperature: 0.9, n: 4}\n"
        "batch: {rollout_batch_size: 16, mini_batch_size: 8}\n"
        "optim: {actor_lr: 1.0e-3}\n"
        "train: {steps: 4, log_every: 1, save_every: 2, keep_checkpoints: 2, n_samples: 0}\n")
    return root


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_supervised_stage_on_two_processes_matches_one_and_resumes_on_one(work, stage):
    one_process(work, stage, "--config", f"{stage}.yaml", "--output", f"{stage}-1proc")
    dump = two_processes(work, stage, "--config", f"{stage}.yaml", "--output", f"{stage}-2proc")
    assert_ranks_identical(dump, "final")
    assert_weights_close(work / f"{stage}-1proc" / "final", work / f"{stage}-2proc" / "final")
    assert_metrics_close(work / f"{stage}-1proc" / "metrics.jsonl", work / f"{stage}-2proc" / "metrics.jsonl")
    one = json.loads((work / f"{stage}-1proc" / "summary.json").read_text())
    two = json.loads((work / f"{stage}-2proc" / "summary.json").read_text())
    assert two["steps"] == one["steps"] == 12
    resume_on_one_process(work, stage, work / f"{stage}-2proc", 6, ("final",))


def test_ppo_on_two_processes_matches_one_and_resumes_on_one(work):
    one_process(work, "ppo", "--config", "ppo.yaml", "--output", "ppo-1proc")
    dump = two_processes(work, "ppo", "--config", "ppo.yaml", "--output", "ppo-2proc")
    for name in ("final", "final_critic"):
        assert_ranks_identical(dump, name)
        assert_weights_close(work / "ppo-1proc" / name, work / "ppo-2proc" / name)
    assert_metrics_close(work / "ppo-1proc" / "metrics.jsonl", work / "ppo-2proc" / "metrics.jsonl")
    one = json.loads((work / "ppo-1proc" / "summary.json").read_text())
    two = json.loads((work / "ppo-2proc" / "summary.json").read_text())
    assert _comparable(one).keys() == _comparable(two).keys()
    assert two["first/score/mean"] == pytest.approx(one["first/score/mean"], rel=METRIC_RTOL)
    resume_on_one_process(work, "ppo", work / "ppo-2proc", 2, ("final", "final_critic"))



def test_ppo_with_a_shared_trunk_on_two_processes_matches_one(work):
    """DDP over an actor-critic whose critic runs on the actor's trunk (parameters shared, reduced once)."""
    args = ("--config", "ppo.yaml", "--models.shared_trunk", "true", "--train.steps", "2")
    one_process(work, "ppo", *args, "--output", "shared-1proc")
    dump = two_processes(work, "ppo", *args, "--output", "shared-2proc")
    for name in ("final", "final_critic"):
        assert_ranks_identical(dump, name)
        assert_weights_close(work / "shared-1proc" / name, work / "shared-2proc" / name)
    assert_metrics_close(work / "shared-1proc" / "metrics.jsonl", work / "shared-2proc" / "metrics.jsonl")
    from safetensors.torch import load_file

    actor, critic = (load_file(work / "shared-2proc" / name / "model.safetensors") for name in ("final", "final_critic"))
    trunk = [k for k in critic if k.startswith("model.")]
    assert trunk and all(torch.equal(actor[k], critic[k]) for k in trunk)  # the critic ran on the actor's trunk


def test_grpo_on_two_processes_matches_one_and_resumes_on_one(work):
    one_process(work, "grpo", "--config", "grpo.yaml", "--output", "grpo-1proc")
    dump = two_processes(work, "grpo", "--config", "grpo.yaml", "--output", "grpo-2proc")
    assert_ranks_identical(dump, "final")
    assert_weights_close(work / "grpo-1proc" / "final", work / "grpo-2proc" / "final")
    assert_metrics_close(work / "grpo-1proc" / "metrics.jsonl", work / "grpo-2proc" / "metrics.jsonl")
    assert "loss/kl" in read_metrics(work / "grpo-2proc" / "metrics.jsonl")[-1]
    resume_on_one_process(work, "grpo", work / "grpo-2proc", 2, ("final",))


def test_groups_that_do_not_split_over_the_processes_stop_before_writing(work):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "quartet", "grpo",
           "--config", "grpo.yaml", "--output", "grpo-odd", "--batch.rollout_batch_size", "12", "--batch.mini_batch_size", "4"]
    done = subprocess.run(cmd, cwd=work, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode != 0
    assert ("error: the prompts per step (batch.rollout_batch_size / rollout.n = 12 / 4) = 3 must be divisible by the "
            "number of processes (2)") in done.stderr
    assert not (work / "grpo-odd").exists()


def test_batch_that_does_not_split_over_the_processes_stops_before_writing(work):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "quartet", "ppo",
           "--config", "ppo.yaml", "--output", "ppo-odd", "--batch.rollout_batch_size", "3", "--batch.mini_batch_size", "3"]
    done = subprocess.run(cmd, cwd=work, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode != 0
    assert "error: batch.rollout_batch_size = 3 must be divisible by the number of processes (2)" in done.stderr
    assert not (work / "ppo-odd").exists()  # stopped before the output directory was created



def test_demo_refuses_to_run_on_several_processes(tmp_path):
    cmd = [sys.executable, "-m", "quartet", "demo", "--output", "demo"]
    done = subprocess.run(cmd, cwd=tmp_path, env={**_env(), "WORLD_SIZE": "2"}, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 2 and "error: quartet demo runs on one process" in done.stderr
    assert not (tmp_path / "demo").exists()


ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


@pytest.mark.parametrize("name, kind", [
    ("multi_cpu", "MULTI_CPU"), ("ddp_gpu", "MULTI_GPU"), ("multinode_ddp", "MULTI_GPU"), ("fsdp", "FSDP"),
    ("zero2", "DEEPSPEED"), ("zero3", "DEEPSPEED"),
])
def test_example_accelerate_configs_load_with_accelerate(name, kind):
    """Accelerate's own loader reads each example (it refuses unknown keys) as the backend it names."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = ACCELERATE_CONFIGS / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type.name == kind
    assert "accelerate launch" in path.read_text() or "torchrun" in path.read_text()  # documented with its command
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
    if name == "multinode_ddp":
        assert config.num_machines == 2


def test_grpo_with_an_environment_on_two_processes_matches_one_and_resumes_on_one(work, fruit):
    """Multi-turn episodes: each rank runs the environments of its groups; the gathered batch, the weights and
    the metrics (turns, environment reward) match one process, and a resume on one process continues it."""
    shutil.copytree(fruit / "sft" / "final", work / "fruit-actor", dirs_exist_ok=True)
    (work / "fruit_prompts.jsonl").write_text(json.dumps({"prompt": "List some fruits:"}) + "\n")
    (work / "agent.yaml").write_text(
        "models: {actor: fruit-actor}\n"
        "data: {train: fruit_prompts.jsonl}\n"
        "algorithm: {name: grpo, beta: 0.05}\n"
        "rollout: {max_new_tokens: 8, temperature: 0.9, n: 4, env: 'agent_envs:AppleRounds', max_turns: 2,\n"
        "          max_observation_tokens: 16}\n"
        "batch: {rollout_batch_size: 16, mini_batch_size: 8}\n"
        "optim: {actor_lr: 1.0e-3}\n"
        "train: {steps: 4, log_every: 1, save_every: 2, keep_checkpoints: 2, n_samples: 0}\n")
    tests_dir = str(Path(__file__).parent)  # agent_envs
    _run([sys.executable, "-m", "quartet", "grpo", "--config", "agent.yaml", "--output", "agent-1proc"], work,
         "agent-1proc.log", PYTHONPATH=tests_dir)
    dump = work / "agent-ranks"
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(RANK_DUMP), "grpo",
          "--config", "agent.yaml", "--output", "agent-2proc"], work, "agent-2proc.log",
         QUARTET_TEST_RANK_DUMP=str(dump), PYTHONPATH=tests_dir)
    assert_ranks_identical(dump, "final")
    assert_weights_close(work / "agent-1proc" / "final", work / "agent-2proc" / "final")
    assert_metrics_close(work / "agent-1proc" / "metrics.jsonl", work / "agent-2proc" / "metrics.jsonl")
    records = read_metrics(work / "agent-2proc" / "metrics.jsonl")
    assert max(r["turns/mean"] for r in records) > 1.0  # some episodes took a second turn
    resume_on_one_process(work, "grpo", work / "agent-2proc", 2, ("final",), config="agent.yaml", PYTHONPATH=tests_dir)
