#!/usr/bin/env python3
"""Seconds per GRPO step of Quartet's real online-RL stage on the GRPO shapes of benchmarks/floors/bare_grpo_floor.py.

The step is `quartet grpo`'s own code path (`run_rl` with algorithm.name grpo), not a special one,
on the shapes of `bare_grpo_floor.py` and `trl_grpo_bench.py`: a GPT-2 built from config (4
layers, width 256, 4 heads, vocabulary 4096, context 256: 4.27 M parameters) as the policy and,
saved once and loaded twice, the frozen reference; 8 prompts x 8 samples = 64 completions per step
of exactly `--new-tokens` tokens (EOS suppressed), 16-token prompts, temperature 0.7.

The arithmetic is the anchors': group-normalised advantages (r - mean_g) / (std_g + 1e-4) with the
unbiased std; the clipped ratio (0.2) against the sampling log-probs (one update per rollout, so
the ratio is 1); KL as a loss term, beta 0.04 x the k3 estimate against the reference, which
therefore runs; TRL's default "dapo" aggregation (`algorithm.loss_aggregation token-mean` over
the one mini-batch of 64: the token sum over the step's completion tokens); micro-batches of 16
(grad_accum 4), lr 1e-6, AdamW without weight decay, one optimizer step per round, gradients
clipped at 1.0 (as TRL; compare with the floor's `--max-grad-norm 1.0`). The reward is the
anchors' rule: the fraction of completion tokens whose id is below vocab/2.

Where it differs from the anchors: the reward function reads decoded texts (Quartet's reward
functions take prompts and responses as strings; a few ms per step); prompts are exactly
`--prompt-len` tokens (as the floor; TRL draws 8-16); the rows are shuffled by whole groups when
prompts are shared (the same numbers, another order); Quartet leaves the last position out of
its reference and training forwards (nothing reads its logits), so it runs one position fewer
than the floor per row. With `--share-prompts on` (the default for GRPO) the reference and
training forwards compute each prompt once per group; `off` computes it once per row, as the
floor and TRL do.

    python -m benchmarks.grpo_step                          # config D
    python -m benchmarks.grpo_step --share-prompts off      # D, each prompt computed per row
    python -m benchmarks.grpo_step --prompt-len 128         # config E

The last stdout line is one JSON object, with the fields of ppo_step.py: median seconds per step
and its split into generation, scoring and update, generated tokens per second, peak RSS, model
FLOPs per step (of the path that ran: shared prompts count once per group), achieved GFLOP/s and
the fp32 matrix-product GFLOP/s of this machine measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.ppo_step import _actor_body, gpt2_config, matmul_gflops, model_arguments, word_prompts, word_tokenizer  # noqa: E501

# The word-level tokenizer's specials come first (<pad>, <eos>, <unk>): "w17" is id 20.
N_SPECIAL = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = model_arguments(__doc__)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--num-generations", type=int, default=8, help="samples per prompt (rollout.n)")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=25, help="GRPO steps, warm-up included")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--share-prompts", choices=("on", "off"), default="on",
                   help="batch.share_prompts: each prompt computed once per group in the reference and training "
                        "forwards (on, Quartet's default for GRPO) or once per row (off, as the anchors)")
    p.add_argument("--compile-rollout", action="store_true",
                   help="rollout.compile: compiled decode steps (the old log-probs are then recomputed)")
    p.add_argument("--reward-latency", type=float, default=0.0,
                   help="seconds the reward function waits per batch, as a remote judge would")
    p.add_argument("--max-staleness", type=int, default=None,
                   help="rollout.max_staleness: asynchronous RL, a producer process sampling k updates behind "
                        "(benchmarks/async_rl.py compares them)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="where the model and the run go (default: a temporary directory)")
    return p.parse_args(argv)


def low_half_reward(prompts: list[str], responses: list[str], *, vocab: int, new_tokens: int,
                    latency: float = 0.0) -> list[float]:
    """The anchors' rule: the fraction of the completion's tokens whose id is below vocab / 2; after
    `latency` seconds (a stand-in for a remote judge or reward server).

    Responses are decoded without special tokens; those ids (0..2) are all below vocab / 2, so
    counting the high words out of the fixed length gives the anchors' number exactly.
    """
    half = vocab // 2
    time.sleep(latency)
    return [(new_tokens - sum(int(w[1:]) + N_SPECIAL >= half for w in r.split())) / new_tokens for r in responses]


def build_actor(a: argparse.Namespace, root: Path) -> tuple[Path, list[str]]:
    import torch
    from transformers import GPT2LMHeadModel

    from quartet.models.loading import save_model

    tokenizer = word_tokenizer(a.vocab)
    config = gpt2_config(a, tokenizer)
    torch.manual_seed(a.seed)
    save_model(GPT2LMHeadModel(config), tokenizer, root / "actor")
    return root / "actor", word_prompts(a)


def model_flops_per_step(a: argparse.Namespace, params_no_embed: int, shared: bool) -> dict[str, float]:
    """Dense-layer FLOPs of one step (2 per multiply-add; attention scores and their product included).

    Sampling prefills each prompt once (Quartet and the floor alike). The reference and training
    forwards run prompt + response but the last position; with `shared` the prompt positions count
    once per group instead of once per row. The LM head runs on response positions only.
    """
    g, n, p, r = a.prompts_per_step, a.num_generations, a.prompt_len, a.new_tokens
    b, t = g * n, p + r - 1
    lm_head = 2 * a.n_embd * a.vocab
    body = 2 * params_no_embed
    attn = lambda ctx: 2 * 2 * a.n_layer * a.n_embd * ctx  # noqa: E731  (QK^T and AV of one query over ctx keys)
    causal = lambda start, end: sum(attn(i + 1) for i in range(start, end))  # noqa: E731  (positions start..end-1)
    # the last sampled token is never fed back; the first one's logits come from the prefill's last position
    gen = g * (p * body + causal(0, p)) + b * ((r - 1) * body + causal(p, t)) + (g + b * (r - 1)) * lm_head
    prompt_rows = g if shared else b
    forward = prompt_rows * (p * body + causal(0, p)) + b * ((r - 1) * body + causal(p, t)) + b * r * lm_head
    reference = forward if a.beta else 0.0
    update = 3 * forward  # forward + backward
    return {"generation": gen, "scoring": reference, "update": update, "total": gen + reference + update}


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    os.environ.setdefault("QUARTET_PROGRESS", "0")
    import torch

    torch.set_num_threads(a.threads)
    from functools import partial

    from quartet.config import RLConfig, build_config
    from quartet.runs.metrics import read_metrics
    from quartet.stages.rl import run_rl

    batch = a.prompts_per_step * a.num_generations
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.workdir or tmp)
        actor, prompts = build_actor(a, root)
        (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        cfg = build_config(RLConfig, {
            "run": {"output_dir": str(root / "run"), "seed": a.seed},
            # the callable below takes this name's place (a benchmark is no importable module)
            "models": {"actor": str(actor), "reward_fn": "grpo_step:low_half_reward"},
            "data": {"train": str(root / "prompts.jsonl"), "max_prompt_length": a.prompt_len},
            "algorithm": {"name": "grpo", "beta": a.beta, "kl_estimator": "k3", "kl_penalty": "loss",
                          "loss_aggregation": "token-mean", "scale_rewards": "group", "advantage_eps": 1e-4,
                          "cliprange": 0.2},
            "rollout": {"n": a.num_generations, "max_new_tokens": a.new_tokens, "min_new_tokens": a.new_tokens,
                        "temperature": a.temperature, "compile": a.compile_rollout, "max_staleness": a.max_staleness},
            "batch": {"rollout_batch_size": batch, "mini_batch_size": batch, "grad_accum": batch // a.micro_batch,
                      "ppo_epochs": 1, "share_prompts": a.share_prompts == "on"},
            "optim": {"actor_lr": a.lr, "weight_decay": 0.0, "max_grad_norm": a.max_grad_norm},
            "train": {"steps": a.steps, "log_every": 1, "sample_every": 10**9, "n_samples": 0},
        })
        run_rl(cfg, reward_fn=partial(low_half_reward, vocab=a.vocab, new_tokens=a.new_tokens, latency=a.reward_latency))
        records = read_metrics(root / "run" / "metrics.jsonl")[a.warmup:]
        params_no_embed = sum(p.numel() for n, p in _actor_body(actor))
    median = lambda key: statistics.median(r[key] for r in records)  # noqa: E731
    flops = model_flops_per_step(a, params_no_embed, shared=a.share_prompts == "on")
    step = median("time/step")
    result = {
        "bench": "quartet_grpo",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": {k: getattr(a, k) for k in ("n_layer", "n_embd", "n_head", "vocab", "n_ctx", "activation", "prompt_len",
                                              "prompts_per_step", "num_generations", "micro_batch", "new_tokens",
                                              "steps", "warmup", "seed", "beta", "lr", "max_grad_norm",
                                              "share_prompts", "reward_latency")},
        "sec_per_step_median": step,
        "max_staleness": a.max_staleness,
        "rollout_wait_sec_median": median("time/rollout_wait") if a.max_staleness is not None else None,
        "sec_per_step_all": [round(r["time/step"], 4) for r in records],
        "phase_sec_median": {"generation": median("time/generation"), "scoring": median("time/scoring"),
                             "update": median("time/training")},
        "gen_tokens_per_s": batch * a.new_tokens / median("time/generation"),
        "e2e_tokens_per_s": batch * a.new_tokens / step,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "model_gflop_per_step": flops["total"] / 1e9,
        "model_gflop_per_step_by_phase": {k: v / 1e9 for k, v in flops.items() if k != "total"},
        "achieved_gflops": flops["total"] / 1e9 / step,
        "machine_matmul_gflops": matmul_gflops(),
        "kl_logged": [r.get("kl/ref") for r in records],
        "response_length": [r["response/length"] for r in records],
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
