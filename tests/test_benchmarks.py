"""The PPO benchmark runs Quartet's real PPO stage and reports consistent numbers (tiny shapes here)."""

import importlib
import importlib.util
import json
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
BENCH = BENCHMARKS / "ppo_step.py"


def load_benchmark(path: Path):
    """A benchmark as the module `python -m benchmarks.NAME` runs (benchmarks/ is a package)."""
    return importlib.import_module(f"benchmarks.{path.stem}")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark(BENCH)


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


def test_benchmarks_take_nothing_from_outside_the_repository():
    """A clone runs every benchmark: no sys.path edits, no folder beside the repository."""
    beside_the_repository = str(Path("..") / "shared")  # where the reference programs once lived
    for path in BENCHMARKS.rglob("*"):
        if path.suffix in (".py", ".sh", ".md"):
            text = path.read_text()
            assert "sys.path" not in text and beside_the_repository not in text and "QUARTET_SHARED" not in text, path


def test_every_program_compare_and_scaling_run_is_in_the_repository():
    compare = load_benchmark(BENCHMARKS / "compare.py")
    scaling = load_benchmark(BENCHMARKS / "scaling.py")
    trl_python = Path("/nonexistent/bin/python")  # only the command lines are built, nothing runs
    rounds = [compare.commands(config, 2, trl_python) for config in compare.CONFIGS]
    rounds.append(scaling.programs(scaling.grid()[0], "ppo,grpo"))
    programs = [cmd for round_ in rounds for cmd, cwd in round_.values()]
    assert len(programs) >= 20
    for cmd in programs:
        if cmd[1] == "-m":  # Quartet's steps, run as modules from the repository root
            assert importlib.util.find_spec(cmd[2]) is not None, cmd
        else:  # the floors and TRL's scripts, by path inside benchmarks/
            assert Path(cmd[1]).is_file() and BENCHMARKS in Path(cmd[1]).parents, cmd
    setups = re.findall(r"benchmarks/trl/\S+\.sh", (BENCHMARKS / "compare.py").read_text())
    assert setups and all((BENCHMARKS.parent / s).is_file() for s in setups)


GRPO_BENCH = BENCH.parent / "grpo_step.py"


@pytest.fixture(scope="module")
def grpo_bench():
    return load_benchmark(GRPO_BENCH)


@pytest.mark.parametrize("share", ["on", "off"])
def test_grpo_benchmark_runs_quartets_grpo_on_the_anchor_arithmetic(grpo_bench, tmp_path, share):
    result = grpo_bench.main(["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--vocab", "64", "--prompts-per-step", "2",
                              "--num-generations", "4", "--micro-batch", "4", "--new-tokens", "5", "--prompt-len", "3",
                              "--steps", "3", "--share-prompts", share, "--workdir", str(tmp_path)])
    assert len(result["sec_per_step_all"]) == 2 and result["response_length"] == [5.0, 5.0]
    assert result["peak_rss_mib"] > 0 and result["model_gflop_per_step"] > 0
    from quartet.runs.metrics import read_metrics

    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all("loss/kl" in r and "kl/ref" in r for r in records)  # beta 0.04: the reference ran
    import yaml

    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["algorithm"]["loss_aggregation"] == "token-mean" and cfg["algorithm"]["kl_estimator"] == "k3"
    assert cfg["batch"]["grad_accum"] == 2 and cfg["batch"]["share_prompts"] is (share == "on")
    assert cfg["optim"]["max_grad_norm"] == 1.0 and cfg["optim"]["actor_lr"] == 1e-6


def test_grpo_benchmark_reward_is_the_anchors_rule_on_token_ids(grpo_bench):
    tokenizer = grpo_bench.word_tokenizer(64)
    ids = [[3, 40, 35, 34, 2], [60, 61, 62, 63, 0]]  # w0, w37, w32, w31, <unk>; four high words and a <pad>
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    expected = [sum(t < 32 for t in row) / 5 for row in ids]  # bare_grpo_floor.py's (resp < vocab // 2).mean()
    assert grpo_bench.low_half_reward([""] * 2, texts, vocab=64, new_tokens=5) == expected


def test_grpo_flops_count_a_shared_prompt_once_per_group(grpo_bench):
    a = grpo_bench.parse_args(["--n-layer", "0", "--vocab", "1", "--n-embd", "1"])  # dense layers only, no attention
    shared, per_row = (grpo_bench.model_flops_per_step(a, 1000, shared) for shared in (True, False))
    g, n, p = a.prompts_per_step, a.num_generations, a.prompt_len
    assert per_row["update"] - shared["update"] == pytest.approx(3 * (g * n - g) * p * 2 * 1000)
    assert per_row["generation"] == shared["generation"]  # sampling prefills each prompt once either way


PROFILE_BENCH = BENCH.parent / "update_profile.py"


@pytest.fixture(scope="module")
def update_profile():
    return load_benchmark(PROFILE_BENCH)


def test_update_profile_sorts_operators_into_the_steps_parts(update_profile):
    part = update_profile.part_of
    assert part("aten::mm", [[496, 256], [256, 4096]], 4096) == "LM head"
    assert part("aten::addmm", [[1024], [496, 256], [256, 1024], [], []], 4096) == "body matrix products"
    assert part("aten::_scaled_dot_product_flash_attention_for_cpu", [[16, 4, 31, 64]], 4096) == "attention"
    assert part("aten::_log_softmax", [[16, 31, 4096], [], []], 4096) == "vocabulary-wide element-wise"
    assert part("aten::native_layer_norm", [[16, 31, 256], [], [256], [256], []], 4096) == "other"


def test_update_profile_reports_both_paths_and_sharing_saves_body_work(update_profile):
    result = update_profile.main(["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--vocab", "64", "--groups", "2",
                                  "--num-generations", "4", "--prompt-len", "12", "--new-tokens", "4", "--repeat", "2",
                                  "--profiled", "2"])
    ops = result["operator_ms"]
    for name in ("shared", "per_row"):
        assert set(ops[name]) == set(update_profile.PARTS) and ops[name]["LM head"] > 0
        assert result["operator_ms_total"][name] == pytest.approx(sum(ops[name].values()))
        assert result["wall_ms_median"][name] > 0
    # dense layers cost the same per position: sharing runs 2 prompts of 12 and 8 x 3 response positions
    # (the last one is never fed), per row 8 x (12 + 3); the LM head runs on response positions, and with
    # sharing the first token's logits come once per prompt: 2 + 8 x 3 against 8 x 4
    flop = result["matmul_gflop"]
    assert flop["shared"]["body matrix products"] / flop["per_row"]["body matrix products"] == pytest.approx(
        (2 * 12 + 8 * 3) / (8 * 15), rel=0.02)
    assert flop["shared"]["LM head"] / flop["per_row"]["LM head"] == pytest.approx((2 + 8 * 3) / (8 * 4), rel=0.02)


@pytest.mark.parametrize("repeat, rounds", [(3, 1), (1, 3)], ids=["repeat", "point-rounds"])
def test_scaling_merges_rounds_into_medians_and_keeps_each_rounds_ratio(monkeypatch, repeat, rounds):
    scaling = load_benchmark(BENCH.parent / "scaling.py")
    steps = {True: iter([1.0, 1.2, 1.4]), False: iter([2.0, 1.8, 1.6])}  # ppo/quartet's, ppo/floor's rounds
    order = []

    def fake_run(cmd, cwd):
        quartet = "benchmarks.ppo_step" in " ".join(map(str, cmd))
        order.append(quartet)
        sec = next(steps[quartet])
        phase = ({"phase_sec_median": {"generation": sec / 2, "scoring": 0.0, "update": sec / 2}} if quartet else
                 {"phase_sec_per_step_mean": {"generate": sec / 2, "train_fwd": sec / 4, "backward": sec / 4}})
        return {"sec_per_step_median": sec, "peak_rss_mib": 100 * sec, **phase}

    monkeypatch.setattr(scaling, "run_json", fake_run)
    saved = []
    rows = scaling.run([scaling.Point("anchor", 0, rounds=rounds)], "ppo", saved.append, repeat=repeat)
    row = rows[0]
    assert row["results"]["ppo/quartet"]["sec_per_step_median"] == 1.2  # median of 1.0, 1.2, 1.4
    assert row["results"]["ppo/floor"]["sec_per_step_median"] == 1.8
    assert row["results"]["ppo/floor"]["peak_rss_mib"] == 200  # the largest round's
    assert scaling.phases(row["results"]["ppo/floor"]) == {"generation": 0.9, "scoring": 0.0, "update": 0.9}
    assert [round(r["ppo"], 4) for r in row["ratios_per_round"]] == [0.5, round(1.2 / 1.8, 4), round(1.4 / 1.6, 4)]
    assert "| 1.20 (0.60 / 0.00 / 0.60) | 1.80 (0.90 / 0.00 / 0.90) | 0.67 (0.50, 0.67, 0.87) | 140 / 200 |" in (
        scaling.markdown_table(rows))  # medians, then each round's ratio
    assert saved and saved[-1] is rows
    assert order == [True, False, False, True, True, False]  # the order rotates round by round


def test_compare_rotates_the_order_and_pairs_each_rounds_programs(monkeypatch, capsys, tmp_path):
    compare = load_benchmark(BENCH.parent / "compare.py")
    calls = []

    def fake_run(cmd, cwd):
        line = " ".join(map(str, cmd))
        name = ("floor" if "floor" in line else "quartet_per_row" if "off" in line else "quartet")
        calls.append(name)
        round_ = sum(c == name for c in calls)  # 1, 2, 3: each program's round
        sec = {"quartet": 1.0, "quartet_per_row": 1.5, "floor": 2.0}[name] * round_
        return {"sec_per_step_median": sec, "peak_rss_mib": 100.0, "phase_sec_median": {}, "gen_tokens_per_s": 1.0,
                "achieved_gflops": 1.0, "machine_matmul_gflops": 1.0}

    monkeypatch.setattr(compare, "run_json", fake_run)
    compare.main(["--configs", "D", "--repeat", "3", "--steps", "2", "--trl-grpo-venv", str(tmp_path / "none")])
    first_round = ["quartet", "quartet_per_row", "floor"]
    assert calls == first_round + first_round[1:] + first_round[:1] + first_round[2:] + first_round[:2]
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]
    assert row["order_per_round"] == [calls[0:3], calls[3:6], calls[6:9]]
    # rounds are paired by program, not by place in the order: 1/2 in every round
    assert row["quartet_over_floor_per_round"] == [0.5, 0.5, 0.5]
    assert row["quartet_per_row_over_floor_per_round"] == [0.75, 0.75, 0.75]
    assert row["sec_per_step"] == {"quartet": 2.0, "quartet_per_row": 3.0, "floor": 4.0}


def test_sampler_benchmark_times_quartets_two_paths_on_the_same_rollouts(capsys):
    sampler = load_benchmark(BENCH.parent / "sampler.py")
    result = sampler.main(["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--vocab", "64", "--batch", "6",
                           "--group", "3", "--prompt-len", "3", "--new-tokens", "4", "--rounds", "2", "--no-floor"])
    assert set(result["ms_per_rollout_median"]) == {"quartet", "quartet_forward"} and "over_floor" not in result
    assert all(result["ms_per_rollout_min"][n] <= result["ms_per_rollout_median"][n] for n in ("quartet",
                                                                                             "quartet_forward"))
    assert result["lean_over_forward"] == pytest.approx(
        result["ms_per_rollout_median"]["quartet"] / result["ms_per_rollout_median"]["quartet_forward"])
    with pytest.raises(SystemExit, match="not a multiple"):
        sampler.main(["--batch", "6", "--group", "4", "--no-floor"])


def test_the_sampler_benchmark_times_the_compiled_decode_step_beside_the_eager_one():
    sampler = load_benchmark(BENCH.parent / "sampler.py")
    result = sampler.main(["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--vocab", "64", "--batch", "4",
                           "--prompt-len", "3", "--new-tokens", "4", "--rounds", "2", "--no-floor", "--no-forward",
                           "--compiled", "--threads", "1"])
    medians = result["ms_per_rollout_median"]
    assert set(medians) == {"quartet", "quartet_compiled"} and result["compile_s"] > 0
    assert result["compiled_over_eager"] == medians["quartet_compiled"] / medians["quartet"]
    assert result["tokens_per_s"]["quartet"] == pytest.approx(4 * 4 / (medians["quartet"] / 1e3))
    assert 0 < result["projection_gflops"]["quartet_compiled"] and result["peak_gflops"] > 0


def test_the_episodes_benchmark_times_equal_model_tokens_three_ways():
    from benchmarks import episodes

    result = episodes.main(["--rounds", "2", "--batch", "4", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
                            "--vocab", "64", "--turns", "2", "--turn-tokens", "3", "--observation-tokens", "2",
                            "--threads", "1"])
    assert result["model_tokens"] == 4 * 2 * 3  # every loop sampled every model token (it exits otherwise)
    assert result["observation_tokens_per_episode"] >= 2
    for name in ("episodes", "one_turn", "one_turn_observations_in_prompt"):
        assert 0 < result[name]["min_ms"] <= result[name]["median_ms"]
    assert result["episodes/one_turn"] == result["episodes"]["median_ms"] / result["one_turn"]["median_ms"]


def test_the_grpo_benchmark_runs_asynchronously_with_a_reward_latency(grpo_bench, tmp_path):
    result = grpo_bench.main(["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--vocab", "64", "--prompts-per-step", "2",
                              "--num-generations", "4", "--micro-batch", "4", "--new-tokens", "5", "--prompt-len", "3",
                              "--steps", "3", "--max-staleness", "1", "--reward-latency", "0.05",
                              "--workdir", str(tmp_path)])
    from quartet.runs.metrics import read_metrics

    assert [r["offpolicy/staleness"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [0, 1, 1]
    assert result["max_staleness"] == 1 and result["rollout_wait_sec_median"] >= 0
    assert result["config"]["reward_latency"] == 0.05


def test_the_async_benchmark_pairs_each_round_with_its_synchronous_run(monkeypatch):
    async_rl = load_benchmark(BENCHMARKS / "async_rl.py")
    calls = []

    def fake_step_benchmark(module, a, k):
        calls.append((module, k))
        round_ = sum(c == (module, k) for c in calls)  # 1, 2, 3: the mode's round
        sec = {None: 2.0, 0: 2.2, 1: 1.6, 2: 1.5}[k] * round_
        return {"sec_per_step_median": sec, "e2e_tokens_per_s": 100 / sec, "phase_sec_median": {},
                "rollout_wait_sec_median": None if k is None else 0.1 * round_}

    monkeypatch.setattr(async_rl, "_step_benchmark", fake_step_benchmark)
    rows = async_rl.main(["throughput", "--configs", "D (GRPO)", "--rounds", "3"])["results"]["D (GRPO)"]
    assert calls == [("benchmarks.grpo_step", k) for _ in range(3) for k in (None, 0, 1, 2)]  # modes alternate
    assert rows["sync"]["sec_per_step"] == 4.0 and rows["k=1"]["sec_per_step"] == pytest.approx(3.2)  # medians
    assert rows["k=1"]["speed_vs_sync_all"] == pytest.approx([1.25, 1.25, 1.25])  # each round against its own
    assert rows["k=1"]["rollout_wait_sec"] == pytest.approx(0.2) and rows["sync"]["rollout_wait_sec"] is None
    with pytest.raises(SystemExit, match="config D"):
        async_rl.main(["throughput", "--configs", "A (PPO)", "--reward-latency", "1"])
