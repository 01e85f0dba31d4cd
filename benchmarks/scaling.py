#!/usr/bin/env python3
"""How the cost of Quartet's PPO and GRPO steps grows with the work, beside the plain-PyTorch floors.

Three axes, each varied alone from the anchor (GPT-2 architecture, 4 layers, width 256, 16-token
prompts, 32-token answers): the model (up to 12 layers of width 768, a GPT-2-small-sized trunk of
85 M non-embedding parameters), the answer length (32 -> 512) and the prompt length (16 -> 512).
At each point, in separate processes and back to back:

- PPO: benchmarks/ppo_step.py with 1 PPO epoch (config B's shape: 32 rollouts, mini-batch 8)
  beside bare_ppo_floor.py --ppo-epochs 1 --max-grad-norm 1.0 (Quartet clips; so does the floor);
- GRPO: benchmarks/grpo_step.py (config D's shape: 8 prompts x 8 samples) without prompt sharing
  (`per row`, the floor's arithmetic) and with it (Quartet's default), beside
  bare_grpo_floor.py --max-grad-norm 1.0.

Every program builds its models with a context of 1024 positions (GPT-2's; the longest point
needs 528), so the anchor point differs from compare.py's configs B and D by the position table
only. Slow points run fewer steps (one warm-up step is always left out of the median). It writes
a JSON file (every program's full result), docs/scaling.png (s/step, and Quartet/floor, against
the size on each axis) and prints a markdown table of s/step, ratios, peak RSS and where the time
goes (generation, scoring, update) at each size. With `--repeat` R every point runs R rounds,
alternating its programs (the small points, where one step takes a second or less, two or three
times as many); the table shows the medians and each round's ratio.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.scaling --repeat 2       # about 38 min (2026-12-01)
    .venv/bin/python -m benchmarks.scaling --axes prompt --algos grpo         # one axis, one algorithm
    .venv/bin/python -m benchmarks.scaling --plot-only docs/scaling.json      # table and plot again

Only ratios from one invocation mean anything (these machines drift by 10 % or more). On a
shared machine, one thread per program gives steadier ratios than two: a 2-thread process whose
cores are busy with other work stalls in its thread barriers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.compare import FLOORS, ROOT, rotated, run_json

N_CTX = 1024


@dataclass(frozen=True)
class Point:
    axis: str  # anchor (on every axis), model, answer or prompt
    size: float  # the axis' value: non-embedding parameters (M), answer tokens or prompt tokens
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    prompt_len: int = 16
    new_tokens: int = 32
    steps: int = 4  # warm-up included
    rounds: int = 1  # rounds per --repeat: more where a step is short and one round's noise exceeds the gaps

    @property
    def label(self) -> str:
        return {"anchor": "anchor", "model": f"{self.n_layer}x{self.n_embd}", "answer": f"{self.new_tokens} new",
                "prompt": f"{self.prompt_len} prompt"}[self.axis]


def on_axis(point: dict, axis: str) -> float | None:
    """Where a measured point sits on `axis` (the anchor is on every axis), or None if it is not on it."""
    if point["axis"] not in (axis, "anchor"):
        return None
    return {"model": non_embedding_params(point["n_layer"], point["n_embd"]), "answer": point["new_tokens"],
            "prompt": point["prompt_len"]}[axis]


def non_embedding_params(n_layer: int, n_embd: int) -> float:
    """GPT-2 trunk parameters without the token and position tables, in millions (ln_f included)."""
    per_layer = 12 * n_embd**2 + 13 * n_embd  # qkv, proj, fc, fc2 with biases, two layer norms
    return (n_layer * per_layer + 2 * n_embd) / 1e6


def grid() -> list[Point]:
    """The anchor, then each axis alone; step counts sized so one round of the whole grid takes about 15
    minutes at two threads (2026-12-01; the largest points: one warm-up and one measured step). The
    small points, whose steps take a second or less, run two or three times the rounds: there single
    rounds of one program differ by 10 % (0.89x to 1.12x for one point's ratio), more than the gaps
    measured."""
    points = [Point("anchor", 0, steps=5, rounds=3)]  # measured once, on every axis
    model = [(6, 384, 6, 4, 2), (8, 512, 8, 3, 1), (12, 768, 12, 2, 1)]
    points += [Point("model", round(non_embedding_params(l, d), 1), l, d, h, steps=s, rounds=k)
               for l, d, h, s, k in model]
    points += [Point("answer", r, new_tokens=r, steps=s, rounds=k) for r, s, k in ((128, 3, 2), (512, 2, 1))]
    points += [Point("prompt", p, prompt_len=p, steps=s, rounds=k) for p, s, k in ((128, 3, 2), (512, 2, 1))]
    return points


def programs(point: Point, algos: str) -> dict[str, tuple[list[str], Path]]:
    """The programs of one point, Quartet next to its floor: name -> (command line, working directory)."""
    model = ["--n-layer", str(point.n_layer), "--n-embd", str(point.n_embd), "--n-head", str(point.n_head),
             "--n-ctx", str(N_CTX), "--prompt-len", str(point.prompt_len), "--steps", str(point.steps)]
    quartet = [*model, "--new-tokens", str(point.new_tokens)]
    floor = [*model, "--response-len", str(point.new_tokens), "--quiet", "--max-grad-norm", "1.0"]
    py = sys.executable
    out: dict[str, tuple[list[str], Path]] = {}
    if "ppo" in algos:
        out["ppo/quartet"] = ([py, "-m", "benchmarks.ppo_step", *quartet, "--ppo-epochs", "1"], ROOT)
        out["ppo/floor"] = ([py, str(FLOORS / "bare_ppo_floor.py"), *floor, "--ppo-epochs", "1"], ROOT)
    if "grpo" in algos:
        out["grpo/quartet_per_row"] = ([py, "-m", "benchmarks.grpo_step", *quartet, "--share-prompts", "off"], ROOT)
        out["grpo/floor"] = ([py, str(FLOORS / "bare_grpo_floor.py"), *floor], ROOT)
        out["grpo/quartet"] = ([py, "-m", "benchmarks.grpo_step", *quartet, "--share-prompts", "on"], ROOT)
    return out


def phases(result: dict) -> dict[str, float]:
    """Generation, scoring and update seconds per step, for Quartet's and the floors' own phase names."""
    if "phase_sec_median" in result:  # Quartet
        return dict(result["phase_sec_median"])
    p = result["phase_sec_per_step_mean"]
    update = ("train_fwd", "backward", "clip_grad", "optim_step")
    return {"generation": p.get("generate", 0.0),
            "scoring": sum(v for k, v in p.items() if k != "generate" and k not in update),
            "update": sum(p.get(k, 0.0) for k in update)}


def merged(results: list[dict]) -> dict:
    """One program's rounds at one point as one result: the median of the rounds' s/step and of each phase,
    the largest peak RSS (the first round's other fields)."""
    out = dict(results[0])
    out["sec_per_step_median"] = statistics.median(r["sec_per_step_median"] for r in results)
    for key in ("phase_sec_median", "phase_sec_per_step_mean"):  # Quartet's, the floors'
        if key in out:
            out[key] = {k: statistics.median(r[key][k] for r in results) for k in out[key]}
    out["peak_rss_mib"] = max(r["peak_rss_mib"] for r in results)
    return out


def run(points: list[Point], algos: str, save, repeat: int = 1) -> list[dict]:
    """Every point's programs, `repeat` x `point.rounds` rounds per point (alternating, the order rotated
    each round, so drift and each place in the order hit every program alike); `save(rows)` after each
    point, so a long run that stops keeps what it measured. A program that fails is reported and its
    point left out (the others still run)."""
    rows = []
    for point in points:
        row = {"point": asdict(point), "label": point.label, "load_avg_before": [round(x, 2) for x in os.getloadavg()],
               "results": {}, "rounds": {}}
        failed = False
        n_rounds = repeat * point.rounds
        for round_ in range(n_rounds):
            for name, (cmd, cwd) in rotated(list(programs(point, algos).items()), round_):
                print(f"[{point.axis} {point.label}{f' round {round_ + 1}' if n_rounds > 1 else ''}] {name} ...",
                      file=sys.stderr, end=" ", flush=True)
                try:
                    result = run_json(cmd, cwd)
                except RuntimeError as err:
                    print(f"failed:\n{err}", file=sys.stderr, flush=True)
                    failed = True
                    break
                row["rounds"].setdefault(name, []).append(result)
                print(f"{result['sec_per_step_median']:.3f} s/step", file=sys.stderr, flush=True)
            if failed:
                break
        if failed:
            continue
        row["results"] = {name: merged(results) for name, results in row["rounds"].items()}
        row["ratios_per_round"] = [ratios({"results": {name: results[i] for name, results in row["rounds"].items()}})
                                   for i in range(n_rounds)]
        row["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
        rows.append(row)
        save(rows)
    return rows


def ratios(row: dict) -> dict[str, float]:
    """Quartet / floor s/step of each algorithm at one point (GRPO per row and shared)."""
    r = {name: res["sec_per_step_median"] for name, res in row["results"].items()}
    out = {}
    if "ppo/floor" in r:
        out["ppo"] = r["ppo/quartet"] / r["ppo/floor"]
    if "grpo/floor" in r:
        out["grpo per row"] = r["grpo/quartet_per_row"] / r["grpo/floor"]
        out["grpo shared"] = r["grpo/quartet"] / r["grpo/floor"]
    return out


def markdown_table(rows: list[dict]) -> str:
    head = ("| axis | model, prompt + answer | algorithm | Quartet s/step (gen / score / update) | floor s/step (gen / score / update) "
            "| Quartet/floor | peak RSS MiB Quartet / floor | load avg |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    fmt = lambda res: "{:.2f} ({:.2f} / {:.2f} / {:.2f})".format(  # noqa: E731
        res["sec_per_step_median"], *(phases(res)[k] for k in ("generation", "scoring", "update")))
    for row in rows:
        res, q = row["results"], ratios(row)
        pt = row["point"]
        size = (f"{pt['n_layer']}x{pt['n_embd']} ({non_embedding_params(pt['n_layer'], pt['n_embd']):.1f} M), "
                f"{pt['prompt_len']} + {pt['new_tokens']} tokens")
        load = f"{row['load_avg_before'][0]:.1f} -> {row['load_avg_after'][0]:.1f}"
        for algo, quartet, floor, key in (("PPO", "ppo/quartet", "ppo/floor", "ppo"),
                                          ("GRPO per row", "grpo/quartet_per_row", "grpo/floor", "grpo per row"),
                                          ("GRPO shared", "grpo/quartet", "grpo/floor", "grpo shared")):
            if quartet in res:
                rounds = [r[key] for r in row.get("ratios_per_round", [])]
                ratio = f"{q[key]:.2f}" + (f" ({', '.join(f'{x:.2f}' for x in rounds)})" if len(rounds) > 1 else "")
                lines.append(f"| {pt['axis']} | {size} | {algo} | {fmt(res[quartet])} | {fmt(res[floor])} | "
                             f"{ratio} | {res[quartet]['peak_rss_mib']:.0f} / {res[floor]['peak_rss_mib']:.0f} "
                             f"| {load} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, threads: str | None, repeat: int = 1) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = [a for a in ("model", "answer", "prompt") if any(r["point"]["axis"] == a for r in rows)] or ["model"]
    fig, axes = plt.subplots(2, len(axes_names), figsize=(4.2 * len(axes_names), 6.4), squeeze=False)
    xlabel = {"model": "non-embedding parameters (M)", "answer": "answer tokens", "prompt": "prompt tokens"}
    programs_ = {"ppo/quartet": ("PPO Quartet", "C0", "-"), "ppo/floor": ("PPO floor", "C0", ":"),
                 "grpo/quartet_per_row": ("GRPO Quartet per row", "C1", "-"),
                 "grpo/quartet": ("GRPO Quartet shared", "C2", "-"), "grpo/floor": ("GRPO floor", "C1", ":")}
    for col, axis in enumerate(axes_names):
        pts = sorted((r for r in rows if on_axis(r["point"], axis) is not None), key=lambda r: on_axis(r["point"], axis))
        xs = [round(on_axis(r["point"], axis), 1) for r in pts]
        top, bottom = axes[0][col], axes[1][col]
        for name, (label, color, style) in programs_.items():
            if all(name in r["results"] for r in pts):
                top.plot(xs, [r["results"][name]["sec_per_step_median"] for r in pts], style, color=color,
                         marker="o", label=label)
        for key, color in (("ppo", "C0"), ("grpo per row", "C1"), ("grpo shared", "C2")):
            values = [ratios(r).get(key) for r in pts]
            if all(v is not None for v in values):
                bottom.plot(xs, values, color=color, marker="o", label=key.replace("ppo", "PPO").replace("grpo", "GRPO"))
        bottom.axhline(1.0, color="grey", lw=0.8)
        bottom.axhline(1.05, color="grey", lw=0.8, ls="--")
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{x:g}" for x in xs])
            ax.minorticks_off()
        top.set_yscale("log")
        top.set_title(f"{axis} ({'from 4x256' if axis == 'model' else 'from the anchor'})")
        top.set_ylabel("s/step")
        bottom.set_ylabel("Quartet / floor (s/step)")
        bottom.set_xlabel(xlabel[axis])
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    counts = sorted({len(r.get("ratios_per_round", [])) or repeat for r in rows}) or [repeat]
    low, high = counts[0], counts[-1]
    rounds = "" if high == 1 else f", medians of {low if low == high else f'{low}-{high}'} rounds"
    fig.suptitle("Quartet's PPO and GRPO steps against the plain-PyTorch floors\n"
                 f"(fp32, {threads or '?'} thread(s), one invocation{rounds}; dashed: 1.05x)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--axes", default="model,answer,prompt", help="comma-separated: model, answer, prompt")
    p.add_argument("--algos", default="ppo,grpo", help="comma-separated: ppo, grpo")
    p.add_argument("--json", default=str(ROOT / "docs" / "scaling.json"), help="where the results go")
    p.add_argument("--plot", default=str(ROOT / "docs" / "scaling.png"))
    p.add_argument("--steps", type=int, help="steps at every point (default: the grid's, fewer where slow)")
    p.add_argument("--repeat", type=int, default=1, help="rounds per point, alternating; medians of the rounds")
    p.add_argument("--quick", action="store_true", help="a smoke run: the two smallest points of each axis, 2 steps")
    p.add_argument("--plot-only", metavar="JSON", help="no runs: the table and the plot of an earlier JSON file")
    a = p.parse_args(argv)
    threads = os.environ.get("OMP_NUM_THREADS")
    if a.plot_only:
        saved = json.loads(Path(a.plot_only).read_text())
        rows, threads, a.repeat = saved["rows"], saved.get("threads"), saved.get("repeat", 1)
    else:
        axes = set(a.axes.split(",")) | {"anchor"}
        points = [pt for pt in grid() if pt.axis in axes]
        if a.quick:
            points = [Point(**{**asdict(pt), "rounds": 1}) for pt in points
                      if sum(q.axis == pt.axis and q.size < pt.size for q in points) < 1]
            a.steps = a.steps or 2
        if a.steps:
            points = [Point(**{**asdict(pt), "steps": a.steps}) for pt in points]
        def save(rows: list[dict]) -> None:
            ratio_values = [v for r in rows for k, v in ratios(r).items() if k != "grpo shared"]
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps({"n_ctx": N_CTX, "threads": threads, "repeat": a.repeat,
                                                "max_ratio_without_sharing": max(ratio_values),
                                                "median_ratio_without_sharing": statistics.median(ratio_values),
                                                "rows": rows}, indent=1) + "\n")

        rows = run(points, a.algos, save, a.repeat)
    plot(rows, Path(a.plot), threads, a.repeat)
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
