"""`quartet arena`: every algorithm from the same start, on the same budget, judged by ground truth.

For each world (worlds.py) and seed, the world prepares one start (the SFT model, prompts,
held-out prompts, DPO's preference pairs, the town's reward model); then every algorithm trains from
it in a process of its own (so its peak memory is its own), with held-out evaluations along the way.
The budget is counted in generated response tokens: DPO learns from pairs of SFT answers sampled for
the start, and every online algorithm may sample as many tokens as those pairs cost. Each run is an
ordinary run directory (OUTPUT/WORLD/seed-S/ALGORITHM): an interrupted arena, started again with
`--resume`, keeps the runs that finished and resumes the one that did not.

`summary.json` holds every run's numbers and each algorithm's mean and spread over seeds;
`report.html` shows them (report/arena.py).
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from quartet.arena.worlds import (
    ALGORITHMS,
    FULL,
    JUDGE_SAMPLES,
    QUICK,
    TEST,
    ArenaSettings,
    held_out_kl,
    make_world,
    world_directory,
)

__all__ = ["FULL", "QUICK", "TEST", "ArenaSettings", "run_arena"]


def run_arena(output: str | Path, worlds: list[str], algorithms: list[str], seeds: int = 1, quick: bool = False,
              resume: bool = False, settings: ArenaSettings | None = None, jobs: int | None = None,
              threads: int = 1) -> dict[str, Any]:
    """Run every algorithm in every world for `seeds` seeds into `output`; returns (and writes) summary.json.

    Every start and every run is a process of its own with `threads` torch threads, `jobs` of them at a time
    (default: the CPU count over `threads`, at most 8). A run's numbers depend on its threads, not on the jobs.
    """
    from quartet.arena.report import render_arena_report

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("quartet arena runs on one process (each algorithm in a process of its own)")
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        raise ValueError(f"unknown algorithm(s) {unknown}; choose from {', '.join(ALGORITHMS)}")
    if not worlds or not algorithms:
        raise ValueError("name at least one world (--world) and one algorithm (--algorithms)")
    if seeds < 1 or threads < 1 or (jobs is not None and jobs < 1):
        raise ValueError(f"--seeds, --jobs and --threads must be at least 1, got {seeds}, {jobs}, {threads}")
    settings = settings or (QUICK if quick else FULL)
    jobs = jobs or max(1, min(8, (os.cpu_count() or 1) // threads))
    out = Path(output)
    # a bad world name (or a missing optional package) fails before anything is written
    supported = {spec: getattr(make_world(spec, out / "check", 0, settings), "algorithms", ALGORITHMS) for spec in worlds}
    for spec in worlds:
        if skipped := [a for a in algorithms if a not in supported[spec]]:
            print(f"[arena] {spec}: {', '.join(skipped)} left out (this world runs only {', '.join(supported[spec])})")
    if (out / "summary.json").exists():
        raise FileExistsError(f"{out} already holds a finished arena; choose another --output or delete it")
    if out.exists() and any(out.iterdir()) and not resume:
        raise FileExistsError(f"{out} holds an unfinished arena; continue it with --resume, or choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    plan = {"worlds": worlds, "algorithms": algorithms, "seeds": seeds, "threads": threads,
            "settings": asdict(settings)}
    if (out / "arena.json").exists() and json.loads((out / "arena.json").read_text()) != plan:
        raise ValueError(f"{out} holds an arena started with other worlds, algorithms, seeds, threads or sizes "
                         f"({(out / 'arena.json').read_text().strip()[:300]}); resume it with the same arguments")
    (out / "arena.json").write_text(json.dumps(plan) + "\n", encoding="utf-8")
    started = time.perf_counter()
    tasks = []
    for spec in worlds:
        for seed in range(seeds):
            directory = out / world_directory(spec) / f"seed-{seed}"
            base = {"spec": spec, "directory": str(directory), "seed": seed, "settings": settings, "threads": threads}
            tasks.append({**base, "algorithm": None})  # the start: SFT, data, reward model
            tasks += [{**base, "algorithm": a} for a in algorithms if a in supported[spec]]
    _run_tasks(tasks, jobs)
    starts = [{"world": t["spec"], "seed": t["seed"], **json.loads(_record(t).read_text())}
              for t in tasks if t["algorithm"] is None]
    runs = [json.loads(_record(t).read_text()) for t in tasks if t["algorithm"] is not None]
    budgets = {w: [s["preference_tokens"] for s in starts if s["world"] == w] for w in worlds}  # per seed
    summary = {"worlds": worlds, "algorithms": algorithms, "seeds": seeds, "quick": quick, "jobs": jobs,
               "threads": threads, "budgets": budgets, "runs": runs, "starts": starts,
               "table": _table(runs), "seconds": time.perf_counter() - started}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n", encoding="utf-8")
    report = render_arena_report(out)
    print_table(summary, report)
    return summary


def _record(task: dict[str, Any]) -> Path:
    """What a finished task leaves: the start's start.done, a run's arena_run.json (each written last)."""
    directory = Path(task["directory"])
    return directory / "start.done" if task["algorithm"] is None else directory / task["algorithm"] / "arena_run.json"


def _label(task: dict[str, Any]) -> str:
    start = "the start (SFT, data" + (", reward model)" if task["spec"] == "town" else ")")
    return f"{task['spec']} seed {task['seed']}: {task['algorithm'] or start}"


def _run_tasks(tasks: list[dict[str, Any]], jobs: int) -> None:
    """Each unfinished task in a process of its own, `jobs` at a time; a run waits for its start. Each writes
    its output to a log beside its results. A failure lets the running tasks finish, then stops the arena."""
    context = multiprocessing.get_context("spawn")
    pending = [t for t in tasks if not _record(t).exists()]
    running: dict[Any, tuple[dict[str, Any], float]] = {}
    failed: list[str] = []
    while pending or running:
        for task in list(pending):
            if len(running) >= jobs or failed:
                break
            start_done = Path(task["directory"]) / "start.done"
            if task["algorithm"] is not None and not start_done.exists():
                continue
            if task["algorithm"] is None:
                Path(task["directory"]).mkdir(parents=True, exist_ok=True)
            process = context.Process(target=_task_main, args=(task,))
            process.start()
            running[process] = (task, time.perf_counter())
            pending.remove(task)
            print(f"[arena] {_label(task)} ... (log: {_log_path(task)})", flush=True)
        if not running:
            break  # only runs whose start failed are left
        ready = multiprocessing.connection.wait([p.sentinel for p in running])
        for process in [p for p in running if p.sentinel in ready]:
            task, t0 = running.pop(process)
            process.join()
            if process.exitcode != 0 or not _record(task).exists():
                failed.append(f"{_label(task)} stopped with exit code {process.exitcode}; see {_log_path(task)}")
                print(f"[arena] {failed[-1]}", flush=True)
            else:
                print(f"[arena] {_label(task)} done in {time.perf_counter() - t0:.0f} s{_result_line(task)}", flush=True)
    if failed or pending:
        raise RuntimeError("arena stopped: " + "; ".join(failed or ["a start did not finish"]) +
                           "; continue with --resume (finished runs are kept)")


def _log_path(task: dict[str, Any]) -> Path:
    directory = Path(task["directory"])
    return directory / "start.log" if task["algorithm"] is None else directory / f"{task['algorithm']}.log"


def _result_line(task: dict[str, Any]) -> str:
    """After a task's wall time (loading, training, judging): a run's training seconds, which the table
    shows, and the final judgement."""
    record = json.loads(_record(task).read_text())
    if task["algorithm"] is None:
        return f": SFT ground truth {record['sft_ground_truth']:+.3f}"
    return f" (training {record['seconds']:.0f} s): ground truth {record['ground_truth']:+.3f}"


def _task_main(task: dict[str, Any]) -> None:
    """A spawned task: its output to its log, its torch threads fixed, then the start or the run."""
    log = open(_log_path(task), "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    os.environ.setdefault("QUARTET_PROGRESS", "0")
    import torch

    torch.set_num_threads(task["threads"])
    if task["algorithm"] is None:
        prepare_one(task)
    else:
        run_one(task)


def prepare_one(task: dict[str, Any]) -> None:
    """The world's start for one seed (an interrupted start resumes its finished stages): start.done, last."""
    directory = Path(task["directory"])
    world = make_world(task["spec"], directory, task["seed"], task["settings"])
    prepared = world.prepare(resume=True)
    sft = world.judge(world.sft_dir)  # the start every algorithm is measured from
    prepared.update({"sft_ground_truth": sft.ground_truth, "sft_proxy": sft.proxy, "sft_answers": sft.answers,
                     "sft_details": sft.details})
    tmp = directory / "start.done.tmp"
    tmp.write_text(json.dumps(prepared, default=float) + "\n", encoding="utf-8")
    tmp.replace(directory / "start.done")


def run_one(job: dict[str, Any]) -> None:
    """One algorithm's run in this process, then its judgement on the held-out prompts and its record."""
    directory, algorithm = Path(job["directory"]), job["algorithm"]
    start = json.loads((directory / "start.done").read_text())
    job = {**job, "budget": int(start["preference_tokens"]), "resume": (directory / algorithm).exists()}
    world = make_world(job["spec"], directory, job["seed"], job["settings"])
    run_dir = directory / algorithm
    t = time.perf_counter()
    if (run_dir / "summary.json").exists():  # trained, then stopped before its judgement
        summary = json.loads((run_dir / "summary.json").read_text())
    elif algorithm == "dpo":
        from quartet.stages.dpo import run_dpo

        summary = run_dpo(world.dpo_config(run_dir), resume=job["resume"])
    else:
        from quartet.stages.rl import run_rl

        summary = run_rl(world.rl_config(algorithm, run_dir, job["budget"]), resume=job["resume"],
                         reward_fn=world.reward_fn(), metric_fns=world.metric_fns())
    # DPO's tokens: the SFT answers its pairs were made of
    tokens = job["budget"] if algorithm == "dpo" else int(summary["generated_tokens"])
    seconds = summary.get("seconds", time.perf_counter() - t)  # training only (resumed: its last attempt's)
    judged = world.judge(run_dir / "final")
    held_out = [json.loads(line)["prompt"] for line in (directory / "data" / "held_out.jsonl").read_text().splitlines()]
    kl = held_out_kl(run_dir / "final", world.sft_dir, held_out, world.settings.max_new_tokens, job["seed"] + 13)
    record = {
        "world": job["spec"], "seed": job["seed"], "algorithm": algorithm, "ground_truth": judged.ground_truth,
        "proxy": judged.proxy, "details": judged.details, "kl": kl, "steps": summary["steps"],
        "seconds": seconds, "seconds_per_step": seconds / max(summary["steps"], 1), "generated_tokens": tokens,
        "budget": job["budget"], "peak_rss_mib": peak_rss_mib(),
        "curve": _curve(run_dir, world, algorithm, tokens, judged.ground_truth, seconds), "answers": judged.answers,
    }
    tmp = run_dir / "arena_run.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=float) + "\n", encoding="utf-8")
    tmp.replace(run_dir / "arena_run.json")


def peak_rss_mib() -> float:
    """This process's peak resident memory. Linux's VmHWM belongs to the process image, so a spawned child
    does not inherit its parent's peak, as getrusage's ru_maxrss does across fork and exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB elsewhere


def _curve(run_dir: Path, world, algorithm: str, tokens: int, final: float, seconds: float) -> list[dict[str, float]]:
    """The held-out ground truth (and proxy) along the run against generated tokens and seconds."""
    from quartet.runs.metrics import read_metrics

    if algorithm == "dpo":  # no generation while it trains: the start, then the end
        return [{"tokens": 0, "seconds": 0.0, "ground_truth": None}, {"tokens": tokens, "seconds": seconds,
                                                                      "ground_truth": final}]
    points, elapsed, generated = [], 0.0, 0
    for r in read_metrics(run_dir / "metrics.jsonl"):
        elapsed += r.get("time/step", 0.0)
        generated = r.get("tokens/generated", generated)
        if world.eval_ground_truth in r:
            points.append({"tokens": generated, "seconds": elapsed, "ground_truth": r[world.eval_ground_truth],
                           "proxy": r.get(world.eval_proxy) if world.eval_proxy else None, "kl": r.get("kl/ref")})
    return points


def _table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per world and algorithm: the mean and spread over seeds of the final numbers."""
    rows = []
    keys = sorted({(r["world"], r["algorithm"]) for r in runs}, key=lambda k: (k[0], ALGORITHMS.index(k[1])))
    for world, algorithm in keys:
        group = [r for r in runs if r["world"] == world and r["algorithm"] == algorithm]
        row: dict[str, Any] = {"world": world, "algorithm": algorithm, "seeds": len(group)}
        for key in ("ground_truth", "proxy", "kl", "seconds", "seconds_per_step", "generated_tokens", "peak_rss_mib"):
            values = [r[key] for r in group if r.get(key) is not None]
            row[key] = statistics.fmean(values) if values else None
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0 if values else None
        rows.append(row)
    return rows


def _details(summary: dict[str, Any], world: str, algorithm: str) -> str:
    """Episode worlds' details (tool-call rate, turns), the SFT start's -> the run's, means over seeds."""
    starts = [s.get("sft_details") or {} for s in summary["starts"] if s["world"] == world]
    runs = [r.get("details") or {} for r in summary["runs"] if r["world"] == world and r["algorithm"] == algorithm]
    keys = sorted({k for d in runs for k in d})
    return "".join(f"  {k} {statistics.fmean(s[k] for s in starts if k in s):.2f} -> "
                   f"{statistics.fmean(r[k] for r in runs if k in r):.2f}" for k in keys if any(k in s for s in starts))


def print_table(summary: dict[str, Any], report: Path) -> None:
    seeds = summary["seeds"]
    print("\n== Quartet arena ==")
    print(f"ground truth: the final judgement, {JUDGE_SAMPLES} answers per held-out prompt"
          + (f"; mean ± sd over {seeds} seeds" if seeds > 1 else "; one seed"))
    for world in summary["worlds"]:
        print(f"{world} (budget per seed: {', '.join(f'{b:,}' for b in summary['budgets'][world])} generated tokens):")
        start = [s["sft_ground_truth"] for s in summary.get("starts", []) if s["world"] == world]
        if start:
            print(f"  {'SFT (the start)':<22} ground truth {sum(start) / len(start):+.3f}")
        for row in (r for r in summary["table"] if r["world"] == world):
            spread = f" ± {row['ground_truth_std']:.3f}" if row["seeds"] > 1 else ""  # one seed has no spread
            proxy = f"  proxy {row['proxy']:+.3f}" if row["proxy"] is not None else ""
            print(f"  {row['algorithm']:<22} ground truth {row['ground_truth']:+.3f}{spread}"
                  f"{proxy}{_details(summary, world, row['algorithm'])}  training {row['seconds']:.0f} s  "
                  f"{row['peak_rss_mib']:.0f} MiB")
    print(f"report: {report}")


if __name__ == "__main__":  # pragma: no cover - the spawn start method imports this module by name
    sys.exit(0)
