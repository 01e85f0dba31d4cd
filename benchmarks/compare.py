#!/usr/bin/env python3
"""Quartet's PPO step beside the anchors in ../shared/bench-anchors, on configs A, B and C.

For each config the three programs run one after another in separate processes, `--repeat`
times, alternating (these machines drift by about 10 % between runs, so only ratios from one
invocation mean anything). TRL runs in its own pinned venv:

    bash benchmarks/setup_trl_venv.sh /tmp/trlppo     # once, about 2 minutes
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/compare.py        # prints the table (about 15 min)

Without that venv the TRL column is left out. Configs: A = 4 PPO epochs, 32 new tokens (the
anchor default); B = 1 PPO epoch; C = 1 PPO epoch, 128 new tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = {"A": ["--ppo-epochs", "4"], "B": ["--ppo-epochs", "1"], "C": ["--ppo-epochs", "1", "--new-tokens", "128"]}


def anchors_dir() -> Path:
    env = os.environ.get("QUARTET_SHARED")
    return (Path(env) if env else HERE.parents[1] / "shared") / "bench-anchors"


def run_json(cmd: list[str], cwd: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "QUARTET_PROGRESS": "0"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def commands(config: str, steps: int, trl_python: Path | None) -> dict[str, tuple[list[str], Path]]:
    flags = CONFIGS[config]
    anchor_flags = [f.replace("--new-tokens", "--response-len") for f in flags]
    out = {
        "quartet": ([sys.executable, str(HERE / "ppo_step.py"), "--steps", str(steps), *flags], HERE.parent),
        "floor": ([sys.executable, "bare_ppo_floor.py", "--steps", str(steps), "--quiet", *anchor_flags], anchors_dir()),
    }
    if trl_python is not None:
        out["trl"] = ([str(trl_python), "trl_ppo_bench.py", "--steps", str(steps), "--quiet", *anchor_flags], anchors_dir())
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="ABC")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--trl-venv", default=os.environ.get("TRL_VENV", "/tmp/trlppo"))
    a = p.parse_args(argv)
    trl_python = Path(a.trl_venv) / "bin" / "python"
    trl_python = trl_python if trl_python.exists() else None
    if trl_python is None:
        print(f"(no TRL venv at {a.trl_venv}: TRL column left out; create it with "
              f"`bash benchmarks/setup_trl_venv.sh {a.trl_venv}`)", file=sys.stderr)
    rows = []
    for config in a.configs:
        results: dict[str, list[dict]] = {}
        for _ in range(a.repeat):
            for name, (cmd, cwd) in commands(config, a.steps, trl_python).items():
                print(f"[{config}] {name} ...", file=sys.stderr, end=" ", flush=True)
                results.setdefault(name, []).append(run_json(cmd, cwd))
                print(f"{results[name][-1]['sec_per_step_median']:.3f} s/step", file=sys.stderr, flush=True)
        med = {name: statistics.median(r["sec_per_step_median"] for r in rs) for name, rs in results.items()}
        rss = {name: max(r["peak_rss_mib"] for r in rs) for name, rs in results.items()}
        q = results["quartet"][-1]
        runs = {name: [round(r["sec_per_step_median"], 4) for r in rs] for name, rs in results.items()}
        rows.append({"config": config, "sec_per_step": med, "peak_rss_mib": rss, "sec_per_step_runs": runs,
                     # each round ran the programs back to back: its ratio shows the machine's drift
                     "quartet_over_floor_per_round": [round(q / f, 3) for q, f in zip(runs["quartet"], runs["floor"])],
                     "quartet_over_floor": med["quartet"] / med["floor"],
                     "quartet_over_trl": med["quartet"] / med["trl"] if "trl" in med else None,
                     "rss_quartet_over_floor": rss["quartet"] / rss["floor"],
                     "quartet_phases": q["phase_sec_median"], "quartet_gen_tokens_per_s": q["gen_tokens_per_s"],
                     "quartet_achieved_gflops": q["achieved_gflops"], "machine_matmul_gflops": q["machine_matmul_gflops"]})
    print("| config | Quartet s/step | floor s/step | TRL s/step | Quartet/floor | Quartet/TRL | RSS MiB Quartet / floor / TRL |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        s, m = r["sec_per_step"], r["peak_rss_mib"]
        trl = f"{s['trl']:.2f}" if "trl" in s else "-"
        vs_trl = f"{r['quartet_over_trl']:.2f}" if r["quartet_over_trl"] else "-"
        print(f"| {r['config']} | {s['quartet']:.2f} | {s['floor']:.2f} | {trl} | {r['quartet_over_floor']:.2f} | {vs_trl} | "
              f"{m['quartet']:.0f} / {m['floor']:.0f} / {m.get('trl', float('nan')):.0f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
