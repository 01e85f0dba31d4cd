#!/usr/bin/env python3
"""The compiled decode step (`rollout.compile`) against the eager sampler and the floor's loop, over shapes.

Runs benchmarks/sampler.py with `--compiled` at the scaling anchor (4 layers x 256), at 6 x 384 and at
GPT-2 small's trunk (12 x 768), each with 32 and 128 new tokens and 32 and 64 rows, one process per
shape (each pays its own compilation), and prints a markdown table and, last, one JSON line.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.sampler_grid               # the whole grid (~30 min here)
    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.sampler_grid --shapes 4x256 --new-tokens 32 --rows 32

Columns: ms per rollout (medians) of the eager sampler, the compiled one and the floor's loop; the
compiled sampler's tokens per second over the floor's and over the eager sampler's; the projections'
GFLOP/s of the compiled sampler against the same process's 1024^3 product; the compilation's seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SHAPES = {"4x256": (4, 256, 4), "6x384": (6, 384, 6), "12x768": (12, 768, 12)}


def rounds_for(layers: int, width: int, new_tokens: int, rows: int) -> int:
    """Fewer rounds where a rollout takes seconds: about the same minutes per shape."""
    work = layers * width * width * new_tokens * rows / (4 * 256 * 256 * 32 * 32)
    return max(3, min(20, int(20 / work ** 0.5)))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, of " + ", ".join(SHAPES))
    p.add_argument("--new-tokens", default="32,128")
    p.add_argument("--rows", default="32,64")
    p.add_argument("--rounds", type=int, help="rounds per shape (default: fewer for larger shapes)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    results = []
    print("| shape | new tokens | rows | eager ms | compiled ms | floor ms | compiled / floor tok/s | "
          "compiled / eager tok/s | projections GFLOP/s (peak) | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in a.shapes.split(","):
        layers, width, heads = SHAPES[shape]
        for new_tokens in map(int, a.new_tokens.split(",")):
            for rows in map(int, a.rows.split(",")):
                rounds = a.rounds or rounds_for(layers, width, new_tokens, rows)
                cmd = [sys.executable, "-m", "benchmarks.sampler", "--compiled", "--no-forward",
                       "--n-layer", str(layers), "--n-embd", str(width), "--n-head", str(heads),
                       "--batch", str(rows), "--new-tokens", str(new_tokens), "--rounds", str(rounds),
                       "--threads", str(a.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                ms = r["ms_per_rollout_median"]
                results.append({"shape": shape, "new_tokens": new_tokens, "rows": rows, "rounds": rounds, **r})
                print(f"| {shape} | {new_tokens} | {rows} | {ms['quartet']:.0f} | {ms['quartet_compiled']:.0f} | "
                      f"{ms['floor']:.0f} | {ms['floor'] / ms['quartet_compiled']:.2f}x | "
                      f"{ms['quartet'] / ms['quartet_compiled']:.2f}x | "
                      f"{r['projection_gflops']['quartet_compiled']:.0f} ({r['peak_gflops']:.0f}) | "
                      f"{r['compile_s']:.0f} |", flush=True)
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
