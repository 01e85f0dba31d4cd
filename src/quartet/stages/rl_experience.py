"""Making experience for online RL: sample a step's rollouts, score them, shape the rewards.

Each rank samples and scores its share of the step's prompts (the rollout backend, the
reference, the critic, the reward source); the shares are gathered into the global batch, on
which the scores are shaped and the algorithm's estimator computes rewards and advantages,
identically on every rank. With dynamic sampling (DAPO) a step samples until its batch is full
of groups that carry a learning signal.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quartet.config import RLConfig, SamplingConfig
from quartet.data import collate_prompts
from quartet.data.schedule import PromptSchedule
from quartet.models.forward import in_row_chunks, scoring_rows, vocab_size
from quartet.models.policy import response_logprobs, response_values
from quartet.rl import (
    RunningMeanStd,
    groups_with_signal,
    overlong_penalty,
    per_token_rewards,
    place_turn_rewards,
    shape_scores,
    turn_end_positions,
)
from quartet.rl.algorithms import AdvantageInputs, Algorithm
from quartet.rl.experience import Experience, experience_metrics, score_part_metrics
from quartet.rl.offpolicy import behaviour_weights
from quartet.rollout.agent import AgentRollout, episode_metrics
from quartet.rollout.backend import make_rollout_backend
from quartet.rollout.episodes import EpisodeRecord
from quartet.rollout.generate import Rollout
from quartet.rollout.scored import ScoredRollout, concat
from quartet.rollout.texts import decode_texts
from quartet.runs.distributed import Ranks
from quartet.runs.faults import RewardServerDown, StepAbandoned
from quartet.runs.precision import autocast_context
from quartet.runs.seeds import STEP_MORE_ROLLOUTS, STEP_ROLLOUT, derive_seed

EVALUATION_STEP = 999_999  # the step of held-out episodes' seeds: the same environments at every evaluation
from quartet.scoring import MetricFn, RewardSource
from quartet.stages.rl_setup import PromptRow


@dataclass
class SampledShare:
    """One sampling round of this rank's prompts, generated and scored, before the trainer's forwards:
    what a rollout producer hands the trainer (asynchronous RL)."""

    rollout: Rollout
    group_ids: torch.Tensor  # [rows] the prompt each sample answers, among the round's prompts
    prompts: list[str] | None = None  # decoded texts, when something reads them
    responses: list[str] | None = None
    records: list[EpisodeRecord] | None = None  # multi-turn episodes
    scores: torch.Tensor | None = None  # [rows] raw scores (with the environment's rewards); None on a failure
    score_parts: dict[str, torch.Tensor] = field(default_factory=dict)
    failure: StepAbandoned | None = None  # the scoring failed (a reward server down): the step is abandoned


@dataclass
class ProducerRanks:
    """A rollout producer's view of its trainer's rank: which share of the prompts it samples; no collectives."""

    rank: int
    world: int
    device: torch.device
    fsdp: None = None

    share = Ranks.share

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.rank == 0:
            print(*args, **kwargs, flush=True)


@contextlib.contextmanager
def _actor_of(full_parameters: contextlib.AbstractContextManager) -> Iterator[PreTrainedModel]:
    with full_parameters as pair:
        yield pair.actor


class ExperienceMaker:
    """Turns the prompt stream into scored, shaped experience, one step at a time."""

    def __init__(self, cfg: RLConfig, algorithm: Algorithm, actor: PreTrainedModel, reference: PreTrainedModel | None,
                 reward: RewardSource, tokenizer: PreTrainedTokenizerBase, prompts: list[PromptRow], ranks: Ranks,
                 reward_stats: tuple[float, float] | None = None, metric_fns: Sequence[MetricFn] = (),
                 group_size: int = 1):
        b = cfg.batch
        self.cfg, self.algorithm, self.actor, self.reference, self.reward = cfg, algorithm, actor, reference, reward
        self.tokenizer, self.ranks, self.device = tokenizer, ranks, ranks.device
        self.reward_stats, self.metric_fns = reward_stats, list(metric_fns)
        # texts only for what reads them (reward functions, a reward model with its own tokenizer, metric
        # functions); sample tables decode their few rows when they are written
        self.needs_texts = reward.reads_text or bool(self.metric_fns)
        if cfg.algorithm.score_normalization == "stored" and reward_stats is None:
            raise ValueError("algorithm.score_normalization is 'stored' but the reward model has no stored "
                             "reward_mean/reward_std (train it with `quartet reward`, or use 'running')")
        self.prompts = PromptSchedule(prompts, b.rollout_batch_size // cfg.rollout.n, cfg.run.seed)
        self.prompt_position = 0  # prompts drawn so far (dynamic sampling draws more than one batch a step)
        self.running_scores = RunningMeanStd()
        # the training micro-batch on this rank: the fewest rows a scoring forward runs by default
        self.micro_rows = max(1, b.mini_batch_size // b.grad_accum // ranks.world)
        self.vocab_size = vocab_size(actor)
        self.pad_id = tokenizer.pad_token_id
        self.backend = make_rollout_backend(cfg.rollout.backend, tokenizer.eos_token_id, self.pad_id,
                                            compile=cfg.rollout.compile, note=ranks.print)
        self.uses_reference = cfg.algorithm.uses_reference
        # an off-policy correction weighs the trainer's old log-probs against the sampler's: it needs both
        self.correction = cfg.algorithm.offpolicy_correction
        self.recompute_logprobs = self.correction != "none" or not (cfg.rollout.logprobs_from_generation
                                                                     and self.backend.logprobs_match_trainer)
        self.group_size = group_size  # > 1: scoring forwards compute each group's prompt once
        # multi-turn episodes with an environment or tools, instead of one answer per prompt
        self.agent = (AgentRollout(cfg.rollout, tokenizer, cfg.run.seed, cfg.data.max_prompt_length)
                      if cfg.rollout.episodes else None)
        self.records: list[EpisodeRecord] = []  # this rank's episodes of the step, for metrics
        self.trained: torch.nn.Module | None = None  # the trained models, as wrapped, during make()
        self.step, self.beta = 0, 0.0
        self.offpolicy_stats: dict[str, float] = {}  # the last batch's importance weights (with a correction)
        self.producing = False  # True in a rollout producer's process: it samples with its own copy of the actor
        self.producer: Any = None  # asynchronous RL: the trainer's handle on its rollout producer

    def step_generator(self, purpose: int) -> torch.Generator:
        """Random numbers of one step, the same on every rank and after a resume."""
        return torch.Generator(device=self.device).manual_seed(derive_seed(self.cfg.run.seed, "step", self.step, purpose))

    def reference_context(self):
        """With LoRA and no separate reference, the reference is the actor with adapters off."""
        return self.actor.disable_adapter() if self.reference is None else contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        return {"prompt_position": self.prompt_position, "running_scores": self.running_scores.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # checkpoints from before groups and dynamic sampling drew one batch of prompts per step
        self.prompt_position = state.get("prompt_position", state["step"] * self.cfg.batch.rollout_batch_size)
        self.running_scores.load_state_dict(state["running_scores"])

    @torch.no_grad()
    def make(self, trained: torch.nn.Module, step: int, beta: float) -> tuple[Experience, dict[str, float]]:
        """Sample and score step `step`'s batch with the trained models `trained` (each rank its share,
        then gathered: the global batch), and turn it into the algorithm's rewards and advantages
        (KL coefficient `beta`), identically on every rank. With a rollout producer (asynchronous RL)
        the batch comes from it, sampled by the policy of step `step - k`."""
        self.trained, self.step, self.beta = trained, step, beta
        timings = {"time/generation": 0.0, "time/scoring": 0.0}
        tools_before, self.records = self.agent.tool_counts() if self.agent else {}, []
        position, extra = self.prompt_position, {}
        try:
            if self.producer is not None:
                produced = self.producer.batch_for(step, trained)
                self.records = [r for share in produced.shares for r in share.records or ()]
                timings.update(produced.timings)
                batch, sampling = self._sample_batch(timings, produced.shares)
                self.prompt_position, tool_calls = produced.prompt_position, produced.tool_calls
                extra = produced.metrics(step)
            else:
                batch, sampling = self._sample_batch(timings)
                tool_calls = self._tool_calls_since(tools_before)
        except StepAbandoned:  # e.g. the reward server is down: the step is redone from the same prompts
            self.prompt_position = position
            raise
        t0 = time.perf_counter()
        exp = self._experience(batch)
        timings["time/scoring"] += time.perf_counter() - t0
        metrics = {**experience_metrics(exp, batch.has_eos, beta), **sampling, **timings, **self.offpolicy_stats,
                   **extra, **score_part_metrics(batch.score_parts, self.verifiers)}
        for metric_fn in self.metric_fns:
            metrics.update(metric_fn(exp.prompts, exp.responses))
        if self.agent:
            metrics.update(self._episode_metrics(self.records, tool_calls))
        return exp, metrics

    # ------------------------------------------------------------------ asynchronous RL (stages/rl_async.py)

    def actor_state(self, trained: torch.nn.Module) -> dict[str, torch.Tensor]:
        """A copy of the trained actor's weights on CPU: what a rollout producer samples with."""
        with self.ranks.full_parameters(trained, "actor") as pair:
            return {k: v.detach().to("cpu", copy=True) for k, v in pair.actor.state_dict().items()}

    def producer_copy(self) -> "ExperienceMaker":
        """What a rollout producer's process needs, to be pickled by value into it: the actor (its
        weights as they are; the producer loads the version it samples with), the tokenizer, the reward
        source, the prompt schedule, the settings. Not the trainer's wrapped models, the reference, the
        metric functions (the trainer applies them), the ranks' process groups, threads or compiled code."""
        copy_ = copy.copy(self)
        copy_.trained = copy_.reference = copy_.producer = copy_.agent = copy_.backend = None
        copy_.metric_fns, copy_.records = [], []
        copy_.ranks = ProducerRanks(self.ranks.rank, self.ranks.world, self.device)
        return copy_

    def become_producer(self, prompt_position: int) -> None:
        """In a rollout producer's process: sample with this process's copy of the actor, from
        `prompt_position` in the prompt schedule; the backend and the environment's runner made here."""
        self.producing, self.prompt_position = True, prompt_position
        self.backend = make_rollout_backend(self.cfg.rollout.backend, self.tokenizer.eos_token_id, self.pad_id,
                                            compile=self.cfg.rollout.compile, note=self.ranks.print)
        if self.cfg.rollout.episodes:
            self.agent = AgentRollout(self.cfg.rollout, self.tokenizer, self.cfg.run.seed, self.cfg.data.max_prompt_length)

    def produce(self, step: int) -> tuple[dict[str, float], dict[str, float], list[SampledShare]]:
        """A producer's step: this step's sampling rounds, sampled and scored; their timings and tool calls."""
        self.step, self.records = step, []
        timings = {"time/generation": 0.0, "time/scoring": 0.0}
        before = self.agent.tool_counts() if self.agent else {}
        with torch.no_grad():
            shares = self.produce_rounds(timings)
        return timings, self._tool_calls_since(before), shares

    def _tool_calls_since(self, before: dict[str, float]) -> dict[str, float]:
        """This rank's tool counts since `before` (the agent's counts are cumulative)."""
        now = self.agent.tool_counts() if self.agent else {}
        return {k: now[k] - before.get(k, 0.0) for k in sorted(now)}

    def _episode_metrics(self, records: list[EpisodeRecord], tool_calls: dict[str, float]) -> dict[str, float]:
        """Turns, environment reward, how episodes ended (shares), and the tool calls, over all ranks."""
        sums = episode_metrics(records)
        keys = sorted(k for k in sums if k != "turns/max")
        totals = dict(zip(keys, self.ranks.sum_floats([sums[k] for k in keys])))
        count = max(totals.pop("episodes/count"), 1.0)
        out = {"turns/mean": totals.pop("turns/sum") / count, "env/reward": totals.pop("env/reward_sum") / count,
               "turns/max": self.ranks.max_float(sums["turns/max"])}
        out.update({k: v / count for k, v in totals.items()})
        names = sorted(tool_calls)
        out.update(dict(zip(names, self.ranks.sum_floats([tool_calls[k] for k in names]))))
        return out

    @property
    def verifiers(self) -> list[str]:
        """Names of the reward functions that say correct (1.0) or incorrect (0.0)."""
        return self.reward.functions.verifiers() if self.reward.functions else []

    def evaluate(self, trained: torch.nn.Module, rows: list[PromptRow], greedy_accuracy: bool = False
                 ) -> dict[str, float]:
        """One response per held-out prompt at the rollout's sampling settings (the same random draws at
        every evaluation, so steps compare), scored by the reward source and the metric functions:
        `eval/...` metrics. With `greedy_accuracy` and a verifier among the reward functions, also the
        verifiers' accuracy of greedy (argmax) responses: `greedy_eval/accuracy/<verifier>`."""
        metrics = self._evaluate(trained, rows, self.cfg.rollout, with_metric_fns=True)
        if greedy_accuracy and self.verifiers:
            greedy = self._evaluate(trained, rows, self.cfg.rollout.model_copy(update={"greedy": True}),
                                    with_metric_fns=False)
            metrics.update({f"greedy_eval/{k}": v for k, v in greedy.items() if k.startswith("accuracy/")})
        return {k if k.startswith("greedy_eval/") else f"eval/{k}": v for k, v in metrics.items()}

    @torch.no_grad()
    def _evaluate(self, trained: torch.nn.Module, rows: list[PromptRow], sampling: SamplingConfig,
                  with_metric_fns: bool) -> dict[str, float]:
        ranks, n_rows = self.ranks, len(rows)
        start, end = ranks.share(rows)
        batch = collate_prompts([{"input_ids": ids} for ids, _ in rows[start:end]], self.pad_id)
        generator = torch.Generator(device=self.device).manual_seed(derive_seed(self.cfg.run.seed, "evaluation"))
        tools_before = self.agent.tool_counts() if self.agent else {}  # this evaluation's calls are the difference
        with ranks.full_parameters(trained, "actor") as pair, autocast_context(self.device, self.cfg.train.bf16):
            self.backend.load_weights(pair.actor)
            if self.agent:  # the same episodes at every evaluation
                tools_before = self.agent.tool_counts()
                rollout, records = self.agent.generate(pair.actor, rows[start:end], EVALUATION_STEP, start, 1, generator,
                                                       start, n_rows, self.device, sampling=sampling,
                                                       decoder=self.backend.decoder)
            else:
                rollout = self.backend.generate(batch["input_ids"].to(self.device),
                                                batch["attention_mask"].to(self.device), sampling,
                                                generator=generator, row_offset=start, total_rows=n_rows)
        prompts, responses = decode_texts(self.tokenizer, rollout.prompt_ids, rollout.prompt_mask,
                                          rollout.response_ids, rollout.response_mask)
        names = sorted({k for _, columns in rows for k in columns})
        columns = {k: [c.get(k) for _, c in rows[start:end]] for k in names}
        if self.agent:
            responses, columns = self._episode_texts(records, columns)
        with autocast_context(self.device, self.cfg.train.bf16):
            scores, parts = self.reward(rollout, prompts, responses, None, columns)
        if self.agent:
            scores, parts = self._with_env_rewards(scores, parts, records, per_turn=False)
        scores, lengths = ranks.gather_rows(scores.float()), ranks.gather_rows(rollout.chosen_mask.sum(1).float())
        parts = {k: ranks.gather_rows(v) for k, v in sorted(parts.items())}
        prompts, responses = ranks.gather_objects(prompts), ranks.gather_objects(responses)
        metrics = {"score/mean": float(scores.mean()), "response/length": float(lengths.mean()),
                   **score_part_metrics(parts, self.verifiers)}
        for metric_fn in (self.metric_fns if with_metric_fns else ()):
            metrics.update(metric_fn(prompts, responses))
        if self.agent:
            metrics.update(self._episode_metrics(records, self._tool_calls_since(tools_before)))
        return metrics

    @staticmethod
    def _episode_texts(records: list[EpisodeRecord], columns: dict[str, list[Any]]
                       ) -> tuple[list[str], dict[str, list[Any]]]:
        """What reward functions read of episodes: the last model turn as the response, and the whole
        episode's messages as the `messages` column."""
        responses = [next((m["content"] for m in reversed(r.messages) if m["role"] == "assistant"), "") for r in records]
        return responses, {**columns, "messages": [r.messages for r in records]}

    def _with_env_rewards(self, scores: torch.Tensor, parts: dict[str, torch.Tensor], records: list[EpisodeRecord],
                          per_turn: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The environment's rewards added to the scores (unless they go to each turn), and logged as `env`."""
        env = torch.tensor([r.env_reward for r in records], dtype=scores.dtype, device=scores.device)
        return (scores if per_turn else scores + env), {**parts, "env": env}

    def _sample_batch(self, timings: dict[str, float], produced: list[SampledShare] | None = None
                      ) -> tuple[ScoredRollout, dict[str, float]]:
        """One sampling round of the step's prompts; with dynamic sampling (DAPO), more rounds of new
        prompts until the groups whose scores differ fill the batch (or the rounds run out: then the
        batch is filled with groups that do not). `produced`: the rounds a rollout producer sampled and
        scored already (asynchronous RL), finished here with the trainer's forwards."""
        a, size, n = self.cfg.algorithm, self.cfg.batch.rollout_batch_size, self.cfg.rollout.n
        kept: list[ScoredRollout] = []
        dropped: list[ScoredRollout] = []
        rounds = a.max_sampling_rounds if a.dynamic_sampling else 1
        for round_ in range(rounds if produced is None else len(produced)):
            share = self._sample_next_round(round_, timings) if produced is None else produced[round_]
            part = self._finish_round(share, timings)
            if not a.dynamic_sampling:
                return part, {}
            signal = groups_with_signal(part.scores, part.group_ids)
            kept.append(part.select(signal.nonzero().squeeze(1)))
            dropped.append(part.select((~signal).nonzero().squeeze(1)))
            if sum(map(len, kept)) >= size:
                break
        n_kept = min(sum(map(len, kept)), size)
        batch = concat(kept + dropped, self.pad_id).select(torch.arange(size, device=self.device))
        return batch, {"sampling/rounds": round_ + 1, "sampling/kept_groups": n_kept // n,
                       "sampling/filled_groups": (size - n_kept) // n}

    def produce_rounds(self, timings: dict[str, float]) -> list[SampledShare]:
        """A rollout producer's side of `_sample_batch` (one process: its shares are the global batch):
        the rounds it samples and scores, with the same rule for when dynamic sampling has enough."""
        a, size = self.cfg.algorithm, self.cfg.batch.rollout_batch_size
        shares, with_signal = [], 0
        for round_ in range(a.max_sampling_rounds if a.dynamic_sampling else 1):
            share = self._sample_next_round(round_, timings)
            shares.append(share)
            if share.failure is not None or not a.dynamic_sampling:
                break
            with_signal += int(groups_with_signal(share.scores, share.group_ids).sum())
            if with_signal >= size:
                break
        return shares

    def _sample_next_round(self, round_: int, timings: dict[str, float]) -> SampledShare:
        """The next prompts of the schedule, sampled and scored (this rank's share)."""
        rows = self.prompts.rows(self.prompt_position, self.cfg.batch.rollout_batch_size // self.cfg.rollout.n)
        self.prompt_position += len(rows)
        return self._sample_share(rows, STEP_ROLLOUT if round_ == 0 else STEP_MORE_ROLLOUTS + round_ - 1, timings)

    def _sampling_actor(self):
        """The actor that samples: the trained one with its full weights, or a producer's own copy."""
        if self.producing:
            return contextlib.nullcontext(self.actor)
        return _actor_of(self.ranks.full_parameters(self.trained, "actor"))

    def _sample_share(self, rows: list[tuple[list[int], dict[str, Any]]], purpose: int,
                      timings: dict[str, float]) -> SampledShare:
        """Generate and score (reward source, environment) this rank's share of `rows` (prompt ids, dataset
        columns). No collective: a rollout producer runs this in its own process."""
        t0 = time.perf_counter()
        n, ranks = self.cfg.rollout.n, self.ranks
        start, end = ranks.share(rows)  # whole prompts, so a group never straddles two ranks
        batch = collate_prompts([{"input_ids": ids} for ids, _ in rows[start:end]], self.pad_id)
        first_row = self.prompt_position - len(rows) + start  # among all prompts drawn: the episodes' seeds
        # the actor's weights gathered for the whole rollout (under FSDP), freed after it
        with self._sampling_actor() as actor, autocast_context(self.device, self.cfg.train.bf16):
            self.backend.load_weights(actor)
            records = None
            if self.agent:
                rollout, records = self.agent.generate(actor, rows[start:end], self.step, first_row, n,
                                                       self.step_generator(purpose), start * n, len(rows) * n,
                                                       self.device, decoder=self.backend.decoder)
                self.records += records
            else:
                rollout = self.backend.generate(batch["input_ids"].to(self.device),
                                                batch["attention_mask"].to(self.device), self.cfg.rollout, n=n,
                                                generator=self.step_generator(purpose), row_offset=start * n,
                                                total_rows=len(rows) * n)
        timings["time/generation"] += time.perf_counter() - t0
        t1 = time.perf_counter()
        prompts = responses = None
        if self.needs_texts:
            prompts, responses = decode_texts(self.tokenizer, rollout.prompt_ids, rollout.prompt_mask,
                                              rollout.response_ids, rollout.response_mask)
        names = sorted({k for _, columns in rows for k in columns})
        columns = {k: [c.get(k) for _, c in rows[start:end] for _ in range(n)] for k in names}
        if records is not None and prompts is not None:
            responses, columns = self._episode_texts(records, columns)
        share = SampledShare(rollout=rollout, group_ids=torch.arange(start * n, end * n, device=self.device) // n,
                             prompts=prompts, responses=responses, records=records)
        try:
            with autocast_context(self.device, self.cfg.train.bf16):
                rows_per_chunk = self._scoring_rows(rollout)
                scores, parts = self.reward(rollout, prompts, responses, rows_per_chunk, columns)
            share.scores, share.score_parts = scores.float(), parts
        except StepAbandoned as err:  # e.g. a reward server down: every rank abandons the step, none waits
            share.failure = err
        if records is not None and share.failure is None:
            share.scores, share.score_parts = self._with_env_rewards(
                share.scores, share.score_parts, records, per_turn=self.cfg.algorithm.turn_rewards)
        timings["time/scoring"] += time.perf_counter() - t1
        return share

    def _finish_round(self, share: SampledShare, timings: dict[str, float]) -> ScoredRollout:
        """The trainer's side of a sampled share: old and reference log-probs and values; the global batch."""
        t0 = time.perf_counter()
        if self.ranks.any(share.failure is not None):
            raise share.failure or RewardServerDown("of another process", "the step's rewards are incomplete")
        rollout = share.rollout
        episode = {}
        if share.records is not None:
            turns = self.cfg.rollout.max_turns
            episode = {"attention": rollout.response_mask.float(), "turn_ids": rollout.turn_ids,
                       "turn_rewards": torch.tensor([r.turn_rewards + [float("nan")] * (turns - len(r.turn_rewards))
                                                     for r in share.records], device=self.device)}
        local = ScoredRollout(
            prompt_ids=rollout.prompt_ids, prompt_mask=rollout.prompt_mask, response_ids=rollout.response_ids,
            mask=rollout.chosen_mask.float(), has_eos=rollout.has_eos, prompts=share.prompts,
            responses=share.responses, group_ids=share.group_ids, scores=share.scores,
            score_parts=share.score_parts, **self._score(rollout), **episode)
        batch = local.gather(self.ranks, self.pad_id)
        timings["time/scoring"] += time.perf_counter() - t0
        return batch

    def _scoring_rows(self, rollout: Rollout) -> int:
        """Rows per forward when scoring: the configured number, or what one chunk's memory allows
        (under FSDP the chunk size is set by the longest possible response, so every rank runs as many)."""
        response_len = self.cfg.rollout.max_new_tokens if self.ranks.fsdp is not None else rollout.response_ids.shape[1]
        rows = self.cfg.batch.forward_batch_size or scoring_rows(self.micro_rows, response_len, self.vocab_size)
        n = self.group_size
        return max(n, rows // n * n)  # chunks of whole groups when they share their prompt

    def _score(self, rollout: Rollout) -> dict[str, torch.Tensor | None]:
        """Old and reference log-probs and critic values of this rank's rollouts, in row chunks (the peak
        memory of one chunk). Under FSDP the forwards are collectives: every rank runs as many chunks."""
        seq, attn, resp = rollout.sequences, rollout.attention_mask, rollout.response_ids
        rows, n = self._scoring_rows(rollout), self.group_size
        logprobs = partial(response_logprobs, temperature=self.cfg.rollout.temperature, group_size=n)
        scored = {"old_logprobs": rollout.logprobs, "ref_logprobs": None, "old_values": None}
        with autocast_context(self.device, self.cfg.train.bf16):
            with self.ranks.scoring_parameters(self.trained) as pair:
                if self.recompute_logprobs:
                    scored["old_logprobs"] = in_row_chunks(partial(logprobs, pair.actor), rows, seq, attn, resp)
                if self.correction != "none":
                    scored["behaviour_logprobs"] = rollout.logprobs
                if pair.critic is not None:
                    scored["old_values"] = in_row_chunks(partial(response_values, pair.critic, response_len=resp.shape[1]),
                                                         rows, seq, attn)
            if self.uses_reference:
                with self.reference_context():
                    ref_model = self.reference if self.reference is not None else self.actor
                    scored["ref_logprobs"] = in_row_chunks(partial(logprobs, ref_model), rows, seq, attn, resp)
        return {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in scored.items()}

    def _experience(self, batch: ScoredRollout) -> Experience:
        """The algorithm's view of the global batch: shaped scores, per-token rewards, advantages."""
        a, mask = self.cfg.algorithm, batch.mask
        old_logprobs, ref_logprobs, old_values = (None if x is None else x * mask
                                                  for x in (batch.old_logprobs, batch.ref_logprobs, batch.old_values))
        scores = shape_scores(batch.scores, batch.has_eos, a.score_normalization, self.reward_stats,
                              self.running_scores, a.missing_eos_penalty)
        if a.overlong_shaping:
            max_new = self.cfg.rollout.generation_limit
            scores = scores + overlong_penalty(mask.sum(1), max_new, a.overlong_buffer or max(1, max_new // 5),
                                               a.overlong_penalty_factor)
        if a.clip_reward_value is not None:  # once, so the rewards and every estimator read the same score
            scores = scores.clamp(-a.clip_reward_value, a.clip_reward_value)
        rewards, kl_penalty = per_token_rewards(old_logprobs, old_logprobs if ref_logprobs is None else ref_logprobs,
                                                scores, mask, 0.0 if a.kl_in_loss else self.beta, None, a.kl_estimator)
        if a.turn_rewards and batch.turn_ids is not None:  # each environment reward at the turn that earned it
            turn_ends = turn_end_positions(batch.turn_ids, batch.turn_rewards.shape[1])
            rewards = rewards + place_turn_rewards(batch.turn_rewards.to(rewards.dtype), turn_ends, mask)
        advantages, returns = self.algorithm.advantages(
            AdvantageInputs(rewards=rewards, mask=mask, scores=scores, values=old_values, group_ids=batch.group_ids), a)
        weights = None
        if batch.behaviour_logprobs is not None:
            weights, stats = behaviour_weights(old_logprobs, batch.behaviour_logprobs * mask, mask,
                                               a.tis_cap if a.offpolicy_correction == "tis" else None)
            self.offpolicy_stats = {f"offpolicy/{k}": float(v) for k, v in stats.items()}
        return Experience(
            sequences=torch.cat([batch.prompt_ids, batch.response_ids], dim=1),
            attention_mask=torch.cat([batch.prompt_mask, batch.response_attention.to(batch.prompt_mask.dtype)], dim=1),
            response_ids=batch.response_ids, mask=mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
            old_values=old_values, rewards=rewards, kl_penalty=kl_penalty, advantages=advantages, returns=returns,
            scores=batch.scores, group_ids=batch.group_ids, prompts=batch.prompts, responses=batch.responses,
            behaviour_weights=weights,
            loss_mask=mask * batch.has_eos.unsqueeze(1).to(mask.dtype) if a.mask_truncated else mask)

