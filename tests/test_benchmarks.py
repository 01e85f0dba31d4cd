"""The PPO benchmark runs Quartet's real PPO stage and reports consistent numbers (tiny shapes here)."""

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "ppo_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ppo_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_reports_every_number_for_a_real_ppo_run(bench, tmp_path, capsys):
    result = bench.main(["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--vocab", "64", "--batch", "4",
                         "--mini-batch", "2", "--ppo-epochs", "1", "--new-tokens", "5", "--prompt-len", "3",
                         "--steps", "3", "--workdir", str(tmp_path)])
    assert len(result["sec_per_step_all"]) == 2  # the warm-up step is left out
    phases = result["phase_sec_median"]
    assert 0 < phases["generation"] + phases["scoring"] + phases["update"] <= result["sec_per_step_median"] * 1.5
    assert result["gen_tokens_per_s"] > 0 and result["peak_rss_mib"] > 0 and result["machine_matmul_gflops"] > 0
    assert result["model_gflop_per_step"] == pytest.approx(sum(result["model_gflop_per_step_by_phase"].values()))
    from quartet.runs.metrics import read_metrics

    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(r["response/length"] == 5 for r in records)  # exactly --new-tokens, no early stop


def test_flops_scale_with_the_work(bench):
    a = bench.parse_args([])
    base = bench.model_flops_per_step(a, params_no_embed=1000)
    more_epochs = bench.model_flops_per_step(bench.parse_args(["--ppo-epochs", "8"]), params_no_embed=1000)
    assert more_epochs["update"] == pytest.approx(2 * base["update"])
    assert more_epochs["generation"] == base["generation"]
    # a dense layer's forward costs 2 FLOPs per parameter per token
    no_attention = bench.parse_args(["--n-layer", "0", "--vocab", "1", "--n-embd", "1"])
    flops = bench.model_flops_per_step(no_attention, params_no_embed=1000)
    tokens = no_attention.batch * (no_attention.prompt_len + no_attention.new_tokens)
    assert flops["scoring"] == pytest.approx(3 * 2 * 1000 * tokens + no_attention.batch * no_attention.new_tokens * 2)


def test_trl_venv_script_refuses_a_missing_anchor_folder(tmp_path):
    import os
    import subprocess

    script = BENCH.parent / "setup_trl_venv.sh"
    done = subprocess.run(["bash", str(script), str(tmp_path / "venv")], capture_output=True, text=True,
                          env={**os.environ, "QUARTET_SHARED": str(tmp_path / "nowhere")})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: no TRL anchor at {tmp_path / 'nowhere' / 'bench-anchors'} "
        "(set QUARTET_SHARED to the folder holding bench-anchors/)"]
    assert not (tmp_path / "venv").exists()  # nothing created
