#!/usr/bin/env python3
"""Throughput and latency of `quartet serve reward` under concurrent clients.

Builds a reward model of a preset's shape (random weights: the numbers are the same work as a
trained one's), serves it with `python -m quartet serve reward` in its own process on 127.0.0.1,
and sends `--clients` concurrent clients x `--requests` requests of `--texts` texts each (OpenRLHF's
request shape). Reports texts per second and each request's p50/p99 latency, and, for reference,
the same texts scored in this process in batches of `--batch-size` (no HTTP). Not a timed test:
numbers depend on the machine and its load.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/reward_server.py
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/reward_server.py --preset tiny --clients 16 --batch-size 64

The last stdout line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the robot liked apples and bananas near the river bank while the quick brown fox jumped over "
         "the lazy dog and asked how to bake bread with flour water salt and yeast").split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="nano", help="reward model shape (nano, tiny, small; default nano)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=10, help="requests per client")
    p.add_argument("--texts", type=int, default=8, help="texts per request")
    p.add_argument("--words", type=int, default=48, help="words per text")
    p.add_argument("--batch-size", type=int, default=32, help="the server's --batch-size")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _texts(n: int, words: int, offset: int) -> list[str]:
    return [" ".join(WORDS[(offset + i + j) % len(WORDS)] for j in range(words)) for i in range(n)]


async def _client(url: str, client_id: int, args: argparse.Namespace, latencies: list[float]) -> int:
    import httpx

    async with httpx.AsyncClient(timeout=300) as http:
        for r in range(args.requests):
            texts = _texts(args.texts, args.words, client_id * 1000 + r)
            started = time.perf_counter()
            answer = await http.post(url, json={"query": texts, "prompts": [""] * len(texts)})
            latencies.append(time.perf_counter() - started)
            answer.raise_for_status()
            assert len(answer.json()["rewards"]) == len(texts)
    return args.requests * args.texts


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from quartet.models.loading import load_scalar_model, save_model
    from quartet.models.presets import build_preset_model
    from quartet.models.tokenizer import train_bpe_tokenizer
    from quartet.stages.reward import score_texts

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_bpe_tokenizer([" ".join(WORDS)] * 50, vocab_size=300)
        model_dir = Path(tmp) / "rm"
        save_model(build_preset_model(args.preset, tokenizer, seed=0, scalar=True), tokenizer, model_dir)

        all_texts = [t for c in range(args.clients) for r in range(args.requests)
                     for t in _texts(args.texts, args.words, c * 1000 + r)]
        model = load_scalar_model(model_dir, pad_token_id=tokenizer.pad_token_id, require_trained_head=True)
        started = time.perf_counter()
        with torch.no_grad():
            score_texts(model, tokenizer, all_texts, batch_size=args.batch_size)
        in_process = len(all_texts) / (time.perf_counter() - started)

        port = _free_port()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                            os.environ.get("PYTHONPATH", "")])}
        server = subprocess.Popen([sys.executable, "-m", "quartet", "serve", "reward", "--model", str(model_dir),
                                   "--port", str(port), "--batch-size", str(args.batch_size)], env=env)
        try:
            import httpx

            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the reward server did not start")
                time.sleep(0.2)

            async def load() -> tuple[int, float, list[float]]:
                latencies: list[float] = []
                started = time.perf_counter()
                counts = await asyncio.gather(*(_client(base + "/get_reward", c, args, latencies)
                                                for c in range(args.clients)))
                return sum(counts), time.perf_counter() - started, latencies

            asyncio.run(_client(base + "/get_reward", 0, argparse.Namespace(**{**vars(args), "requests": 2}), []))  # warm-up
            texts, seconds, latencies = asyncio.run(load())
            health = httpx.get(base + "/health").json()
        finally:
            server.terminate()
            server.wait(timeout=30)
    latencies.sort()
    result = {
        "preset": args.preset, "clients": args.clients, "requests_per_client": args.requests,
        "texts_per_request": args.texts, "words_per_text": args.words, "server_batch_size": args.batch_size,
        "texts_per_second": texts / seconds, "in_process_texts_per_second": in_process,
        "latency_p50_ms": 1000 * statistics.median(latencies),
        "latency_p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "server_batches": health["batches"], "texts_scored": health["texts_scored"],
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    print(f"reward server ({args.preset}): {result['texts_per_second']:.0f} texts/s over HTTP "
          f"({args.clients} clients x {args.requests} requests x {args.texts} texts); "
          f"in-process {in_process:.0f} texts/s; latency p50 {result['latency_p50_ms']:.0f} ms, "
          f"p99 {result['latency_p99_ms']:.0f} ms; {health['batches']} server batches")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
