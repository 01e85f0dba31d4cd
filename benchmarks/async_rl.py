#!/usr/bin/env python3
"""Asynchronous RL against synchronous: throughput on the step benchmarks' configs, and learning in the arena.

    python -m benchmarks.async_rl throughput            # configs D (GRPO) and A (PPO): sync, k = 0, 1, 2
    python -m benchmarks.async_rl throughput --configs "D (GRPO)" --reward-latency 1   # a slow judge
    python -m benchmarks.async_rl learning              # ground truth at equal generated tokens, k = 0, 1, 2

`throughput` runs `benchmarks/grpo_step.py` (config D) and `benchmarks/ppo_step.py` (config A), each
mode in a process of its own, the modes alternating for `--rounds` rounds so that the machine's drift
falls on all of them alike: synchronous with all `--threads`; k = 0 (the producer and the trainer take
turns, each with all threads); k = 1 and 2 (they overlap: the producer gets half the threads, the
trainer the rest). It prints, per config and mode, the median seconds per step over the rounds' medians,
steps per minute, generated tokens per second of wall-clock time, and the seconds the trainer waited for
its batch, and each mode's speed against the synchronous run of the same round.

`learning` trains GRPO in an arena world (default: arith, exact answers, quick sizes) from the same
SFT start on the same budget of generated tokens with k = 0, 1, 2, for `--seeds` seeds, and prints the
held-out ground truth of each (the arena's judge), its mean over seeds, and the run's seconds.

The last stdout line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MODES = (("sync", None), ("k=0", 0), ("k=1", 1), ("k=2", 2))
CONFIGS = {"D (GRPO)": "benchmarks.grpo_step", "A (PPO)": "benchmarks.ppo_step"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput", help="steps per minute and tokens per second, sync against k = 0, 1, 2")
    t.add_argument("--steps", type=int, default=12, help="steps per run, warm-up included")
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--rounds", type=int, default=2)
    t.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    t.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    t.add_argument("--new-tokens", type=int, default=32)
    t.add_argument("--reward-latency", type=float, default=0.0,
                   help="config D only: seconds its reward function waits per batch (a remote judge's latency)")
    lr = sub.add_parser("learning", help="held-out ground truth at equal generated tokens, k = 0, 1, 2")
    lr.add_argument("--world", default="arith")
    lr.add_argument("--seeds", type=int, default=2)
    lr.add_argument("--ks", default="0,1,2")
    lr.add_argument("--algorithm", default="grpo")
    lr.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    lr.add_argument("--output", help="where the worlds and runs go (default: a temporary directory)")
    return p.parse_args(argv)


def _step_benchmark(module: str, a: argparse.Namespace, k: int | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", module, "--steps", str(a.steps), "--warmup", str(a.warmup), "--threads",
           str(a.threads), "--new-tokens", str(a.new_tokens)]
    if k is not None:
        cmd += ["--max-staleness", str(k)]
    if a.reward_latency:
        cmd += ["--reward-latency", str(a.reward_latency)]
    env = {**os.environ, "QUARTET_PROGRESS": "0", "OMP_NUM_THREADS": str(a.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def throughput(a: argparse.Namespace) -> dict[str, Any]:
    configs = [c.strip() for c in a.configs.split(",")]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    if a.reward_latency and configs != ["D (GRPO)"]:
        raise SystemExit("--reward-latency applies to config D (GRPO) only: --configs 'D (GRPO)'")
    out: dict[str, Any] = {}
    for config in configs:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in MODES}
        for round_ in range(a.rounds):
            for name, k in MODES:
                result = _step_benchmark(CONFIGS[config], a, k)
                runs[name].append(result)
                print(f"{config} round {round_ + 1} {name}: {result['sec_per_step_median']:.3f} s/step", flush=True)
        rows = {}
        for name, _ in MODES:
            step = statistics.median(r["sec_per_step_median"] for r in runs[name])
            tokens = statistics.median(r["e2e_tokens_per_s"] for r in runs[name])
            # the paired ratio: each round's sync run against this mode's run of the same round
            ratios = [s["sec_per_step_median"] / r["sec_per_step_median"] for s, r in zip(runs["sync"], runs[name])]
            waits = [r["rollout_wait_sec_median"] for r in runs[name] if r.get("rollout_wait_sec_median") is not None]
            rows[name] = {"sec_per_step": step, "steps_per_min": 60.0 / step, "tokens_per_s": tokens,
                          "speed_vs_sync": statistics.median(ratios), "speed_vs_sync_all": ratios,
                          "rollout_wait_sec": statistics.median(waits) if waits else None,
                          "phases_sec": runs[name][-1]["phase_sec_median"]}
        out[config] = rows
        latency = f", a reward latency of {a.reward_latency:g} s" if a.reward_latency else ""
        print(f"\n{config}, {a.threads} threads, {a.steps - a.warmup} timed steps x {a.rounds} rounds{latency}")
        print(f"{'mode':6} {'s/step':>8} {'steps/min':>10} {'tokens/s':>9} {'vs sync':>8} {'waited s':>9}")
        for name, row in rows.items():
            wait = "" if row["rollout_wait_sec"] is None else f"{row['rollout_wait_sec']:.3f}"
            print(f"{name:6} {row['sec_per_step']:8.3f} {row['steps_per_min']:10.1f} {row['tokens_per_s']:9.0f} "
                  f"{row['speed_vs_sync']:7.2f}x {wait:>9}")
    return out


def learning(a: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("QUARTET_PROGRESS", "0")
    import torch

    torch.set_num_threads(a.threads)
    from quartet.arena.worlds import QUICK, make_world
    from quartet.stages.rl import run_rl

    ks = [int(k) for k in a.ks.split(",")]
    results: dict[str, list[dict[str, float]]] = {f"k={k}": [] for k in ks}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.output or tmp)
        for seed in range(a.seeds):
            directory = root / a.world / f"seed-{seed}"
            world = make_world(a.world, directory, seed, QUICK)
            budget = int(world.prepare(resume=True)["preference_tokens"])
            start = world.judge(world.sft_dir).ground_truth
            for k in ks:
                cfg = world.rl_config(a.algorithm, directory / f"{a.algorithm}-k{k}", budget)
                cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"max_staleness": k})})
                summary = run_rl(cfg, resume=(directory / f"{a.algorithm}-k{k}").exists(),
                                 reward_fn=world.reward_fn(), metric_fns=world.metric_fns())
                truth = world.judge(directory / f"{a.algorithm}-k{k}" / "final").ground_truth
                results[f"k={k}"].append({"seed": seed, "sft": start, "ground_truth": truth,
                                          "generated_tokens": summary["generated_tokens"], "steps": summary["steps"],
                                          "seconds": summary["seconds"]})
                print(f"seed {seed} k={k}: ground truth {start:.3f} -> {truth:.3f} "
                      f"({summary['generated_tokens']} tokens, {summary['steps']} steps, {summary['seconds']:.0f} s)",
                      flush=True)
    print(f"\n{a.world}, {a.algorithm}, {a.seeds} seeds, {a.threads} threads")
    print(f"{'mode':5} {'ground truth (mean)':>20} {'per seed':>24} {'seconds (mean)':>15}")
    for name, rows in results.items():
        truth = [r["ground_truth"] for r in rows]
        print(f"{name:5} {statistics.mean(truth):20.3f} {' '.join(f'{t:.3f}' for t in truth):>24} "
              f"{statistics.mean(r['seconds'] for r in rows):15.0f}")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parse_args(argv)
    result = {"bench": f"async_rl_{a.what}", **vars(a),
              "results": throughput(a) if a.what == "throughput" else learning(a)}
    print(json.dumps(result, default=float))
    return result


if __name__ == "__main__":
    main()
