"""Stage 3, PPO with four models: actor, critic, frozen reward model, frozen reference.

One step, as in DeepSpeed-Chat's step 3 and the user's note:
  1. rollout: the actor samples responses to a batch of left-padded prompts;
  2. scoring: reference log-probs, critic values, reward-model scores (all dropout-free);
  3. per-token rewards: -beta * KL(actor || reference) on each token, plus the clipped score
     on the last one (rl.rewards);
  4. GAE advantages and returns, computed backwards from the last token (rl.advantages);
  5. `ppo_epochs` passes of clipped policy and value losses over shuffled mini-batches
     (rl.losses), with separate optimizer groups and clipping for actor and critic
     (`ppo.shared_trunk` puts the critic's head on the actor's trunk instead: an option).
The math lives in `quartet.rl`; this module only composes it with models and runs.

Dropout stays off in every PPO forward pass (models are kept in eval mode), so before the
first update the new/old probability ratio is exactly 1.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quartet.config import PPOConfig
from quartet.data import collate_prompts, load_prompts, tokenize_prompts
from quartet.models.forward import (
    TokenValueModel,
    causal_lm_logits,
    head_parameters,
    in_row_chunks,
    position_ids_from_mask,
    score_head,
    scoring_rows,
    sequence_scores,
    share_trunk,
    vocab_size,
)
from quartet.models.loading import (
    ModelLoadError,
    check_model_dir,
    load_causal_lm,
    load_scalar_model,
    save_model,
)
from quartet.models.tokenizer import load_tokenizer
from quartet.rl import (
    AdaptiveKLController,
    FixedKLController,
    RunningMeanStd,
    explained_variance,
    gae_advantages,
    masked_mean,
    normalize_scores,
    penalize_missing_eos,
    per_token_rewards,
    policy_loss,
    sequence_kl,
    token_logprobs,
    token_logprobs_and_entropy,
    token_logprobs_inplace,
    value_loss,
    whiten,
)
from quartet.rollout.generate import Rollout, SamplingConfig, sample_responses
from quartet.runs.checkpoint import (
    latest_checkpoint,
    load_training_state,
    rng_state,
    save_checkpoint,
    save_training_state,
    set_rng_state,
)
from quartet.runs.distributed import Ranks
from quartet.runs.faults import GracefulStop, NonFiniteGuard, TrainingInterrupted
from quartet.runs.metrics import truncate_jsonl_after
from quartet.runs.progress import format_postfix, progress_bar
from quartet.runs.run import Run, seed_everything
from quartet.runs.trainer import autocast_context, load_optimizer_state, load_weights, make_optimizer
from quartet.stages.common import apply_lora, check_context_length, unwrap_lora

RewardFn = Callable[[list[str], list[str]], Sequence[float]]
# Extra per-step measurements of the rollouts, e.g. the demo's hidden gold judge.
MetricFn = Callable[[list[str], list[str]], dict[str, float]]


# ----------------------------------------------------------------------------- reward sources


def load_callable(spec: str) -> RewardFn:
    """Import 'package.module:function' (or 'package.module.function')."""
    module_name, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"models.reward_fn '{spec}' should look like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"models.reward_fn '{spec}' cannot be imported: {err}") from None
    if not callable(fn):
        raise ValueError(f"models.reward_fn '{spec}' is not callable")
    return fn


class RewardSource:
    """Scores prompt+response: a frozen reward model or a plain Python function."""

    def __init__(self, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 same_tokenizer: bool = True, fn: RewardFn | None = None):
        self.model, self.tokenizer, self.same_tokenizer, self.fn = model, tokenizer, same_tokenizer, fn

    @property
    def reads_text(self) -> bool:
        """A reward function, or a reward model with its own tokenizer, scores decoded text (not token ids)."""
        return self.fn is not None or not self.same_tokenizer

    @torch.no_grad()
    def __call__(self, rollout: Rollout, prompts: list[str] | None, responses: list[str] | None,
                 rows_per_forward: int | None = None) -> torch.Tensor:
        """One score per rollout row; a reward model runs `rows_per_forward` rows at a time (None: all).

        `prompts` and `responses` are the decoded texts, needed only when `reads_text`.
        """
        device = rollout.prompt_ids.device
        if self.fn is not None:
            return torch.as_tensor([float(s) for s in self.fn(prompts, responses)], dtype=torch.float32, device=device)
        if self.same_tokenizer:
            ids, mask = rollout.sequences, rollout.attention_mask
        else:  # a reward model with its own tokenizer reads the text, re-encoded its way
            texts = [p + r + (self.tokenizer.eos_token or "") for p, r in zip(prompts, responses)]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            ids, mask = enc["input_ids"], enc["attention_mask"]
        return in_row_chunks(partial(sequence_scores, self.model), rows_per_forward, ids, mask).float()


# ----------------------------------------------------------------------------- experience


@dataclass
class Experience:
    """One scored rollout batch: everything the update needs, aligned on response tokens."""

    sequences: torch.Tensor  # [batch, prompt_len + response_len]
    attention_mask: torch.Tensor  # [batch, prompt_len + response_len]
    response_ids: torch.Tensor  # [batch, response_len]
    mask: torch.Tensor  # [batch, response_len] float, 1 on valid response tokens
    old_logprobs: torch.Tensor  # [batch, response_len]
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor
    rewards: torch.Tensor
    kl_penalty: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor  # [batch] raw reward-model scores
    prompts: list[str] | None  # decoded texts, when scoring read them
    responses: list[str] | None


@torch.no_grad()
def response_logprobs(model: PreTrainedModel, sequences: torch.Tensor, attention_mask: torch.Tensor,
                      response_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs of the response tokens [batch, response_len], for scoring (no gradients).

    The LM head runs on response positions only, and the log-softmax overwrites the fresh
    logits: one vocabulary-sized tensor per forward instead of three.
    """
    logits = _response_logits(model, sequences, attention_mask, response_ids)
    return token_logprobs_inplace(logits, response_ids, temperature)


def _response_logits(model: PreTrainedModel, sequences: torch.Tensor, attention_mask: torch.Tensor,
                     response_ids: torch.Tensor) -> torch.Tensor:
    """Logits that predicted each response token: [batch, response_len, vocab].

    The last position is left out of the forward pass: its logits would predict a token after
    the response, and a causal model's earlier positions do not depend on it.
    """
    response_len = response_ids.shape[1]
    return causal_lm_logits(model, sequences[:, :-1], attention_mask[:, :-1], logits_to_keep=response_len)


def response_values(critic_values: torch.nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor,
                    response_len: int) -> torch.Tensor:
    """V(S_t) for each response token t: the critic's value at the token before it.

    `critic_values` maps (input_ids, attention_mask) to per-token values (a TokenValueModel).
    The last position has no response token after it, so it is left out of the forward pass.
    """
    prompt_len = sequences.shape[1] - response_len
    values = critic_values(sequences[:, :-1], attention_mask[:, :-1])  # [batch, seq - 1]
    return values[:, prompt_len - 1 :]


class ActorCritic(torch.nn.Module):
    """Actor and critic trained as one module: one distributed wrapper, one optimizer, one backward.

    DeepSpeed drives one model per engine (TRL's PPO pairs policy and value the same way);
    the two keep separate learning rates (optimizer parameter groups) and gradient clipping.
    With `shared_trunk` the critic runs on the actor's trunk (see `share_trunk`), and one trunk
    pass feeds both the LM head and the critic's score head.
    """

    def __init__(self, actor: PreTrainedModel, critic: PreTrainedModel, shared_trunk: bool = False):
        super().__init__()
        self.actor = actor
        self.critic = TokenValueModel(critic)
        self.shared_trunk = shared_trunk

    def forward(self, sequences: torch.Tensor, attention_mask: torch.Tensor, response_ids: torch.Tensor,
                temperature: float, with_entropy: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Response log-probs [b, r], the policy's entropy at each response position [b, r]
        (no gradient; None unless `with_entropy`) and values V(S_t) [b, r]."""
        if self.shared_trunk:
            return self._shared_trunk_forward(sequences, attention_mask, response_ids, temperature, with_entropy)
        logits = _response_logits(self.actor, sequences, attention_mask, response_ids)
        values = response_values(self.critic, sequences, attention_mask, response_ids.shape[1])
        return (*_logprobs_and_entropy(logits, response_ids, temperature, with_entropy), values)

    def _shared_trunk_forward(self, sequences: torch.Tensor, attention_mask: torch.Tensor, response_ids: torch.Tensor,
                              temperature: float, with_entropy: bool
                              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The positions that predict the response tokens are the states S_t the values belong to:
        one forward (without the last position, as in `_response_logits`) gives both."""
        response_len = response_ids.shape[1]
        seq, mask = sequences[:, :-1], attention_mask[:, :-1]
        out = self.actor(input_ids=seq, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                         logits_to_keep=response_len, use_cache=False, output_hidden_states=True)
        head = score_head(self.critic.model)
        hidden = out.hidden_states[-1][:, -response_len:]  # the trunk's output, after its final norm
        values = head(hidden.to(head.weight.dtype)).squeeze(-1).float()
        return (*_logprobs_and_entropy(out.logits, response_ids, temperature, with_entropy), values)


def _logprobs_and_entropy(logits: torch.Tensor, response_ids: torch.Tensor, temperature: float,
                          with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if with_entropy:
        return token_logprobs_and_entropy(logits, response_ids, temperature)
    return token_logprobs(logits, response_ids, temperature), None


def decode_texts(tokenizer: PreTrainedTokenizerBase, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 response_ids: torch.Tensor, response_mask: torch.Tensor) -> tuple[list[str], list[str]]:
    """Prompt texts (special tokens kept, padding dropped) and response texts (special tokens dropped).

    A response is decoded together with its prompt and the prompt's text cut off, so tokenizers
    that drop a leading space when decoding a fragment (SentencePiece) keep the text exact.
    """
    prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids, prompt_mask)]
    response_ids = [ids[m.bool()].tolist() for ids, m in zip(response_ids, response_mask)]
    prompts = tokenizer.batch_decode(prompt_ids, skip_special_tokens=False)
    plain_prompts = tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.batch_decode([p + r for p, r in zip(prompt_ids, response_ids)], skip_special_tokens=True)
    responses = []
    for prompt_text, full_text, ids in zip(plain_prompts, full, response_ids):
        if full_text.startswith(prompt_text):
            responses.append(full_text[len(prompt_text):])
        else:  # a merge across the boundary: fall back to decoding the response alone
            responses.append(tokenizer.decode(ids, skip_special_tokens=True))
    return prompts, responses


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else "..." + text[-(width - 3):] if width > 3 else text[:width]


def format_sample_table(step: int, records: list[dict[str, Any]], width: int = 60) -> str:
    """A plain-text table of sample rollouts: score, end of the prompt, response."""
    lines = [f"-- samples at step {step} --", f"{'score':>8}  {'prompt (end)':<{width // 2}}  response"]
    for r in records:
        response = " ".join(r["response"].split())
        lines.append(f"{r['score']:>8.3f}  {_one_line(r['prompt'], width // 2):<{width // 2}}  {response[:width]}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- trainer


# Per-step metrics whose first and last fifth of the run go into summary.json.
SUMMARY_KEYS = ("score/mean", "kl/ref", "reward/total", "response/length")


class PPOTrainer:
    """Holds the four models and runs PPO steps. `train()` runs the configured number of steps."""

    def __init__(self, cfg: PPOConfig, actor: PreTrainedModel, reference: PreTrainedModel | None,
                 critic: PreTrainedModel, reward: RewardSource, tokenizer: PreTrainedTokenizerBase,
                 prompts: list[list[int]], run: Run, reward_stats: tuple[float, float] | None = None,
                 metric_fns: Sequence[MetricFn] = ()):
        self.cfg, self.p = cfg, cfg.ppo
        self.actor, self.reference, self.critic, self.reward = actor, reference, critic, reward
        # the training micro-batch on this rank: the fewest rows a scoring forward runs by default
        self.micro_rows = max(1, self.p.mini_batch_size // self.p.grad_accum // run.ranks.world)
        self.vocab_size = vocab_size(actor)
        self.tokenizer, self.prompts, self.run, self.device = tokenizer, prompts, run, run.device
        self._order_epoch, self._order = -1, []  # the cached shuffle of prompt_batch
        self.ranks = run.ranks
        check_batches_split(cfg, self.ranks)
        self.sampling = SamplingConfig(**cfg.generation.model_dump())
        if self.p.shared_trunk:
            if self.ranks.shards_parameters:
                raise ValueError("ppo.shared_trunk runs on one process or with DDP; FSDP and DeepSpeed would "
                                 "shard the shared trunk twice: turn it off for them")
            share_trunk(actor, critic)
        self.actor_critic = ActorCritic(actor, critic, shared_trunk=self.p.shared_trunk)
        # with a shared trunk the critic's own parameters are its score head (no parameter in two groups)
        self.optimizer = make_optimizer([{"params": actor.parameters(), "lr": self.p.actor_lr},
                                         {"params": head_parameters(critic, actor), "lr": self.p.critic_lr}],
                                        self.p.actor_lr, self.p.weight_decay)
        # the pair as wrapped for the launched backend (DDP/FSDP/DeepSpeed), set in train()
        self.trained: torch.nn.Module = self.actor_critic
        self.update_forward: torch.nn.Module = self.trained  # torch.compile(d) in _train when ppo.compile
        # the parameters clipped at each optimizer step, listed again after wrapping in train()
        self.trained_parameters = (list(actor.parameters()), head_parameters(critic, actor))
        self.kl_ctl = (AdaptiveKLController(self.p.beta, self.p.kl_target, self.p.kl_horizon)
                       if self.p.adaptive_kl else FixedKLController(self.p.beta))
        self.running_scores = RunningMeanStd()
        self.reward_stats = reward_stats
        self.metric_fns = list(metric_fns)
        self.nonfinite = NonFiniteGuard(self.p.max_nonfinite_steps, where="ppo")
        self.history: list[dict[str, float]] = []  # every step's SUMMARY_KEYS, kept across resumes
        if self.p.score_normalization == "stored" and reward_stats is None:
            raise ValueError("ppo.score_normalization is 'stored' but the reward model has no stored "
                             "reward_mean/reward_std (train it with `quartet reward`, or use 'running')")
        self.step = 0
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        for model in (actor, critic, reference, reward.model):
            if model is not None:
                model.to(self.device)
                model.eval()  # dropout off everywhere in PPO
        for frozen in (reference, reward.model):
            if frozen is not None:
                frozen.requires_grad_(False)

    # ------------------------------------------------------------------ prompts

    def prompt_batch(self, step: int) -> list[list[int]]:
        """The prompts of `step`: seeded shuffles of the prompt set, one epoch after another."""
        size = self.p.rollout_batch_size
        start = step * size
        batch = []
        for position in range(start, start + size):
            epoch, index = divmod(position, len(self.prompts))
            batch.append(self.prompts[self._epoch_order(epoch)[index]])
        return batch

    def _epoch_order(self, epoch: int) -> list[int]:
        """The prompt order of one epoch, shuffled once (not once per row: a large prompt set made
        that cost seconds per step)."""
        if self._order_epoch != epoch:
            order = list(range(len(self.prompts)))
            random.Random(self.cfg.run.seed * 7919 + epoch).shuffle(order)
            self._order_epoch, self._order = epoch, order
        return self._order

    # ------------------------------------------------------------------ experience

    def reference_context(self):
        """With LoRA and no separate reference, the reference is the actor with adapters off."""
        if self.reference is None:
            return self.actor.disable_adapter()
        return contextlib.nullcontext()

    def step_generator(self, purpose: int) -> torch.Generator:
        """Random numbers of one step, the same on every rank and after a resume."""
        return torch.Generator(device=self.device).manual_seed(
            self.cfg.run.seed * 1_000_003 + self.step * 7_919 + purpose)

    @torch.no_grad()
    def make_experience(self, prompt_ids: list[list[int]]) -> tuple[Experience, dict[str, float]]:
        """Roll out and score this rank's share of the step's prompts; return the global batch.

        Generation and the three scoring passes run on each rank's share. Their outputs are then
        gathered, so rewards, advantages, whitening and metrics are computed over the whole
        batch, identically on every rank.
        """
        p, temperature, ranks = self.p, self.sampling.temperature, self.ranks
        timings = {}
        t0 = time.perf_counter()
        start, end = ranks.share(prompt_ids)
        batch = collate_prompts([{"input_ids": ids} for ids in prompt_ids[start:end]], self.pad_id)
        prompt_tensor = batch["input_ids"].to(self.device)
        prompt_mask = batch["attention_mask"].to(self.device)
        with ranks.full_parameters(self.trained) as pair, autocast_context(self.device, p.bf16):
            rollout = sample_responses(pair.actor, prompt_tensor, prompt_mask, self.sampling, self.eos_id, self.pad_id,
                                       generator=self.step_generator(0), row_offset=start, total_rows=len(prompt_ids))
        timings["time/generation"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        seq, attn, resp = rollout.sequences, rollout.attention_mask, rollout.response_ids
        # texts only for what reads them (a reward function or a reward model with its own tokenizer,
        # metric functions); sample tables decode their few rows when they are written
        prompts = responses = None
        if self.reward.reads_text or self.metric_fns:
            prompts, responses = decode_texts(self.tokenizer, rollout.prompt_ids, rollout.prompt_mask, resp,
                                              rollout.response_mask)
        # scoring runs in chunks of rows: the peak memory of one chunk
        rows = self.p.forward_batch_size or scoring_rows(self.micro_rows, resp.shape[1], self.vocab_size)
        with autocast_context(self.device, p.bf16):
            with ranks.full_parameters(self.trained) as pair:
                if p.logprobs_from_generation:
                    old_logprobs = rollout.logprobs
                else:
                    old_logprobs = in_row_chunks(partial(response_logprobs, pair.actor, temperature=temperature),
                                                 rows, seq, attn, resp)
                old_values = in_row_chunks(partial(response_values, pair.critic, response_len=resp.shape[1]),
                                           rows, seq, attn)
            with self.reference_context():
                ref_model = self.reference if self.reference is not None else self.actor
                ref_logprobs = in_row_chunks(partial(response_logprobs, ref_model, temperature=temperature),
                                             rows, seq, attn, resp)
            raw_scores = self.reward(rollout, prompts, responses, rows)

        # the global batch, rank by rank in prompt order (each rank's tensors padded to the longest)
        prompt_ids_all = ranks.gather_rows(rollout.prompt_ids, self.pad_id, pad_first=True)
        prompt_mask_all = ranks.gather_rows(rollout.prompt_mask, 0, pad_first=True)
        resp = ranks.gather_rows(resp, self.pad_id)
        mask = ranks.gather_rows(rollout.response_mask.float(), 0)
        old_logprobs, ref_logprobs, old_values = (ranks.gather_rows(x.float(), 0)
                                                  for x in (old_logprobs, ref_logprobs, old_values))
        raw_scores = ranks.gather_rows(raw_scores.float())
        has_eos = ranks.gather_rows(rollout.has_eos.long()).bool()
        if prompts is not None:
            prompts, responses = ranks.gather_objects(prompts), ranks.gather_objects(responses)
        seq = torch.cat([prompt_ids_all, resp], dim=1)
        attn = torch.cat([prompt_mask_all, mask.to(prompt_mask_all.dtype)], dim=1)

        old_logprobs, ref_logprobs, old_values = (x * mask for x in (old_logprobs, ref_logprobs, old_values))
        scores = raw_scores
        if p.score_normalization == "stored":
            scores = normalize_scores(scores, *self.reward_stats)
        elif p.score_normalization == "running":
            self.running_scores.update(raw_scores)
            scores = normalize_scores(scores, self.running_scores.mean, self.running_scores.std)
        if p.missing_eos_penalty is not None:
            scores = penalize_missing_eos(scores, has_eos, p.missing_eos_penalty)

        rewards, kl_penalty = per_token_rewards(old_logprobs, ref_logprobs, scores, mask, self.kl_ctl.value,
                                                p.clip_reward_value, p.kl_estimator)
        advantages, returns = gae_advantages(rewards, old_values, mask, p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = whiten(advantages, mask)
        timings["time/scoring"] = time.perf_counter() - t1

        lengths = mask.sum(1)
        kl_per_seq = sequence_kl(old_logprobs, ref_logprobs, mask)
        metrics = {
            "score/mean": float(raw_scores.mean()), "score/std": float(raw_scores.std()) if len(raw_scores) > 1 else 0.0,
            "reward/total": float((rewards * mask).sum(1).mean()), "kl/ref": float(kl_per_seq.mean()),
            "kl/beta": float(self.kl_ctl.value), "response/length": float(lengths.mean()),
            "response/eos_rate": float(has_eos.float().mean()),
            # fluency as the reference model sees it (temperature-scaled, like the KL)
            "response/ref_perplexity": math.exp(min(-float(masked_mean(ref_logprobs, mask)), 50.0)),
            "value/mean": float(masked_mean(old_values, mask)), "return/mean": float(masked_mean(returns, mask)),
            **timings,
        }
        for metric_fn in self.metric_fns:
            metrics.update(metric_fn(prompts, responses))
        exp = Experience(seq, attn, resp, mask, old_logprobs, ref_logprobs, old_values, rewards, kl_penalty,
                         advantages, returns, raw_scores, prompts, responses)
        return exp, metrics

    # ------------------------------------------------------------------ update

    def _clip_and_step(self) -> tuple[float, float]:
        """Clip actor and critic gradients separately, then step when both are finite.

        Returns the global norms before clipping.
        """
        actor_params, critic_params = self.trained_parameters
        actor_norm = self.ranks.clip_grad_norm(actor_params, self.p.max_grad_norm)
        critic_norm = self.ranks.clip_grad_norm(critic_params, self.p.max_grad_norm)
        if math.isfinite(actor_norm) and math.isfinite(critic_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return actor_norm, critic_norm

    def update(self, exp: Experience) -> dict[str, float]:
        """`ppo_epochs` passes of clipped policy and value losses over shuffled mini-batches.

        Every rank holds the whole batch and draws the same mini-batches; each computes the
        losses of its share of every mini-batch, and the gradient all-reduce (DDP averages)
        completes the exact token mean over the mini-batch.
        """
        p, temperature, ranks = self.p, self.sampling.temperature, self.ranks
        batch_size = exp.sequences.shape[0]
        micro_size = p.mini_batch_size // p.grad_accum // ranks.world
        sums: dict[str, float] = {}
        grad_norms = {"grad_norm/actor": 0.0, "grad_norm/critic": 0.0}
        n_updates = 0
        shuffle = self.step_generator(1)
        value_weight = p.vf_coef if p.shared_trunk else 1.0

        def add(key: str, value: float, weight: float) -> None:
            sums[key] = sums.get(key, 0.0) + value * weight

        for epoch in range(p.ppo_epochs):
            # the entropy (a metric only) is measured in the first pass over the batch: a vocab-wide
            # exp and sum per token, which later epochs would repeat for a near-identical number
            with_entropy = epoch == 0
            order = torch.randperm(batch_size, generator=shuffle, device=self.device)
            for mini in order.split(p.mini_batch_size):
                n_valid = exp.mask[mini].sum().clamp(min=1)
                start, end = ranks.share(mini)
                micros = mini[start:end].split(micro_size)
                for i, micro in enumerate(micros):
                    # exact token mean over the mini-batch; times the world size that DDP divides by
                    weight = float(exp.mask[micro].sum() / n_valid)
                    seq, attn, mask = exp.sequences[micro], exp.attention_mask[micro], exp.mask[micro]
                    with ranks.micro_batch(self.trained, last=i == len(micros) - 1):
                        with autocast_context(self.device, p.bf16):
                            logprobs, entropy, values = self.update_forward(seq, attn, exp.response_ids[micro],
                                                                            temperature, with_entropy)
                            pg_loss, pg_stats = policy_loss(logprobs.float(), exp.old_logprobs[micro],
                                                            exp.advantages[micro], mask, p.cliprange)
                            vf_loss, vf_stats = value_loss(values.float(), exp.old_values[micro], exp.returns[micro],
                                                           mask, p.cliprange_value)
                        # one backward gives both gradients; separate models share no parameters, so
                        # only a shared trunk needs the value loss weighted against the policy loss
                        ranks.backward((pg_loss + value_weight * vf_loss) * (weight * ranks.world))
                    for key, value in (("loss/policy", pg_loss), ("loss/value", vf_loss),
                                       ("policy/clipfrac", pg_stats["clipfrac"]),
                                       ("policy/approx_kl", pg_stats["approx_kl"]),
                                       ("value/clipfrac", vf_stats["clipfrac"])):
                        add(key, float(value.detach()), weight)
                    if with_entropy:  # times ppo_epochs: averaged below over every update, like the rest
                        add("policy/entropy", float(masked_mean(entropy, mask)), weight * p.ppo_epochs)
                actor_norm, critic_norm = self._clip_and_step()
                grad_norms["grad_norm/actor"] += actor_norm
                grad_norms["grad_norm/critic"] += critic_norm
                n_updates += 1
        keys = sorted(sums)
        totals = ranks.sum_floats([sums[k] for k in keys])  # each rank's share of the token means
        metrics = {k: v / n_updates for k, v in zip(keys, totals)}
        metrics.update({k: v / n_updates for k, v in grad_norms.items()})  # already global
        metrics["value/explained_variance"] = float(explained_variance(exp.old_values, exp.returns, exp.mask))
        return metrics

    @staticmethod
    def experience_is_finite(exp: Experience) -> bool:
        return all(bool(torch.isfinite(x).all()) for x in (exp.scores, exp.rewards, exp.advantages, exp.returns))

    # ------------------------------------------------------------------ samples

    def sample_records(self, exp: Experience, n: int) -> list[dict[str, Any]]:
        """Per-token view of a few rollouts: the quantities of the user's note, token by token."""
        n = min(n, exp.sequences.shape[0])
        prompts, responses = exp.prompts, exp.responses
        if prompts is None:  # not decoded for scoring: decode the rows shown
            prompt_len = exp.sequences.shape[1] - exp.response_ids.shape[1]
            prompts, responses = decode_texts(self.tokenizer, exp.sequences[:n, :prompt_len],
                                              exp.attention_mask[:n, :prompt_len], exp.response_ids[:n], exp.mask[:n])
        records = []
        for i in range(n):
            valid = int(exp.mask[i].sum())
            ids = exp.response_ids[i, :valid].tolist()

            def row(t: torch.Tensor, i: int = i, valid: int = valid) -> list[float]:
                return [round(float(x), 5) for x in t[i, :valid]]

            records.append({
                "step": self.step, "prompt": prompts[i], "response": responses[i],
                "score": float(exp.scores[i]),
                "tokens": [self.tokenizer.decode([t]) for t in ids],
                "actor_logprob": row(exp.old_logprobs), "ref_logprob": row(exp.ref_logprobs),
                "kl_penalty": row(exp.kl_penalty), "value": row(exp.old_values), "reward": row(exp.rewards),
                "advantage": row(exp.advantages), "return": row(exp.returns),
            })
        return records

    # ------------------------------------------------------------------ checkpoints

    def _full_state_dicts(self) -> tuple[dict | None, dict | None]:
        """Gathered actor and critic weights when training shards them (a collective), else None."""
        if not self.ranks.shards_parameters:
            return None, None
        state = self.ranks.full_state_dict(self.trained)  # a collective: every rank calls it
        if state is None:
            return None, None
        return ({k[len("actor."):]: v for k, v in state.items() if k.startswith("actor.")},
                {k[len("critic.model."):]: v for k, v in state.items() if k.startswith("critic.model.")})

    def save_checkpoint(self) -> Path:
        """Full models and training state, written by the main rank; every rank calls this."""
        actor_state, critic_state = self._full_state_dicts()
        sharded = self.ranks.shards_parameters

        def write(tmp: Path) -> None:
            save_model(self.actor, self.tokenizer, tmp / "actor", state_dict=actor_state)
            save_model(self.critic, self.tokenizer, tmp / "critic", state_dict=critic_state)
            save_training_state(tmp / "trainer_state.pt", {
                # a sharded optimizer's state lives on every rank; it is not gathered
                "optimizer": None if sharded else self.optimizer.state_dict(),
                "kl_ctl": self.kl_ctl.state_dict(), "running_scores": self.running_scores.state_dict(),
                "nonfinite": self.nonfinite.state_dict(), "history": self.history, "step": self.step, "rng": rng_state(),
            })

        path = self.run.checkpoints_dir / f"step-{self.step}"
        if self.ranks.is_main:
            path = save_checkpoint(self.run.checkpoints_dir, self.step, write, keep=self.p.keep_checkpoints)
        self.ranks.barrier()
        return path

    def resume(self, checkpoint: Path) -> None:
        load_weights(self.actor, checkpoint / "actor")
        load_weights(self.critic, checkpoint / "critic")
        state = load_training_state(checkpoint / "trainer_state.pt")
        load_optimizer_state(self.optimizer, state["optimizer"], checkpoint)
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.running_scores.load_state_dict(state["running_scores"])
        self.nonfinite.load_state_dict(state["nonfinite"])
        self.history = list(state["history"])
        self.step = state["step"]
        set_rng_state(state["rng"])
        if self.ranks.is_main:
            for log in ("metrics.jsonl", "samples.jsonl"):  # lines written after this checkpoint are redone
                truncate_jsonl_after(self.run.dir / log, self.step)

    def final_models(self) -> tuple[tuple[PreTrainedModel, dict | None], tuple[PreTrainedModel, dict | None]]:
        """(actor, its gathered weights or None), (critic, likewise): what `final/` and `final_critic/` hold."""
        actor_state, critic_state = self._full_state_dicts()
        return (unwrap_lora(self.actor), actor_state), (self.critic, critic_state)

    # ------------------------------------------------------------------ loop

    def train_step(self) -> dict[str, float]:
        started = time.perf_counter()
        exp, metrics = self.make_experience(self.prompt_batch(self.step))
        t0 = time.perf_counter()
        finite = self.experience_is_finite(exp)
        if finite:  # a NaN score or reward would poison every update of the step
            metrics.update(self.update(exp))
            finite = NonFiniteGuard.finite(*(metrics[k] for k in ("loss/policy", "loss/value", "grad_norm/actor",
                                                                   "grad_norm/critic")))
        self.nonfinite.record(finite, self.step + 1, lambda: latest_checkpoint(self.run.checkpoints_dir))
        metrics["skipped_nonfinite"] = self.nonfinite.total
        metrics["time/training"] = time.perf_counter() - t0
        metrics["time/step"] = time.perf_counter() - started
        metrics["time/tokens_per_second"] = float(exp.mask.sum()) / max(metrics["time/generation"], 1e-9)
        self.kl_ctl.update(metrics["kl/ref"], self.p.rollout_batch_size)
        self.step += 1
        due = self.step % self.p.sample_every == 0 or self.step == 1 or self.step == self.p.steps
        if self.p.n_samples and due and self.ranks.is_main:
            self._write_samples(self.sample_records(exp, self.p.n_samples))
        return metrics

    def _write_samples(self, records: list[dict[str, Any]]) -> None:
        """Append the records to samples.jsonl and show them as a small table above the progress bar."""
        with (self.run.dir / "samples.jsonl").open("a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        tqdm.write(format_sample_table(self.step, records), file=sys.stderr)

    def train(self) -> dict[str, Any]:
        with GracefulStop() as stop:
            return self._train(stop)

    def _train(self, stop: GracefulStop) -> dict[str, Any]:
        if self.run.resume_from:
            self.resume(self.run.resume_from)
        # wrapped after loading, so every rank starts from the same weights and optimizer state
        self.trained, self.optimizer = self.ranks.prepare(self.actor_critic, self.optimizer)
        # the update's forward and backward, optionally compiled (generation and scoring stay eager)
        self.update_forward = torch.compile(self.trained) if self.p.compile else self.trained
        # listed once, after wrapping: walking the module trees every optimizer step costs about 1 ms
        self.trained_parameters = (list(self.actor.parameters()), head_parameters(self.critic, self.actor))
        bar = progress_bar(self.p.steps, desc="ppo", initial=self.step, disable=not self.ranks.is_main)
        started = time.perf_counter()
        while self.step < self.p.steps:
            metrics = self.train_step()
            self.history.append({k: float(metrics[k]) for k in SUMMARY_KEYS})
            if self.step % self.p.log_every == 0 or self.step == self.p.steps:
                self.run.metrics.log(self.step, metrics)
            bar.update(1)
            bar.set_postfix(format_postfix(metrics, ["score/mean", "kl/ref", "response/length"]))
            if self.step < self.p.steps:
                if self.ranks.any(stop.requested):  # every rank stops after the same step
                    bar.close()
                    raise TrainingInterrupted(stop.signum or signal.SIGTERM, self.step, self.save_checkpoint())
                if self.p.save_every and self.step % self.p.save_every == 0 and self.nonfinite.in_a_row == 0:
                    self.save_checkpoint()
        bar.close()
        return {"steps": self.step, "seconds": time.perf_counter() - started, "history": list(self.history)}


# ----------------------------------------------------------------------------- set-up


def _same_vocab(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    return a.get_vocab() == b.get_vocab()


def build_reward_source(cfg: PPOConfig, tokenizer: PreTrainedTokenizerBase,
                        reward_fn: RewardFn | None) -> tuple[RewardSource, tuple[float, float] | None]:
    m = cfg.models
    if reward_fn is not None or m.reward_fn:
        return RewardSource(fn=reward_fn or load_callable(m.reward_fn)), None
    reward_tokenizer = tokenizer
    if (Path(m.reward) / "tokenizer_config.json").exists():
        reward_tokenizer = load_tokenizer(m.reward, m.trust_remote_code)
    try:
        model = load_scalar_model(m.reward, m.trust_remote_code, m.allow_pickle,
                                  pad_token_id=reward_tokenizer.pad_token_id, require_trained_head=True)
    except ModelLoadError as err:
        raise ModelLoadError(f"models.reward: {err}") from None
    stats = None
    if getattr(model.config, "reward_mean", None) is not None:
        stats = (float(model.config.reward_mean), float(model.config.reward_std))
    return RewardSource(model=model, tokenizer=reward_tokenizer,
                        same_tokenizer=_same_vocab(tokenizer, reward_tokenizer)), stats


def check_batches_split(cfg: PPOConfig, ranks: Ranks) -> None:
    """Every rank must get an equal share of the rollouts and of each mini-batch's micro-batches."""
    ranks.check_divisible(cfg.ppo.rollout_batch_size, "ppo.rollout_batch_size")
    ranks.check_divisible(cfg.ppo.mini_batch_size // cfg.ppo.grad_accum, "ppo.mini_batch_size / ppo.grad_accum")


def run_ppo(cfg: PPOConfig, resume: bool = False, reward_fn: RewardFn | None = None,
            metric_fns: Sequence[MetricFn] = ()) -> dict[str, Any]:
    """Run the PPO stage described by `cfg`.

    `reward_fn(prompts, responses) -> scores` may replace the reward model; each of
    `metric_fns(prompts, responses) -> {name: value}` adds measurements to every step's metrics.
    """
    if not cfg.data.train:
        raise ValueError("data.train is required: a prompt file (fields 'prompt' or 'messages')")
    seed_everything(cfg.run.seed)
    run = Run(cfg.run.output_dir, cfg, stage="ppo", resume=resume)
    check_batches_split(cfg, run.ranks)
    m = cfg.models
    for role, path in (("models.actor", m.actor), ("models.reference", m.reference), ("models.critic", m.critic),
                       ("models.reward", None if (reward_fn or m.reward_fn) else m.reward)):
        if path:
            check_model_dir(path, role, m.allow_pickle)
    tokenizer = load_tokenizer(m.actor, m.trust_remote_code)
    tokenizer.padding_side = "left"
    prompt_examples = load_prompts(cfg.data.train, tokenizer)
    if cfg.data.limit:
        prompt_examples = prompt_examples[: cfg.data.limit]
    prompts, stats = tokenize_prompts(prompt_examples, tokenizer, cfg.data.max_prompt_length)
    if not prompts:
        raise ValueError(f"{cfg.data.train}: no prompts left after loading")
    reward, reward_stats = build_reward_source(cfg, tokenizer, reward_fn)
    run.ranks.print(f"[ppo] {len(prompts)} prompts; {stats.summary()}")

    actor = load_causal_lm(m.actor, m.trust_remote_code, m.allow_pickle)
    if cfg.lora.enabled:
        actor = apply_lora(actor, cfg.lora)
        reference = None if (m.reference or m.actor) == m.actor else load_causal_lm(m.reference, m.trust_remote_code, m.allow_pickle)
    else:
        reference = load_causal_lm(m.reference or m.actor, m.trust_remote_code, m.allow_pickle)
    # a shared trunk is the actor's: the critic's score head starts fresh, as with critic_init=actor
    critic_source = m.actor if cfg.ppo.shared_trunk else m.critic or (m.reward if m.critic_init == "reward" else m.actor)
    critic = load_scalar_model(critic_source, m.trust_remote_code, m.allow_pickle, pad_token_id=tokenizer.pad_token_id)

    check_context_length(actor, max(map(len, prompts)) + cfg.generation.max_new_tokens,
                         "prompt + generated tokens", "data.max_prompt_length and generation.max_new_tokens")
    run.start()  # inputs are valid: only now is the output directory touched
    trainer = PPOTrainer(cfg, actor, reference, critic, reward, tokenizer, prompts, run, reward_stats, metric_fns)
    result = trainer.train()
    (actor, actor_state), (critic, critic_state) = trainer.final_models()
    run.save_final(critic, tokenizer, name="final_critic", state_dict=critic_state)
    run.save_final(actor, tokenizer, state_dict=actor_state)
    history = result.pop("history")
    summary = {"stage": "ppo", "final_dir": str(run.final_dir), "n_prompts": len(prompts), **result}
    if history:
        k = max(1, len(history) // 5)  # first and last fifth of the run
        for key in SUMMARY_KEYS:
            summary[f"first/{key}"] = sum(h[key] for h in history[:k]) / k
            summary[f"last/{key}"] = sum(h[key] for h in history[-k:]) / k
    run.write_summary(summary)
    run.close()
    if history:
        run.ranks.print(f"[ppo] {result['steps']} steps in {result['seconds']:.1f}s; score {summary['first/score/mean']:.3f} -> "
              f"{summary['last/score/mean']:.3f}; KL to reference {summary['last/kl/ref']:.3f}; actor in {run.final_dir}")
    return summary
