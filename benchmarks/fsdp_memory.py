#!/usr/bin/env python3
"""What each rank holds under FSDP2: one process against two ranks (torchrun, gloo on CPU).

Runs Quartet's real stages (SFT, DPO, PPO) for two steps with `run.fsdp` (and `run.fsdp_frozen`:
DPO's reference, PPO's reference and reward model) and prints, from the memory report the run
loop prints after the first step, a Markdown table: trained parameters and optimizer state (their
local shards), the frozen models, the actor's weights gathered for generation, and the peak RSS
of each process. On one process `run.fsdp` shards nothing; the report is the baseline.

    OMP_NUM_THREADS=1 python -m benchmarks.fsdp_memory                 # the `small` preset (about a minute on 2 cores)
    OMP_NUM_THREADS=1 python -m benchmarks.fsdp_memory --preset nano   # about as long: process start-up dominates
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def write_inputs(root: Path, preset: str) -> None:
    from quartet.models.loading import save_model
    from quartet.models.presets import build_preset_model
    from quartet.models.tokenizer import train_bpe_tokenizer

    rows = [{"prompt": f"Q: what comes after {i}?\nA:", "completion": f" {i + 1}."} for i in range(64)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": " a fish."} for r in rows]
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    tokenizer = train_bpe_tokenizer([r["prompt"] + r["completion"] for r in rows], vocab_size=2048)
    save_model(build_preset_model(preset, tokenizer, seed=0), tokenizer, root / "actor")
    save_model(build_preset_model(preset, tokenizer, seed=1, scalar=True), tokenizer, root / "rm")
    (root / "sft.yaml").write_text("model: {path: actor}\ndata: {train: sft.jsonl, eval_fraction: 0, max_length: 32}\n"
                                   "train: {max_steps: 2, batch_size: 8}\nrun: {fsdp: true}\n")
    (root / "dpo.yaml").write_text("model: {path: actor}\ndata: {train: prefs.jsonl, eval_fraction: 0, max_length: 32}\n"
                                   "train: {max_steps: 2, batch_size: 8}\nrun: {fsdp: true, fsdp_frozen: true}\n")
    (root / "ppo.yaml").write_text("models: {actor: actor, reward: rm, critic_init: actor}\ndata: {train: prompts.jsonl}\n"
                                   "rollout: {max_new_tokens: 8}\nbatch: {rollout_batch_size: 8, mini_batch_size: 4}\n"
                                   "train: {steps: 2, n_samples: 0}\nrun: {fsdp: true, fsdp_frozen: true}\n")


def memory_report(root: Path, stage: str, ranks: int) -> dict[int, dict[str, float]]:
    launch = ([sys.executable, "-m", "quartet"] if ranks == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "quartet"])
    out = subprocess.run([*launch, stage, "--config", f"{stage}.yaml", "--output", f"{stage}-{ranks}"], cwd=root,
                         env={**os.environ, "QUARTET_PROGRESS": "0"}, capture_output=True, text=True, check=True)
    report = {}
    for rank, parts in re.findall(r"^  rank (\d+): (.*)$", out.stdout, flags=re.M):
        report[int(rank)] = {name.strip(): float(mib) for name, mib in re.findall(r"([a-zA-Z ]+?) ([\d.]+) MiB", parts)}
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    args = parser.parse_args(argv)
    columns = ["trained parameters", "optimizer state", "frozen models", "gathered for generation", "peak RSS"]
    print(f"| stage ({args.preset}) | ranks | rank | " + " | ".join(f"{c} MiB" for c in columns) + " |")
    print("|" + "---|" * (3 + len(columns)))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_inputs(root, args.preset)
        for stage in ("sft", "dpo", "ppo"):
            for ranks in (1, 2):
                for rank, parts in sorted(memory_report(root, stage, ranks).items()):
                    cells = [(f"{parts[c]:.0f}" if c == "peak RSS" else f"{parts[c]:.2f}") if c in parts else "-" for c in columns]
                    print(f"| {stage} | {ranks} | {rank} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
