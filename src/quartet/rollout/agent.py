"""Episodes for online RL: the configured environment (or tools) opened per sample, and sampled.

`AgentRollout` is what the experience maker calls instead of the one-answer sampler when
`rollout.env` or `rollout.tools` is set: it opens one environment per sample (the samples of one
prompt face the same seeded draw: their episode seed is the prompt's), gives a prompt the first
message its environment's `reset` returned (rendered with the chat template and the tools'
schemas), and runs the episodes on the kept KV cache (`rollout/episodes.py`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quartet.config import RolloutConfig, SamplingConfig
from quartet.data import collate_prompts
from quartet.envs import Episode, EpisodeRunner, ToolBox, load_environment, load_tools, tool_environment
from quartet.models.compiled_decode import CompiledDecoder
from quartet.rollout.episodes import EpisodeLimits, EpisodeRecord, ObservationRenderer, sample_episodes
from quartet.rollout.generate import Rollout

__all__ = ["AgentRollout", "episode_metrics"]


class _Driver:
    """The episode loop's view of a batch of opened episodes: rows of this batch -> environment steps."""

    def __init__(self, runner: EpisodeRunner, episodes: list[Episode]):
        self.runner, self.episodes = runner, episodes

    def step(self, rows: list[int], actions: list[str]):
        return self.runner.step([self.episodes[r] for r in rows], actions)


class AgentRollout:
    """The environment side of a run's episodes: its runner, the observation renderer, the limits."""

    def __init__(self, cfg: RolloutConfig, tokenizer: PreTrainedTokenizerBase, seed: int, max_prompt_length: int):
        self.cfg, self.tokenizer, self.max_prompt_length = cfg, tokenizer, max_prompt_length
        self.toolbox: ToolBox | None = None
        if cfg.tools:
            self.toolbox = ToolBox(load_tools(cfg.tools), tool_timeout=cfg.tool_timeout,
                                   max_concurrent_calls=cfg.max_concurrent_tools)
            factory, name = tool_environment(self.toolbox), "tools " + ",".join(self.toolbox.tools)
        else:
            factory, name = load_environment(cfg.env, "rollout.env"), cfg.env
        self.schemas = self.toolbox.schemas if self.toolbox else None
        self.runner = EpisodeRunner(factory, name=name, seed=seed, env_timeout=cfg.env_timeout)
        self.renderer = ObservationRenderer(tokenizer, cfg.max_observation_tokens)  # checks the template first
        self.limits = EpisodeLimits(cfg.max_turns, cfg.max_observation_tokens, cfg.max_episode_tokens)

    def first_prompt_ids(self, message: str) -> list[int]:
        """A reset's first user message as prompt ids (the chat template, with the tools' schemas)."""
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": message}], tools=self.schemas,
                                                  tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][-self.max_prompt_length:]

    def generate(self, model: PreTrainedModel, rows: list[tuple[list[int], dict[str, Any]]], step: int,
                 first_row: int, n: int, generator: torch.Generator | None, row_offset: int, total_rows: int,
                 device: torch.device, sampling: SamplingConfig | None = None, decoder: CompiledDecoder | None = None
                 ) -> tuple[Rollout, list[EpisodeRecord]]:
        """`n` episodes for each of these prompt rows (their ids and dataset columns); `first_row` is the
        first row's index among all prompts drawn in the run (its episodes' seed). `sampling` (default: the
        rollout's) may switch to greedy decoding for evaluation; `decoder` runs decode steps compiled."""
        episodes = self.runner.start(step, [columns for _, columns in rows for _ in range(n)],
                                     [first_row + i for i in range(len(rows)) for _ in range(n)])
        prompt_ids = []
        for i, (ids, _) in enumerate(rows):
            firsts = {episodes[i * n + j].first_message for j in range(n)}
            if len(firsts) > 1:
                raise ValueError(f"environment {self.runner.name}: reset gave the {n} samples of prompt row "
                                 f"{first_row + i} different first messages; draw randomness from the `rng` Quartet "
                                 "passes, so that a prompt's samples face the same episode")
            first = firsts.pop()
            prompt_ids.append(ids if first is None else self.first_prompt_ids(first))
        batch = collate_prompts([{"input_ids": ids} for ids in prompt_ids], self.tokenizer.pad_token_id)
        return sample_episodes(model, self.tokenizer, batch["input_ids"].to(device),
                               batch["attention_mask"].to(device), sampling or self.cfg, self.limits,
                               _Driver(self.runner, episodes), self.renderer, generator=generator,
                               row_offset=row_offset, total_rows=total_rows, n=n, decoder=decoder)

    def tool_counts(self) -> dict[str, float]:
        """The tools' counts so far (cumulative over the run)."""
        return self.toolbox.stats.metrics() if self.toolbox else {}

    def close(self) -> None:
        self.runner.close()


def episode_metrics(records: list[EpisodeRecord]) -> dict[str, float]:
    """Sums over these episodes (divide by `episodes/count` for means): turns, environment reward, how they
    ended, observations cut; and the largest turn count (`turns/max`)."""
    out = {"episodes/count": float(len(records)), "turns/sum": float(sum(r.turns for r in records)),
           "turns/max": float(max((r.turns for r in records), default=0)),
           "env/reward_sum": float(sum(r.env_reward for r in records)),
           "episodes/observations_cut": float(sum(r.observations_cut for r in records))}
    for reason in ("done", "max_turns", "length", "budget"):
        out[f"episodes/ended_{reason}"] = float(sum(r.ended == reason for r in records))
    return out
