#!/usr/bin/env python3
"""Quartet's PPO and GRPO steps beside plain-PyTorch floors (benchmarks/floors/) and TRL, on configs A to E.

For each config the programs run one after another in separate processes, `--repeat` times,
alternating, with the order rotated each round so that no program always runs first (these
machines drift by about 10 % between runs, so only ratios from one invocation mean anything).
TRL runs in its own pinned venvs (PPOTrainer is gone from trl 1.13 on, so PPO and GRPO need two):

    bash benchmarks/trl/setup_trl_ppo_venv.sh /tmp/trlppo                       # once, about 2 minutes
    bash benchmarks/trl/setup_trl_grpo_venv.sh /tmp/trlgrpo                     # once, about 2 minutes
    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.compare                    # prints the table
    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.compare --configs DE --steps 9 --repeat 2

Without a venv its TRL column is left out. The floors clip gradients at 1.0 (`--max-grad-norm
1.0`), as Quartet and TRL do. PPO (benchmarks/ppo_step.py beside bare_ppo_floor.py and
trl_ppo_bench.py): A = 4 PPO epochs, 32 new tokens (the anchor default); B = 1 PPO epoch;
C = 1 PPO epoch, 128 new tokens. GRPO (benchmarks/grpo_step.py beside bare_grpo_floor.py and
trl_grpo_bench.py; 8 prompts x 8 samples, 32 new tokens, beta 0.04): D = 16-token prompts; E =
128-token prompts (a long shared prompt, as a system prompt plus a question). Quartet runs twice
per round on D and E: with prompt sharing (its default) and, as `quartet_per_row`, without.
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
ROOT = HERE.parent  # the repository: every program runs from here, Quartet's steps as modules
FLOORS = HERE / "floors"  # the plain-PyTorch floors: the same arithmetic with nothing else
TRL = HERE / "trl"  # TRL's trainers on the same shapes, each in its own pinned venv
CONFIGS = {"A": ["--ppo-epochs", "4"], "B": ["--ppo-epochs", "1"], "C": ["--ppo-epochs", "1", "--new-tokens", "128"],
           "D": [], "E": ["--prompt-len", "128"]}
GRPO_CONFIGS = "DE"


def run_json(cmd: list[str], cwd: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "QUARTET_PROGRESS": "0"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def commands(config: str, steps: int, trl_python: Path | None) -> dict[str, tuple[list[str], Path]]:
    """The programs of one config's round: name -> (command line, working directory)."""
    if config in GRPO_CONFIGS:
        return grpo_commands(config, steps, trl_python)
    flags = CONFIGS[config]
    anchor_flags = [f.replace("--new-tokens", "--response-len") for f in flags]
    out = {
        "quartet": ([sys.executable, "-m", "benchmarks.ppo_step", "--steps", str(steps), *flags], ROOT),
        # Quartet clips both models' gradients at 1.0 (optim.max_grad_norm), as TRL does: so does the floor
        "floor": ([sys.executable, str(FLOORS / "bare_ppo_floor.py"), "--steps", str(steps), "--quiet", "--max-grad-norm", "1.0",
                   *anchor_flags], ROOT),
    }
    if trl_python is not None:
        out["trl"] = ([str(trl_python), str(TRL / "trl_ppo_bench.py"), "--steps", str(steps), "--quiet", *anchor_flags], ROOT)
    return out


def grpo_commands(config: str, steps: int, trl_python: Path | None) -> dict[str, tuple[list[str], Path]]:
    """GRPO rounds: Quartet with and without prompt sharing, the floor clipping as Quartet and TRL do, TRL."""
    flags = CONFIGS[config]
    prompt_len = flags[flags.index("--prompt-len") + 1] if "--prompt-len" in flags else "16"
    quartet = [sys.executable, "-m", "benchmarks.grpo_step", "--steps", str(steps), *flags]
    out = {
        "quartet": ([*quartet, "--share-prompts", "on"], ROOT),
        "quartet_per_row": ([*quartet, "--share-prompts", "off"], ROOT),
        "floor": ([sys.executable, str(FLOORS / "bare_grpo_floor.py"), "--steps", str(steps), "--quiet", "--max-grad-norm", "1.0",
                   "--prompt-len", prompt_len], ROOT),
    }
    if trl_python is not None:  # TRL draws prompt lengths from a range: pin it to the floor's one length
        out["trl"] = ([str(trl_python), str(TRL / "trl_grpo_bench.py"), "--steps", str(steps), "--quiet",
                       "--prompt-min", "8" if prompt_len == "16" else prompt_len, "--prompt-max", prompt_len], ROOT)
    return out


def rotated(programs: list, round_index: int) -> list:
    """The round's running order: the list rotated left by the round's index, so that each program takes
    every place in turn (a program's place in a round can bias its timing)."""
    k = round_index % len(programs) if programs else 0
    return programs[k:] + programs[:k]


def venv_python(venv: str, setup: str) -> Path | None:
    """The venv's python, or None (with a note on how to create it): its TRL column is left out."""
    python = Path(venv) / "bin" / "python"
    if python.exists():
        return python
    print(f"(no TRL venv at {venv}: TRL column left out; create it with `bash {setup} {venv}`)", file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="ABCDE")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--trl-venv", default=os.environ.get("TRL_VENV", "/tmp/trlppo"), help="TRL 1.12's venv (PPO: A-C)")
    p.add_argument("--trl-grpo-venv", default=os.environ.get("TRL_GRPO_VENV", "/tmp/trlgrpo"),
                   help="TRL 1.16's venv (GRPO: D, E)")
    a = p.parse_args(argv)
    unknown = sorted(set(a.configs) - set(CONFIGS))
    if unknown:
        p.error(f"unknown config(s) {', '.join(unknown)}; choose from {''.join(CONFIGS)}")
    trl_ppo = venv_python(a.trl_venv, "benchmarks/trl/setup_trl_ppo_venv.sh") if set(a.configs) - set(GRPO_CONFIGS) else None
    trl_grpo = (venv_python(a.trl_grpo_venv, "benchmarks/trl/setup_trl_grpo_venv.sh")
                if set(a.configs) & set(GRPO_CONFIGS) else None)
    rows = []
    for config in a.configs:
        load_before = os.getloadavg()  # other work on a 2-core machine distorts the timings: recorded with them
        results: dict[str, list[dict]] = {}
        trl_python = trl_grpo if config in GRPO_CONFIGS else trl_ppo
        orders = []
        for round_index in range(a.repeat):
            programs = rotated(list(commands(config, a.steps, trl_python).items()), round_index)
            orders.append([name for name, _ in programs])
            for name, (cmd, cwd) in programs:
                print(f"[{config}] {name} ...", file=sys.stderr, end=" ", flush=True)
                results.setdefault(name, []).append(run_json(cmd, cwd))
                print(f"{results[name][-1]['sec_per_step_median']:.3f} s/step", file=sys.stderr, flush=True)
        med = {name: statistics.median(r["sec_per_step_median"] for r in rs) for name, rs in results.items()}
        rss = {name: max(r["peak_rss_mib"] for r in rs) for name, rs in results.items()}
        q = results["quartet"][-1]
        runs = {name: [round(r["sec_per_step_median"], 4) for r in rs] for name, rs in results.items()}
        rows.append({"config": config, "sec_per_step": med, "peak_rss_mib": rss, "sec_per_step_runs": runs,
                     "order_per_round": orders,
                     # each round ran the programs back to back: its ratio shows the machine's drift
                     "quartet_over_floor_per_round": [round(q / f, 3) for q, f in zip(runs["quartet"], runs["floor"])],
                     **({"quartet_per_row_over_floor_per_round": [round(q / f, 3) for q, f in
                                                                  zip(runs["quartet_per_row"], runs["floor"])]}
                        if "quartet_per_row" in runs else {}),
                     "quartet_over_floor": med["quartet"] / med["floor"],
                     "quartet_over_trl": med["quartet"] / med["trl"] if "trl" in med else None,
                     # GRPO: each prompt computed per row, as the floor and TRL do
                     "quartet_per_row_over_floor": (med["quartet_per_row"] / med["floor"]
                                                    if "quartet_per_row" in med else None),
                     "rss_quartet_over_floor": rss["quartet"] / rss["floor"],
                     "load_avg_1_5_15_before_after": [[round(x, 2) for x in load_before],
                                                      [round(x, 2) for x in os.getloadavg()]],
                     "phases": {name: rs[-1].get("phase_sec_median") or rs[-1].get("phase_sec_per_step_mean")
                                for name, rs in results.items()},
                     "quartet_phases": q["phase_sec_median"], "quartet_gen_tokens_per_s": q["gen_tokens_per_s"],
                     "quartet_achieved_gflops": q["achieved_gflops"], "machine_matmul_gflops": q["machine_matmul_gflops"]})
    print(markdown_table(rows))
    print(json.dumps(rows))


def markdown_table(rows: list[dict]) -> str:
    """The table of docs/performance.md: s/step, ratios and peak RSS per config; '-' where a program did not run."""
    def num(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["| config | Quartet s/step | per row s/step | floor s/step | TRL s/step | Quartet/floor | per row/floor "
             "| Quartet/TRL | RSS MiB Quartet / floor / TRL |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, m = r["sec_per_step"], r["peak_rss_mib"]
        lines.append(f"| {r['config']} | {num(s['quartet'])} | {num(s.get('quartet_per_row'))} | {num(s['floor'])} | "
                     f"{num(s.get('trl'))} | {num(r['quartet_over_floor'])} | {num(r['quartet_per_row_over_floor'])} | "
                     f"{num(r['quartet_over_trl'])} | {num(m['quartet'], 0)} / {num(m['floor'], 0)} / "
                     f"{num(m.get('trl'), 0)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
