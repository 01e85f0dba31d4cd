"""The arena's self-contained report: every algorithm's ground truth against generated tokens and
seconds, proxy against gold, KL against gold, the final table over seeds, and a few answers each."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from quartet.arena.worlds import JUDGE_SAMPLES, world_directory  # noqa: E402
from quartet.report.html import _write_page, data_uri, esc, fmt, note  # noqa: E402
from quartet.report.plots import COLORS, finish_figure  # noqa: E402

INTRO = ("Every algorithm starts from the same SFT model and the same data, trains on the same budget of generated "
         "response tokens, and is judged on the same held-out prompts by ground truth it never saw: the town's hidden "
         "gold judge (the algorithms optimise a learned reward model, the proxy), or the exact answers of a "
         "verifiable task. DPO generates nothing while it trains; its budget is the SFT answers its pairs were made "
         "of. A tiny model and one or two task families: read the numbers as what these algorithms do here, not as "
         "a ranking for large models.")

# The two measurements the report shows, said once: the table's and the curves'.
JUDGEMENT = (f"The table (and the stars, and the dashed SFT line) is the final judgement: each final actor, and the "
             f"SFT model, answers every held-out prompt {JUDGE_SAMPLES} times at temperature 1, averaged. The curves are "
             "each trainer's own held-out evaluation along its run: one answer per prompt at the rollout temperature, "
             "the same draws at every evaluation, so steps compare. One answer per prompt is noisier, so a curve's "
             "first point differs from the SFT line, and its last point from its star, by that sampling noise.")


def _color(algorithm: str, algorithms: list[str]) -> str:
    return COLORS[algorithms.index(algorithm) % len(COLORS)] if algorithm in algorithms else "#6b7280"


def _plot(path: Path, title: str, xlabel: str, ylabel: str, draw) -> Path:
    fig, ax = plt.subplots(figsize=(6.0, 3.4), dpi=100)
    draw(ax)
    return finish_figure(fig, ax, path, title, xlabel, ylabel)


def world_plots(out: Path, world: str, runs: list[dict[str, Any]], starts: list[dict[str, Any]],
                algorithms: list[str]) -> list[tuple[Path, str]]:
    """The world's figures (PNG paths with captions)."""
    plots_dir = out / "plots" / world_directory(world)
    runs = [r for r in runs if r["world"] == world]
    start = [s["sft_ground_truth"] for s in starts if s["world"] == world]
    figures = []

    def curves(x: str):
        def draw(ax):
            for algorithm in algorithms:
                color = _color(algorithm, algorithms)
                for i, r in enumerate(x for x in runs if x["algorithm"] == algorithm):
                    points = [p for p in r["curve"] if p.get("ground_truth") is not None]
                    if algorithm == "dpo" and start:
                        points = [{"tokens": 0, "seconds": 0.0, "ground_truth": start[0]}, *points]
                    ax.plot([p[x] for p in points], [p["ground_truth"] for p in points], "o-", markersize=3,
                            color=color, alpha=0.85, label=algorithm if i == 0 else None)
                    if r.get("ground_truth") is not None and r["curve"]:  # the table's value, at the run's end
                        ax.plot([r["curve"][-1][x]], [r["ground_truth"]], "*", markersize=11, color=color)
            if any(r.get("ground_truth") is not None for r in runs):
                ax.plot([], [], "*", markersize=9, color="#6b7280", label="final judgement (table)")
            if start:
                ax.axhline(sum(start) / len(start), color="#9ca3af", linestyle="--", linewidth=1, label="SFT (judged)")
        return draw

    ylabel = "gold" if world == "town" else "accuracy"
    figures.append((_plot(plots_dir / "tokens.png", f"{world}: ground truth vs generated tokens", "generated tokens",
                          ylabel, curves("tokens")),
                    "Held-out ground truth along each run (the trainer's own evaluation, one line per seed) against "
                    "the response tokens it generated; stars: the final judgement of the table; dashed: the SFT "
                    "model's. DPO generates nothing while it trains: its line joins the SFT start to its final "
                    "judgement, at the tokens its pairs cost."))
    figures.append((_plot(plots_dir / "seconds.png", f"{world}: ground truth vs seconds", "seconds of training",
                          ylabel, curves("seconds")),
                    "The same against wall-clock seconds of training on this machine (the table's seconds: "
                    "training only, without loading, judging and measuring the KL)."))
    finals = [r for r in runs if r.get("ground_truth") is not None]
    if world == "town":
        def proxy_vs_gold(ax):
            for algorithm in algorithms:
                points = [p for r in runs if r["algorithm"] == algorithm for p in r["curve"]
                          if p.get("proxy") is not None and p.get("ground_truth") is not None]
                ax.plot([p["proxy"] for p in points], [p["ground_truth"] for p in points], "o", markersize=3,
                        alpha=0.4, color=_color(algorithm, algorithms))
                ends = [r for r in finals if r["algorithm"] == algorithm and r.get("proxy") is not None]
                ax.plot([r["proxy"] for r in ends], [r["ground_truth"] for r in ends], "*", markersize=11,
                        color=_color(algorithm, algorithms), label=algorithm)
        figures.append((_plot(plots_dir / "proxy_gold.png", "town: proxy vs gold", "proxy (reward model)", "gold",
                              proxy_vs_gold),
                        "Each held-out evaluation's proxy score against its gold score (stars: the final actors). "
                        "Points that move right but not up are reward over-optimisation: the reward model is fooled."))

    def kl_vs_gold(ax):
        if start:
            ax.plot([0.0], [sum(start) / len(start)], "s", color="#9ca3af", markersize=7, label="SFT")
        for algorithm in algorithms:
            color = _color(algorithm, algorithms)
            for r in (x for x in runs if x["algorithm"] == algorithm):
                points = [p for p in r["curve"] if p.get("kl") is not None and p.get("ground_truth") is not None]
                ax.plot([p["kl"] for p in points], [p["ground_truth"] for p in points], "-", alpha=0.35, color=color)
            ends = [r for r in finals if r["algorithm"] == algorithm and r.get("kl") is not None]
            ax.plot([r["kl"] for r in ends], [r["ground_truth"] for r in ends], "*", markersize=11, color=color,
                    label=algorithm)
    figures.append((_plot(plots_dir / "kl_gold.png", f"{world}: KL to the reference vs ground truth",
                          "KL(actor ‖ SFT reference), nats per response", ylabel, kl_vs_gold),
                    "How far each algorithm moved from the SFT model for what it gained: the frontier. Stars: the "
                    "final actors, KL measured on held-out prompts the same way for all (DPO included); thin lines: "
                    "the KL of the training rollouts along the run."))
    return figures


def _pm(mean: Any, std: Any, seeds: int, digits: int = 3) -> str:
    """A mean, with its spread over seeds where there are several (one seed has none)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{fmt(mean, digits)} ± {fmt(std, digits)}" if seeds > 1 and std is not None else fmt(mean, digits)


def world_table(world: str, table: list[dict[str, Any]], starts: list[dict[str, Any]]) -> str:
    rows = [r for r in table if r["world"] == world]
    start = [s for s in starts if s["world"] == world]
    sft = ""
    if start:
        gt = [s["sft_ground_truth"] for s in start]
        proxy = [s["sft_proxy"] for s in start if s.get("sft_proxy") is not None]
        sft = (f'<tr><td>SFT (the start)</td><td class="num">{fmt(sum(gt) / len(gt))}</td>'
               f'<td class="num">{fmt(sum(proxy) / len(proxy)) if proxy else "–"}</td>' + '<td class="num">–</td>' * 5
               + "</tr>")
    body = "".join(
        f'<tr><td>{esc(r["algorithm"])}</td>'
        f'<td class="num"><b>{_pm(r["ground_truth"], r["ground_truth_std"], r["seeds"])}</b></td>'
        f'<td class="num">{_pm(r["proxy"], r["proxy_std"], r["seeds"])}</td>'
        f'<td class="num">{_pm(r["kl"], r["kl_std"], r["seeds"])}</td>'
        f'<td class="num">{_pm(r["seconds_per_step"], r["seconds_per_step_std"], r["seeds"], 2)}</td>'
        f'<td class="num">{_pm(r["seconds"], r["seconds_std"], r["seeds"], 0)}</td>'
        f'<td class="num">{fmt(r["generated_tokens"], 0)}</td><td class="num">{fmt(r["peak_rss_mib"], 0)}</td></tr>'
        for r in rows)
    seeds = max((r["seeds"] for r in rows), default=1)
    spread = f"mean ± sd over {seeds} seeds" if seeds > 1 else "one seed"
    return (f"<table><tr><th>algorithm</th><th>ground truth (final judgement; {spread})</th><th>proxy</th>"
            "<th>KL to reference</th><th>s / step</th><th>seconds of training</th><th>generated tokens</th>"
            f"<th>peak RSS MiB</th></tr>{sft}{body}</table>")


def answers_table(world: str, runs: list[dict[str, Any]], starts: list[dict[str, Any]]) -> str:
    seed0 = [r for r in runs if r["world"] == world and r["seed"] == min(x["seed"] for x in runs if x["world"] == world)]
    start = [s for s in starts if s["world"] == world and s["seed"] == (seed0[0]["seed"] if seed0 else 0)]
    shown = ([("SFT", start[0].get("sft_answers", []))] if start else []) + [(r["algorithm"], r["answers"]) for r in seed0]
    body = "".join(f'<tr><td>{esc(name)}</td><td class="resp">{esc(a.get("prompt", ""))}</td>'
                   f'<td class="resp">{esc(a.get("answer", ""))}</td><td class="num">{fmt(a.get("ground_truth"))}</td></tr>'
                   for name, answers in shown for a in answers)
    return ("<table><tr><th>algorithm</th><th>held-out prompt</th><th>answer</th><th>ground truth</th></tr>"
            f"{body}</table>")


def render_arena_report(out: str | Path, output: str | Path | None = None) -> Path:
    """Write OUT/report.html (self-contained: inline CSS, PNGs as data URIs) from OUT/summary.json."""
    out = Path(out)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    algorithms, runs, starts = summary["algorithms"], summary["runs"], summary.get("starts", [])
    parts = ["<h1>Quartet arena</h1>", f'<p class="sub">{esc(out.resolve())}</p>', f'<p class="intro">{INTRO}</p>']
    for n, world in enumerate(summary["worlds"], start=1):
        budgets = ", ".join(f"{b:,}" for b in summary["budgets"][world])
        parts.append(f"<h2>{n}. {esc(world)}</h2>")
        parts.append(f"<p>Budget: <b>{budgets}</b> generated response tokens per online algorithm (per seed: "
                     "what the SFT answers of DPO's pairs cost, so that every algorithm sees as many sampled tokens); "
                     f"{summary['seeds']} seed(s). Ground truth: "
                     f"{'the hidden gold judge' if world == 'town' else 'accuracy'} on held-out prompts.</p>")
        parts.append(f"<p>{esc(JUDGEMENT)}</p>" + world_table(world, summary["table"], starts))
        figures = world_plots(out, world, runs, starts, algorithms)
        parts.append('<div class="grid">' + "".join(
            f'<figure><img src="{data_uri(path)}" alt="{esc(path.stem)}"><figcaption>{esc(caption)}</figcaption></figure>'
            for path, caption in figures) + "</div>")
        parts.append("<h3>A few held-out answers (first seed)</h3>" + answers_table(world, runs, starts))
    if not runs:
        parts.append(note("No runs in summary.json."))
    return _write_page(out, parts, output)



