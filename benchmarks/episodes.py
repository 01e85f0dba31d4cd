#!/usr/bin/env python3
"""Milliseconds per batch of T-turn episodes beside a one-turn rollout of as many model tokens, in one process.

An episode keeps its KV cache across turns: each observation is prefilled onto it, never the
whole history again. This times `sample_episodes` (T turns of `--turn-tokens` model tokens, an
observation of `--observation-tokens` tokens after each turn but the last, from an environment
that answers at once) against `sample_responses` sampling T x `--turn-tokens` tokens in one turn,
alternating, `--rounds` times, on a GPT2LMHeadModel of the anchors' shape (4 x 256). Turns end
at exactly their length: EOS is blocked before it and made near-certain at it.

The observations' tokens are work the one-turn rollout does not do, and at small shapes a
chunk of them costs several decode steps. A third loop therefore samples the same model tokens
in one turn after a prompt longer by an episode's observation tokens: the same tokens through
the model, the observations prefilled with the prompt. `episodes / one turn, observations in the
prompt` is the cost of the turns themselves (the kept cache, one prefill per observation, the
environment's round trips); `episodes / one turn` adds the observations' own forward passes.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.episodes                  # 4 turns of 8, 32 rows
    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.episodes --turns 8 --turn-tokens 16

The last stdout line is one JSON object: each loop's median and minimum ms per batch and the
ratios of the medians.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

import torch

from benchmarks.ppo_step import gpt2_config, model_arguments, word_tokenizer

# every message is its words and the end-of-turn token; the assistant's turn opens with nothing
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{% else %}"
                 "{{ ' ' + m['content'] + ' ' }}{% endif %}{{ eos_token }}{% endfor %}")


def parse_args(argv: list[str] | None = None):
    p = model_arguments(__doc__)
    p.set_defaults(n_ctx=1024)
    p.add_argument("--batch", type=int, default=32, help="episodes per batch")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--turn-tokens", type=int, default=8, help="model tokens per turn, its end-of-turn token included")
    p.add_argument("--observation-tokens", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@dataclass
class Answer:
    messages: list
    reward: float
    done: bool


class FixedObservation:
    """Answers every turn with the same observation; the episode loop ends it at its last turn."""

    def __init__(self, words: str):
        self.words = words

    def step(self, rows, actions):
        return [Answer([{"role": "user", "content": self.words}], 0.0, False) for _ in rows]


def main(argv: list[str] | None = None) -> dict:
    from transformers import GPT2LMHeadModel

    from quartet.config import SamplingConfig
    from quartet.rollout.episodes import EpisodeLimits, ObservationRenderer, sample_episodes
    from quartet.rollout.generate import sample_responses

    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tokenizer = word_tokenizer(a.vocab)
    tokenizer.chat_template = CHAT_TEMPLATE
    model = GPT2LMHeadModel(gpt2_config(a, tokenizer)).eval()
    bias = torch.zeros(a.vocab)
    bias[tokenizer.eos_token_id] = 30.0  # EOS as soon as min_new_tokens lets it through
    model.lm_head.register_forward_hook(lambda module, inputs, out: out + bias)
    generator = torch.Generator().manual_seed(a.seed)
    prompt_ids = torch.randint(3, a.vocab, (a.batch, a.prompt_len), generator=generator)
    prompt_mask = torch.ones_like(prompt_ids)
    k, turns = a.turn_tokens, a.turns
    per_turn = SamplingConfig(max_new_tokens=k, min_new_tokens=k - 1, temperature=1.0)
    one_turn = SamplingConfig(max_new_tokens=k * turns, min_new_tokens=k * turns - 1, temperature=1.0)
    observation = " ".join(f"w{i + 3}" for i in range(a.observation_tokens - 1))  # + its end-of-turn token
    renderer = ObservationRenderer(tokenizer, max_observation_tokens=a.observation_tokens)
    limits = EpisodeLimits(max_turns=turns, max_observation_tokens=a.observation_tokens)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def episodes() -> tuple[float, int]:
        t0 = time.perf_counter()
        rollout, records = sample_episodes(model, tokenizer, prompt_ids, prompt_mask, per_turn, limits,
                                           FixedObservation(observation), renderer,
                                           generator=torch.Generator().manual_seed(1))
        return time.perf_counter() - t0, int(rollout.action_mask.sum())

    observation_tokens = (turns - 1) * len(renderer.suffix([{"role": "user", "content": observation}]))
    long_prompt_ids = torch.randint(3, a.vocab, (a.batch, a.prompt_len + observation_tokens), generator=generator)

    def single(ids: torch.Tensor = prompt_ids) -> tuple[float, int]:
        t0 = time.perf_counter()
        rollout = sample_responses(model, ids, torch.ones_like(ids), one_turn, eos, pad,
                                   generator=torch.Generator().manual_seed(1))
        return time.perf_counter() - t0, int(rollout.response_mask.sum())

    loops = {"episodes": episodes, "one_turn": single, "one_turn_observations_in_prompt": lambda: single(long_prompt_ids)}
    for fn in loops.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in loops}
    tokens = {}
    names = list(loops)
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotated: each loop leads in turn
            seconds, tokens[name] = loops[name]()
            times[name].append(seconds * 1000)
    if len(set(tokens.values())) != 1:
        raise SystemExit(f"the loops sampled different numbers of model tokens: {tokens}")
    result = {name: {"median_ms": statistics.median(v), "min_ms": min(v)} for name, v in times.items()}
    result["model_tokens"] = tokens["episodes"]
    result["observation_tokens_per_episode"] = observation_tokens
    result["episodes/one_turn"] = result["episodes"]["median_ms"] / result["one_turn"]["median_ms"]
    result["episodes/one_turn_observations_in_prompt"] = (result["episodes"]["median_ms"]
                                                         / result["one_turn_observations_in_prompt"]["median_ms"])
    print(f"{turns} turns x {k} tokens + {observation_tokens} observation tokens, {a.batch} rows, "
          f"{a.n_layer}x{a.n_embd} (medians of {a.rounds}): episodes {result['episodes']['median_ms']:.1f} ms; "
          f"one turn of {k * turns} tokens {result['one_turn']['median_ms']:.1f} ms "
          f"({result['episodes/one_turn']:.3f}x); the same after a prompt holding the observations' tokens "
          f"{result['one_turn_observations_in_prompt']['median_ms']:.1f} ms "
          f"({result['episodes/one_turn_observations_in_prompt']:.3f}x)")
    print(json.dumps({"args": vars(a), **result}))
    return result


if __name__ == "__main__":
    main()
