#!/usr/bin/env python3
"""Where one GRPO training micro-batch spends its time, with each prompt computed once per group and per row.

The update's own forward (`quartet.models.policy.ActorCritic`: response log-probs and the entropy
metric, temperature 0.7) and its backward on one micro-batch of config D's shape: a GPT-2 built
from config (4 layers, width 256, vocabulary 4096), 2 groups x 8 samples, 16-token prompts,
32-token responses. torch.profiler's operator self times are summed into five parts:

- matrix products of the model body (attention projections, MLP);
- the LM head (the matrix products with the vocabulary as a dimension), which runs on response
  positions only, so prompt sharing hardly shrinks it (the first response token's logits come
  once per group);
- attention (scaled dot-product kernels, forward and backward);
- vocabulary-wide element-wise work (temperature, log-softmax, the entropy, their backward);
- everything else (layer norms, GELU, copies, masks, optimizer-free autograd bookkeeping).

Sharing shrinks the body's part by the prompt's share of the positions and leaves the LM head and
the vocabulary-wide part almost as they are; the ratio of the two totals is what sharing can take
off the update on these shapes. The profiler also counts the matrix products' FLOPs (body and LM
head), the arithmetic beside the time. Wall-clock medians of `--repeat` runs without the profiler beside it.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.update_profile
    .venv/bin/python -m benchmarks.update_profile --prompt-len 128       # config E's prompts

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

from benchmarks.ppo_step import model_arguments

PARTS = ("body matrix products", "LM head", "attention", "vocabulary-wide element-wise", "other")
_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = model_arguments(__doc__)
    p.add_argument("--groups", type=int, default=2, help="prompts in the micro-batch")
    p.add_argument("--num-generations", type=int, default=8, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--repeat", type=int, default=15, help="timed runs per path (after 3 warm-up runs)")
    p.add_argument("--profiled", type=int, default=5, help="runs per path under the profiler")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def part_of(name: str, input_shapes: list, vocab: int) -> str:
    """The part of the step an operator belongs to, from its name and input shapes."""
    dims = {d for shape in input_shapes if isinstance(shape, (list, tuple)) for d in shape if isinstance(d, int)}
    if name in _MATMULS:
        return "LM head" if vocab in dims else "body matrix products"
    if "scaled_dot_product" in name or "flash_attention" in name or "efficient_attention" in name:
        return "attention"
    if any(isinstance(shape, (list, tuple)) and shape and shape[-1] == vocab for shape in input_shapes):
        return "vocabulary-wide element-wise"
    return "other"


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import GPT2Config, GPT2LMHeadModel

    from quartet.models.policy import ActorCritic

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    config = GPT2Config(vocab_size=a.vocab, n_positions=max(a.n_ctx, a.prompt_len + a.new_tokens), n_embd=a.n_embd,
                        n_layer=a.n_layer, n_head=a.n_head, activation_function=a.activation,
                        bos_token_id=1, eos_token_id=1, pad_token_id=0)
    policy = ActorCritic(GPT2LMHeadModel(config).eval())  # RL forwards run without dropout
    n, rows = a.num_generations, a.groups * a.num_generations
    prompts = torch.randint(3, a.vocab, (a.groups, a.prompt_len)).repeat_interleave(n, 0)
    responses = torch.randint(3, a.vocab, (rows, a.new_tokens))
    sequences = torch.cat([prompts, responses], 1)
    mask = torch.ones_like(sequences)
    weights = torch.randn(rows, a.new_tokens)  # stands in for the advantages: a loss of the right shape

    def step(group_size: int) -> None:
        logprobs, _entropy, _ = policy(sequences, mask, responses, a.temperature, True, group_size)
        (logprobs * weights).sum().backward()

    paths = {"shared": n, "per_row": 1}
    wall: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(3):
        for group_size in paths.values():
            step(group_size)
    for _ in range(a.repeat):  # alternating, so drift hits both paths alike
        for name, group_size in paths.items():
            started = time.perf_counter()
            step(group_size)
            wall[name].append(time.perf_counter() - started)
    parts: dict[str, dict[str, float]] = {}
    gflop: dict[str, dict[str, float]] = {}  # the profiler counts the matrix products' FLOPs
    for name, group_size in paths.items():
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
            for _ in range(a.profiled):
                step(group_size)
        ms: dict[str, float] = defaultdict(float)
        flop: dict[str, float] = defaultdict(float)
        for event in prof.key_averages(group_by_input_shape=True):
            part = part_of(event.key, event.input_shapes, a.vocab)
            ms[part] += event.self_cpu_time_total / 1000 / a.profiled
            flop[part] += (event.flops or 0) / a.profiled
        parts[name] = {part: ms[part] for part in PARTS}
        gflop[name] = {part: flop[part] / 1e9 for part in PARTS if part in ("body matrix products", "LM head")}
    result = {
        "bench": "update_profile",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": {k: getattr(a, k) for k in ("n_layer", "n_embd", "n_head", "vocab", "n_ctx", "activation", "groups",
                                              "num_generations", "prompt_len", "new_tokens", "temperature", "repeat",
                                              "profiled")},
        "wall_ms_median": {name: 1000 * statistics.median(times) for name, times in wall.items()},
        "operator_ms": parts,
        "operator_ms_total": {name: sum(p.values()) for name, p in parts.items()},
        "matmul_gflop": gflop,
    }
    result["shared_over_per_row"] = {
        "wall": result["wall_ms_median"]["shared"] / result["wall_ms_median"]["per_row"],
        "operators": result["operator_ms_total"]["shared"] / result["operator_ms_total"]["per_row"],
    }
    print(f"one micro-batch ({rows} rows, {a.prompt_len}-token prompts, {a.new_tokens}-token responses), "
          f"forward + backward, operator ms (torch.profiler, {a.threads} threads):")
    print("| part | shared | per row | shared / per row |\n|---|---|---|---|")
    for part in (*PARTS, "total"):
        s = result["operator_ms_total"]["shared"] if part == "total" else parts["shared"][part]
        r = result["operator_ms_total"]["per_row"] if part == "total" else parts["per_row"][part]
        print(f"| {part} | {s:.1f} | {r:.1f} | {s / r:.2f} |" if r else f"| {part} | {s:.1f} | {r:.1f} | - |")
    w = result["wall_ms_median"]
    print(f"| wall clock, median of {a.repeat} (no profiler) | {w['shared']:.1f} | {w['per_row']:.1f} | "
          f"{w['shared'] / w['per_row']:.2f} |")
    for part in ("body matrix products", "LM head"):
        s, r = gflop["shared"][part], gflop["per_row"][part]
        print(f"| {part}, GFLOP | {s:.2f} | {r:.2f} | {s / r:.2f} |")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
