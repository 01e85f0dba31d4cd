#!/usr/bin/env python3
"""Milliseconds per rollout of Quartet's sampler beside the PPO floor's own sampling loop, in one process.

Whole steps are too noisy on these machines to show a few percent in the sampling loop, so this
times the loop alone: rollouts of Quartet's `sample_responses` on a GPT2LMHeadModel of the
anchors' shape, with its lean decode steps and through the model's forward, and of
bare_ppo_floor.py's loop on its own modules (the same shape; a prompt's KV cache copied to its
group's rows as bare_grpo_floor.py does), alternating, `--rounds` times. Responses run to exactly
`--new-tokens` tokens (EOS suppressed), as in the benchmarks.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.sampler                 # 32 rows (configs A-C)
    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.sampler --group 8       # 8 prompts x 8 (config D)
    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.sampler --compiled      # and rollout.compile's sampler

`--compiled` adds Quartet's compiled decode step (`rollout.compile`, models/compiled_decode.py);
its compilation is paid in the warm-up and reported as `compile_s`. Before every rollout of every
loop the weights change in place (as an RL update changes them), so the compiled loop's rollouts
include repacking its projection weights.

The last stdout line is one JSON object: each loop's median and minimum ms per rollout, its
generated tokens per second and the projections' GFLOP/s (the matrix products of the decode steps,
against `peak_gflops`, a 1024x1024x1024 product on the same threads), and the ratios of the
medians to the floor's loop (benchmarks/floors/bare_ppo_floor.py). `--no-floor` leaves the floor out.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.ppo_step import gpt2_config, model_arguments, word_tokenizer


def parse_args(argv: list[str] | None = None):
    p = model_arguments(__doc__)
    p.set_defaults(n_ctx=1024)  # the scaling anchor's position table
    p.add_argument("--batch", type=int, default=32, help="rows per rollout")
    p.add_argument("--group", type=int, default=1, help="samples per prompt (batch / group prompts)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-floor", action="store_true", help="time Quartet's two paths only")
    p.add_argument("--compiled", action="store_true", help="time the compiled decode step too (rollout.compile)")
    p.add_argument("--no-forward", action="store_true", help="leave out decoding through the model's forward")
    return p.parse_args(argv)


def floor_loop(a) -> Callable[[torch.Generator], float]:
    """bare_ppo_floor.py's sampling loop on its own GPT-2 modules, timed per rollout."""
    from benchmarks.floors import bare_ppo_floor as floor

    fa = floor.parse_args(["--n-layer", str(a.n_layer), "--n-embd", str(a.n_embd), "--n-head", str(a.n_head),
                           "--vocab", str(a.vocab), "--n-ctx", str(a.n_ctx)])
    policy = floor.LM(fa).eval()
    heads, dim, prompts_n, rows = a.n_head, a.n_embd // a.n_head, a.batch // a.group, a.batch
    P, R = a.prompt_len, a.new_tokens

    def rollout(g: torch.Generator) -> float:
        prompts = torch.randint(4, a.vocab, (prompts_n, P), generator=g)
        start = time.perf_counter()
        with torch.inference_mode():
            pre = [(torch.empty(prompts_n, heads, P, dim), torch.empty(prompts_n, heads, P, dim))
                   for _ in range(a.n_layer)]
            last = policy.body(prompts, pre, 0)[:, -1]
            caches = []
            for kp, vp in pre:  # row i * group + j continues prompt i
                kc, vc = torch.empty(rows, heads, P + R, dim), torch.empty(rows, heads, P + R, dim)
                kc.view(prompts_n, a.group, heads, P + R, dim)[:, :, :, :P] = kp.unsqueeze(1)
                vc.view(prompts_n, a.group, heads, P + R, dim)[:, :, :, :P] = vp.unsqueeze(1)
                caches.append((kc, vc))
            logits = policy.head(last).repeat_interleave(a.group, 0)
            tokens, logprobs = torch.empty(rows, R, dtype=torch.long), torch.empty(rows, R)
            for i in range(R):
                logp = torch.log_softmax(logits / a.temperature, dim=-1)
                cdf = logp.exp().cumsum(-1)
                token = torch.searchsorted(cdf, torch.rand(rows, 1, generator=g) * cdf[:, -1:]).clamp_(max=a.vocab - 1)
                tokens[:, i : i + 1] = token
                logprobs[:, i] = logp.gather(1, token).squeeze(1)
                if i + 1 < R:
                    logits = policy.head(policy.body(token, caches, P + i)[:, -1])
        return time.perf_counter() - start

    return rollout


def quartet_loop(a, lean: bool, compiled: bool = False) -> Callable[[torch.Generator], float]:
    """Quartet's sampler on a GPT2LMHeadModel of the same shape; `lean=False` decodes through the forward,
    `compiled` with the compiled decode step."""
    from transformers import GPT2LMHeadModel

    import quartet.rollout.generate as generate
    from quartet.config import SamplingConfig
    from quartet.models.compiled_decode import CompiledDecoder

    tokenizer = word_tokenizer(a.vocab)
    model = GPT2LMHeadModel(gpt2_config(a, tokenizer)).eval()
    cfg = SamplingConfig(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, temperature=a.temperature)
    lean_step = generate.lean_decode_step
    decoder = CompiledDecoder(model, note=lambda text: None) if compiled else None

    def rollout(g: torch.Generator) -> float:
        prompts = torch.randint(4, a.vocab, (a.batch // a.group, a.prompt_len), generator=g)
        with torch.no_grad():  # an update changed the weights (the compiled loop repacks them)
            for parameter in model.parameters():
                parameter.add_(0.0)
        generate.lean_decode_step = lean_step if lean else (lambda model: None)
        try:
            start = time.perf_counter()
            generate.sample_responses(model, prompts, torch.ones_like(prompts), cfg, tokenizer.eos_token_id,
                                      tokenizer.pad_token_id, generator=g, n=a.group, decoder=decoder)
            return time.perf_counter() - start
        finally:
            generate.lean_decode_step = lean_step

    rollout.decoder = decoder
    rollout.model = model
    return rollout


def projection_gflop(a) -> float:
    """GFLOP of one rollout's decode-step matrix products (projections and LM head; attention left out)."""
    per_row_token = 2 * (a.n_layer * 12 * a.n_embd ** 2 + a.n_embd * a.vocab)
    return per_row_token * a.batch * (a.new_tokens - 1) / 1e9


def peak_gflops(threads: int) -> float:
    """GFLOP/s of a 1024x1024x1024 float32 product: what these cores reach on a large matrix product."""
    x, w = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        x @ w
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        x @ w
    return 2 * 1024 ** 3 * reps / (time.perf_counter() - start) / 1e9


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.batch % a.group:
        raise SystemExit(f"error: --batch {a.batch} is not a multiple of --group {a.group}")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    loops = {"quartet": quartet_loop(a, lean=True)}
    if not a.no_forward:
        loops["quartet_forward"] = quartet_loop(a, lean=False)
    if a.compiled:
        loops["quartet_compiled"] = quartet_loop(a, lean=True, compiled=True)
    if not a.no_floor:
        loops["floor"] = floor_loop(a)
    g = torch.Generator().manual_seed(1)
    compile_start = time.perf_counter()
    for name, run in loops.items():  # warm-up (and the compilation)
        if name == "quartet_compiled":
            compile_start = time.perf_counter()
        run(g)
        if name == "quartet_compiled":
            compile_s = time.perf_counter() - compile_start
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(a.rounds):
        for name, run in loops.items():
            times[name].append(run(g) * 1e3)
    result = {"config": {k: v for k, v in vars(a).items() if k not in ("no_floor", "no_forward", "compiled")},
              "ms_per_rollout_median": {n: statistics.median(t) for n, t in times.items()},
              "ms_per_rollout_min": {n: min(t) for n, t in times.items()}}
    medians = result["ms_per_rollout_median"]
    result["tokens_per_s"] = {n: a.batch * a.new_tokens / (ms / 1e3) for n, ms in medians.items()}
    result["projection_gflops"] = {n: projection_gflop(a) / (ms / 1e3) for n, ms in medians.items()}
    result["peak_gflops"] = peak_gflops(a.threads)
    ours = [n for n in medians if n != "floor"]
    if "floor" in medians:
        result["over_floor"] = {n: medians[n] / medians["floor"] for n in ours}
    if "quartet_forward" in medians:
        result["lean_over_forward"] = medians["quartet"] / medians["quartet_forward"]
    if "quartet_compiled" in medians:
        result["compile_s"] = compile_s
        result["compiled_over_eager"] = medians["quartet_compiled"] / medians["quartet"]
        if "floor" in medians:
            result["floor_tokens_per_s_speedup"] = medians["floor"] / medians["quartet_compiled"]
    print(json.dumps(result))
    return result

if __name__ == "__main__":
    main()
