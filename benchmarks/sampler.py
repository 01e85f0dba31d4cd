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

The last stdout line is one JSON object: each loop's median and minimum ms per rollout and the
ratios of the medians to the floor's loop (benchmarks/floors/bare_ppo_floor.py). `--no-floor` leaves
the floor out.
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


def quartet_loop(a, lean: bool) -> Callable[[torch.Generator], float]:
    """Quartet's sampler on a GPT2LMHeadModel of the same shape; `lean=False` decodes through the forward."""
    from transformers import GPT2LMHeadModel

    import quartet.rollout.generate as generate
    from quartet.config import SamplingConfig

    tokenizer = word_tokenizer(a.vocab)
    model = GPT2LMHeadModel(gpt2_config(a, tokenizer)).eval()
    cfg = SamplingConfig(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, temperature=a.temperature)
    lean_step = generate.lean_decode_step

    def rollout(g: torch.Generator) -> float:
        prompts = torch.randint(4, a.vocab, (a.batch // a.group, a.prompt_len), generator=g)
        generate.lean_decode_step = lean_step if lean else (lambda model: None)
        try:
            start = time.perf_counter()
            generate.sample_responses(model, prompts, torch.ones_like(prompts), cfg, tokenizer.eos_token_id,
                                      tokenizer.pad_token_id, generator=g, n=a.group)
            return time.perf_counter() - start
        finally:
            generate.lean_decode_step = lean_step

    return rollout


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.batch % a.group:
        raise SystemExit(f"error: --batch {a.batch} is not a multiple of --group {a.group}")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    loops = {"quartet": quartet_loop(a, lean=True), "quartet_forward": quartet_loop(a, lean=False)}
    if not a.no_floor:
        loops["floor"] = floor_loop(a)
    g = torch.Generator().manual_seed(1)
    for run in loops.values():  # warm-up
        run(g)
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(a.rounds):
        for name, run in loops.items():
            times[name].append(run(g) * 1e3)
    result = {"config": {k: v for k, v in vars(a).items() if k != "no_floor"},
              "ms_per_rollout_median": {n: statistics.median(t) for n, t in times.items()},
              "ms_per_rollout_min": {n: min(t) for n, t in times.items()}}
    medians = result["ms_per_rollout_median"]
    if "floor" in medians:
        result["over_floor"] = {n: medians[n] / medians["floor"] for n in ("quartet", "quartet_forward")}
    result["lean_over_forward"] = medians["quartet"] / medians["quartet_forward"]
    print(json.dumps(result))
    return result

if __name__ == "__main__":
    main()
