#!/usr/bin/env python3
"""Seconds per PPO step of Quartet's real PPO stage on the shapes of benchmarks/floors/bare_ppo_floor.py.

The models are built from config (GPT-2 architecture, 4 layers, width 256, 4 heads, vocabulary
4096, context 256: four models of 4.27 M parameters), prompts are 16 tokens, responses exactly
`--new-tokens` tokens (EOS suppressed), 32 rollouts per step, mini-batch 8, temperature 0.7, fp32.
The step is `quartet ppo`'s own code path (`run_rl`), not a special one.

    python -m benchmarks.ppo_step                       # config A: 4 PPO epochs, 32 new tokens
    python -m benchmarks.ppo_step --ppo-epochs 1        # config B
    python -m benchmarks.ppo_step --ppo-epochs 1 --new-tokens 128   # config C
    python -m benchmarks.ppo_step --table               # A, B, C, each beside the anchors (see compare.py)

The last stdout line is one JSON object: median seconds per step and its split into generation,
scoring and update, generated tokens per second, peak RSS, model FLOPs per step, achieved GFLOP/s,
and the fp32 matrix-product GFLOP/s of this machine measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path


def model_arguments(description: str | None) -> argparse.ArgumentParser:
    """A benchmark's argument parser with the anchors' GPT-2 shape flags (shared by the benchmarks)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--n-ctx", type=int, default=256)
    p.add_argument("--activation", default="gelu_pytorch_tanh",
                   help="GPT2Config.activation_function, as in the anchors: gelu_pytorch_tanh is one fused kernel, "
                        "the same math as stock GPT-2's gelu_new (five kernels)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = model_arguments(__doc__)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--mini-batch", type=int, default=8)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=25, help="PPO steps, warm-up included")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--compile-rollout", action="store_true",
                   help="rollout.compile: compiled decode steps (the old log-probs are then recomputed)")
    p.add_argument("--max-staleness", type=int, default=None,
                   help="rollout.max_staleness: asynchronous RL, a producer process sampling k updates behind "
                        "(benchmarks/async_rl.py compares them)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="train.bf16: bf16 autocast (measures the option)")
    p.add_argument("--compile", action="store_true", help="train.compile: torch.compile the update's forward "
                   "(the warm-up step absorbs the compile; use --warmup 1 or more)")
    p.add_argument("--forward-batch-size", type=int, help="batch.forward_batch_size: rows per scoring forward "
                   "(default: the training micro-batch)")
    p.add_argument("--shared-trunk", action="store_true", help="models.shared_trunk: the critic as a value head on the "
                   "actor's trunk (measures the option; changes the algorithm)")
    p.add_argument("--workdir", help="where the models and the run go (default: a temporary directory)")
    return p.parse_args(argv)


def word_tokenizer(vocab: int):
    """A word-level tokenizer with `vocab` entries: 'w17' is one token, so prompt lengths are exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    words = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(vocab - len(specials))])}
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_models(a: argparse.Namespace, root: Path) -> tuple[Path, Path, list[str]]:
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    from quartet.models.loading import save_model

    tokenizer = word_tokenizer(a.vocab)
    config = gpt2_config(a, tokenizer)
    import torch

    torch.manual_seed(a.seed)
    save_model(GPT2LMHeadModel(config), tokenizer, root / "actor")
    reward_config = GPT2Config(**{**config.to_dict(), "num_labels": 1})
    save_model(GPT2ForSequenceClassification(reward_config), tokenizer, root / "reward")
    return root / "actor", root / "reward", word_prompts(a)


def gpt2_config(a: argparse.Namespace, tokenizer):
    """The anchors' GPT-2 (the shape flags of `model_arguments`) with the word tokenizer's special ids."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=a.vocab, n_positions=a.n_ctx, n_embd=a.n_embd, n_layer=a.n_layer, n_head=a.n_head,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      bos_token_id=tokenizer.eos_token_id, activation_function=a.activation)


def word_prompts(a: argparse.Namespace, count: int = 256) -> list[str]:
    """`count` seeded prompts of exactly `a.prompt_len` ordinary words (never a special token)."""
    rng = random.Random(a.seed)
    return [" ".join(f"w{rng.randrange(a.vocab - 3)}" for _ in range(a.prompt_len)) for _ in range(count)]


def matmul_gflops(n: int = 1024, seconds: float = 2.0) -> float:
    """fp32 matrix-product throughput of this process's threads."""
    import torch

    x, y = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        x @ y
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x @ y
        done += 1
    return 2 * n**3 * done / (time.perf_counter() - start) / 1e9


def model_flops_per_step(a: argparse.Namespace, params_no_embed: int) -> dict[str, float]:
    """Dense-layer FLOPs of one step (2 per multiply-add; attention scores and softmax included)."""
    b, p, r = a.batch, a.prompt_len, a.new_tokens
    t = p + r
    lm_head = a.n_embd * a.vocab
    attn_per_token = lambda ctx: 2 * 2 * a.n_layer * a.n_embd * ctx  # noqa: E731  (QK^T and AV)
    body = 2 * params_no_embed
    # generation: prefill the prompt, then one token at a time over the cache; LM head on the last position only
    gen = b * (p * body + sum(attn_per_token(p + i) for i in range(r)) + r * body + r * 2 * lm_head)
    # scoring: reference (LM head on response positions), critic and reward (a 1-wide head) over prompt + response
    seq_body = b * t * body + b * t * attn_per_token(t) / 2
    scoring = 3 * seq_body + b * r * 2 * lm_head
    # update: actor (LM head on response positions) and critic, forward + backward = 3x forward
    update = a.ppo_epochs * 3 * (2 * seq_body + b * r * 2 * lm_head)
    return {"generation": gen, "scoring": scoring, "update": update, "total": gen + scoring + update}


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    os.environ.setdefault("QUARTET_PROGRESS", "0")
    import torch

    torch.set_num_threads(a.threads)
    from quartet.config import RLConfig, build_config
    from quartet.runs.metrics import read_metrics
    from quartet.stages.rl import run_rl

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.workdir or tmp)
        actor, reward, prompts = build_models(a, root)
        (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        cfg = build_config(RLConfig, {
            "run": {"output_dir": str(root / "run"), "seed": a.seed},
            "models": {"actor": str(actor), "reward": str(reward), "critic_init": "reward", "shared_trunk": a.shared_trunk},
            "data": {"train": str(root / "prompts.jsonl"), "max_prompt_length": a.prompt_len},
            "rollout": {"max_new_tokens": a.new_tokens, "min_new_tokens": a.new_tokens, "temperature": a.temperature,
                        "compile": a.compile_rollout, "max_staleness": a.max_staleness},
            "batch": {"rollout_batch_size": a.batch, "mini_batch_size": a.mini_batch, "ppo_epochs": a.ppo_epochs,
                      "forward_batch_size": a.forward_batch_size},
            "train": {"steps": a.steps, "log_every": 1, "sample_every": 10**9, "n_samples": 0, "bf16": a.bf16,
                      "compile": a.compile},
        })
        run_rl(cfg)
        records = read_metrics(root / "run" / "metrics.jsonl")[a.warmup:]
        params_no_embed = sum(p.numel() for n, p in _actor_body(actor))
    median = lambda key: statistics.median(r[key] for r in records)  # noqa: E731
    flops = model_flops_per_step(a, params_no_embed)
    step = median("time/step")
    result = {
        "bench": "quartet_ppo",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": {k: getattr(a, k) for k in ("n_layer", "n_embd", "n_head", "vocab", "n_ctx", "activation", "prompt_len", "batch",
                                              "mini_batch", "ppo_epochs", "new_tokens", "steps", "warmup", "seed",
                                              "bf16", "compile", "forward_batch_size", "shared_trunk")},
        "sec_per_step_median": step,
        "max_staleness": a.max_staleness,
        "rollout_wait_sec_median": median("time/rollout_wait") if a.max_staleness is not None else None,
        "sec_per_step_all": [round(r["time/step"], 4) for r in records],
        "phase_sec_median": {"generation": median("time/generation"), "scoring": median("time/scoring"),
                             "update": median("time/training")},
        "gen_tokens_per_s": a.batch * a.new_tokens / median("time/generation"),
        "e2e_tokens_per_s": a.batch * a.new_tokens / step,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "model_gflop_per_step": flops["total"] / 1e9,
        "model_gflop_per_step_by_phase": {k: v / 1e9 for k, v in flops.items() if k != "total"},
        "achieved_gflops": flops["total"] / 1e9 / step,
        "machine_matmul_gflops": matmul_gflops(),
    }
    print(json.dumps(result))
    return result


def _actor_body(actor_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(actor_dir))
    return [(n, p) for n, p in model.named_parameters() if "wte" not in n and "wpe" not in n]


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
