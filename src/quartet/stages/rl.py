"""Online RL on one trainer: every registered algorithm runs through here (four-model PPO first).

One step, as in DeepSpeed-Chat's step 3 and the user's note:
  1. rollout: the backend samples responses to a batch of left-padded prompts;
  2. scoring: reference log-probs, critic values (algorithms with a critic), scores;
  3. per-token rewards: -beta * KL(actor || reference) on each token, plus the clipped score on
     the last one (rl.rewards);
  4. advantages by the algorithm's estimator (PPO: GAE backwards from the last token);
  5. `ppo_epochs` passes of the algorithm's policy loss (and the critic's clipped value loss)
     over shuffled mini-batches, one optimizer with a parameter group per trained model.
The math lives in `quartet.rl`, the algorithm's parts in `rl/algorithms.py`, the run loop in
`runs/loop.py`; this module only composes them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quartet.config import RLConfig, SamplingConfig
from quartet.models.forward import head_parameters, share_trunk
from quartet.models.lean import lean_unsupported
from quartet.models.loading import check_model_dir, save_model
from quartet.models.policy import ActorCritic
from quartet.models.tokenizer import load_tokenizer
from quartet.report.samples import sample_records, write_samples
from quartet.rl import (
    AdaptiveKLController,
    FixedKLController,
    aggregate,
    explained_variance,
    kl_estimate,
    loss_units,
    masked_mean,
    value_loss,
)
from quartet.rl.algorithms import get_algorithm
from quartet.rl.experience import Experience
from quartet.runs.checkpoint import load_weights
from quartet.runs.faults import NonFiniteGuard
from quartet.runs.loop import Job, RunLoop, StepOutcome
from quartet.runs.optim import load_optimizer_state, make_optimizer
from quartet.runs.precision import autocast_context
from quartet.runs.progress import format_postfix
from quartet.runs.run import Run, seed_everything
from quartet.runs.seeds import STEP_UPDATE, derive_seed
from quartet.scoring import MetricFn, RewardFn, RewardSource, build_reward_source
from quartet.stages.common import check_context_length, check_fsdp_options, unwrap_lora
from quartet.stages.rl_async import SNAPSHOT_DIR, RolloutProducer, check_async
from quartet.stages.rl_experience import ExperienceMaker
from quartet.stages.rl_setup import PromptRow, check_batches_split, load_rl_models, load_rl_prompts, prompt_sharing

# Per-step metrics whose first and last fifth of the run go into summary.json.
SUMMARY_KEYS = ("score/mean", "kl/ref", "reward/total", "response/length")


class RLTrainer(Job):
    """Holds the models of one online-RL run and runs its steps through the one run loop."""

    logs = ("metrics.jsonl", "samples.jsonl")

    def __init__(self, cfg: RLConfig, actor: PreTrainedModel, reference: PreTrainedModel | None,
                 critic: PreTrainedModel | None, reward: RewardSource, tokenizer: PreTrainedTokenizerBase,
                 prompts: list[PromptRow], run: Run, reward_stats: tuple[float, float] | None = None,
                 metric_fns: Sequence[MetricFn] = (), eval_prompts: Sequence[PromptRow] = ()):
        self.cfg, self.algorithm = cfg, get_algorithm(cfg.algorithm.name)
        if self.algorithm.needs_critic != (critic is not None):
            raise ValueError(f"algorithm {self.algorithm.name!r} {'needs' if critic is None else 'takes no'} critic")
        self.actor, self.reference, self.critic, self.reward = actor, reference, critic, reward
        self.tokenizer, self.run, self.ranks, self.device = tokenizer, run, run.ranks, run.device
        check_batches_split(cfg, self.ranks)
        o = cfg.optim
        self.group_size = prompt_sharing(cfg, actor, critic, self.ranks)  # 1: every row computes its prompt
        if why := lean_unsupported(actor):
            self.ranks.print(f"[{cfg.algorithm.name}] note: the actor's decode steps and forwards run through its "
                             f"forward, without lean passes (slower at small batches): {why}")
        self.experience = ExperienceMaker(cfg, self.algorithm, actor, reference, reward, tokenizer, prompts, self.ranks,
                                          reward_stats, metric_fns, self.group_size)
        if cfg.rollout.max_staleness is not None:  # asynchronous RL: a rollout producer process samples
            check_async(cfg, self.ranks)
            self.experience.producer = RolloutProducer(self.experience, cfg.rollout, note=self.ranks.print)
        if cfg.models.shared_trunk:
            if self.ranks.shards_parameters:
                raise ValueError("models.shared_trunk runs on one process or with DDP; FSDP and DeepSpeed would "
                                 "shard the shared trunk twice: turn it off for them")
            share_trunk(actor, critic)
        for model in (actor, critic, reference, reward.model):
            if model is not None:
                model.to(self.device)
                model.eval()  # dropout off everywhere in online RL
        for frozen in (reference, reward.model):
            if frozen is not None:
                frozen.requires_grad_(False)
        self.policy = ActorCritic(actor, critic, shared_trunk=cfg.models.shared_trunk)
        self._shard_models()
        # with a shared trunk the critic's own parameters are its score head (no parameter in two groups)
        groups = [{"params": actor.parameters(), "lr": o.actor_lr}]
        if critic is not None:
            groups.append({"params": head_parameters(critic, actor), "lr": o.critic_lr})
        self.optimizer = make_optimizer(groups, o.actor_lr, o.weight_decay)
        self.trained: torch.nn.Module = self.policy  # wrapped for the launched backend in begin()
        self.update_forward: torch.nn.Module = self.trained  # torch.compile(d) in begin() with train.compile
        self.clipped = self._clipped_parameters()
        self.value_weight = cfg.algorithm.vf_coef if cfg.models.shared_trunk else 1.0
        a = cfg.algorithm
        self.kl_ctl = (AdaptiveKLController(a.beta, a.kl_target, a.kl_horizon) if a.adaptive_kl
                       else FixedKLController(a.beta))
        self.history: list[dict[str, float]] = []  # every step's SUMMARY_KEYS, kept across resumes
        self.step, self.total_steps = 0, cfg.train.steps
        self.generated_tokens = 0  # response tokens sampled so far: the budget train.max_generated_tokens counts them
        self.eval_prompts = list(eval_prompts)
        self.first_eval: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}

    def _shard_models(self) -> None:
        """Under FSDP: the actor and the critic (through its per-token value module, whose forward the
        update runs) sharded, each block its own unit; with run.fsdp_frozen the reference and the reward
        model too (the reward model's trunk: its score head, one row, stays whole)."""
        ranks = self.ranks
        ranks.shard(self.actor)
        if self.policy.critic is not None:
            ranks.shard(self.policy.critic, self.critic)
        if self.reference is not None:
            ranks.shard_frozen(self.reference)
        if self.reward.model is not None:
            ranks.shard_frozen(self.reward.model.base_model, self.reward.model)

    def _clipped_parameters(self) -> list[tuple[str, list[torch.nn.Parameter]]]:
        """Each trained model's parameters, clipped separately; listed once (walking the module
        trees every optimizer step costs about 1 ms)."""
        clipped = [("actor", list(self.actor.parameters()))]
        if self.critic is not None:
            clipped.append(("critic", head_parameters(self.critic, self.actor)))
        return clipped

    def step_generator(self, purpose: int) -> torch.Generator:
        """Random numbers of one step, the same on every rank and after a resume."""
        return torch.Generator(device=self.device).manual_seed(derive_seed(self.cfg.run.seed, "step", self.step, purpose))

    # ------------------------------------------------------------------ update

    def update(self, exp: Experience) -> dict[str, float]:
        """`ppo_epochs` passes of the algorithm's losses over shuffled mini-batches.

        Every rank holds the whole batch and draws the same mini-batches; each computes the
        losses of its share of every mini-batch, and the gradient all-reduce (DDP averages)
        completes the exact aggregate over the mini-batch.
        """
        b, ranks = self.cfg.batch, self.ranks
        sums: dict[str, float] = {}
        norms: dict[str, float] = {}
        n_updates = 0
        shuffle = self.step_generator(STEP_UPDATE)
        for epoch in range(b.ppo_epochs):
            # the entropy (a metric only) is measured in the first pass over the batch: a vocab-wide
            # exp and sum per token, which later epochs would repeat for a near-identical number
            with_entropy = epoch == 0
            order = self._shuffled_rows(exp.mask.shape[0], shuffle)
            for mini in order.split(b.mini_batch_size):
                micros = self._micro_batches(exp, mini)
                for i, (micro, weight, token_weight) in enumerate(micros):
                    with ranks.micro_batch(self.trained, last=i == len(micros) - 1):
                        loss, value_part, terms = self._micro_loss(exp, micro, with_entropy)
                        ranks.backward(self._scaled(loss, value_part, weight, token_weight))
                    for key, value in terms.items():  # the entropy times ppo_epochs: averaged like the rest
                        share = weight if key in ("loss/policy", "loss/kl") else token_weight  # token means: tokens
                        sums[key] = sums.get(key, 0.0) + value * share * (b.ppo_epochs if key == "policy/entropy" else 1)
                for key, norm in self._clip_and_step().items():
                    norms[key] = norms.get(key, 0.0) + norm
                n_updates += 1
        keys = sorted(sums)
        totals = ranks.sum_floats([sums[k] for k in keys])  # each rank's share of the aggregates
        metrics = {k: v / n_updates for k, v in zip(keys, totals)}
        metrics.update({k: v / n_updates for k, v in norms.items()})  # already global
        if exp.returns is not None:
            metrics["value/explained_variance"] = float(explained_variance(exp.old_values, exp.returns, exp.mask))
        return metrics

    def _shuffled_rows(self, n_rows: int, generator: torch.Generator) -> torch.Tensor:
        """A seeded order of the batch's rows; whole groups, kept together, when prompts are shared."""
        n = self.group_size
        if n == 1:
            return torch.randperm(n_rows, generator=generator, device=self.device)
        groups = torch.randperm(n_rows // n, generator=generator, device=self.device)
        return (groups[:, None] * n + torch.arange(n, device=self.device)).flatten()

    def _micro_batches(self, exp: Experience, mini: torch.Tensor) -> list[tuple[torch.Tensor, float, float]]:
        """This rank's micro-batches of a mini-batch, each with its share of the mini-batch's units (per
        the aggregation: tokens or sequences) and of its tokens (what token means such as the value loss
        and the stats average over): exact under accumulation and across ranks."""
        mode, mask = self.cfg.algorithm.aggregation, exp.loss_mask

        def shares(rows: torch.Tensor, whole: torch.Tensor, by: str) -> float:
            # integer counts divided in float64: the shares sum to 1 to 1e-16, not float32's 6e-8
            return int(loss_units(mask[rows], by)) / max(int(loss_units(mask[whole], by)), 1)

        start, end = self.ranks.share(mini)
        micro_size = self.cfg.batch.mini_batch_size // self.cfg.batch.grad_accum // self.ranks.world
        return [(micro, shares(micro, mini, mode), shares(micro, mini, "token-mean"))
                for micro in mini[start:end].split(micro_size)]

    def _scaled(self, loss: torch.Tensor, value_part: torch.Tensor | None, weight: float, token_weight: float) -> torch.Tensor:
        """The micro-batch's share of the mini-batch's loss, times the world size DDP divides by."""
        world = self.ranks.world
        if value_part is None:
            return loss * (weight * world)
        if weight == token_weight:  # one unit for both (token-mean): one scaling
            return (loss + value_part) * (weight * world)
        return loss * (weight * world) + value_part * (token_weight * world)

    def _micro_loss(self, exp: Experience, micro: torch.Tensor, with_entropy: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """One micro-batch's policy loss (the aggregate over it, with the KL term when it is in the loss),
        its weighted value loss (None without a critic; a token mean) and its metric terms."""
        a, loss_mask = self.cfg.algorithm, exp.loss_mask[micro]
        aggregation, max_new = a.aggregation, self.cfg.rollout.generation_limit
        with autocast_context(self.device, self.cfg.train.bf16):
            logprobs, entropy, values = self.update_forward(exp.sequences[micro], exp.attention_mask[micro],
                                                            exp.response_ids[micro], self.cfg.rollout.temperature,
                                                            with_entropy, self.group_size)
            pg_losses, pg_stats = self.algorithm.policy_losses(logprobs.float(), exp.old_logprobs[micro],
                                                               exp.advantages[micro], loss_mask, a)
            if exp.behaviour_weights is not None:  # off-policy correction: pi_old / pi_sampler per token
                pg_losses = pg_losses * exp.behaviour_weights[micro]
            loss = aggregate(pg_losses, loss_mask, aggregation, max_new)
            terms = {"loss/policy": loss, **{f"policy/{k}": v for k, v in pg_stats.items()}}
            if a.kl_in_loss and exp.ref_logprobs is not None:  # beta x the aggregated KL estimate (GRPO's k3)
                kl = kl_estimate(logprobs.float(), exp.ref_logprobs[micro], a.kl_estimator, mask=loss_mask)
                terms["loss/kl"] = aggregate(kl, loss_mask, aggregation, max_new)
                loss = loss + self.kl_ctl.value * terms["loss/kl"]
            value_part = None
            if values is not None:
                # separate models share no parameters, so only a shared trunk weighs the value loss
                vf_loss, vf_stats = value_loss(values.float(), exp.old_values[micro], exp.returns[micro], loss_mask,
                                               a.cliprange_value)
                value_part = self.value_weight * vf_loss
                terms.update({"loss/value": vf_loss, "value/clipfrac": vf_stats["clipfrac"]})
        if with_entropy:
            terms["policy/entropy"] = masked_mean(entropy, loss_mask)
        return loss, value_part, {k: float(v.detach()) for k, v in terms.items()}

    def _clip_and_step(self) -> dict[str, float]:
        """Clip each trained model's gradients, then step when all are finite; the norms before clipping."""
        norms = {f"grad_norm/{name}": self.ranks.clip_grad_norm(params, self.cfg.optim.max_grad_norm)
                 for name, params in self.clipped}
        if all(math.isfinite(norm) for norm in norms.values()):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norms

    # ------------------------------------------------------------------ the run loop's job

    def begin(self) -> None:
        # wrapped after loading, so every rank starts from the same weights and optimizer state
        self.trained, self.optimizer = self.ranks.prepare(self.policy, self.optimizer)
        # the update's forward and backward, optionally compiled (generation and scoring stay eager)
        self.update_forward = torch.compile(self.trained) if self.cfg.train.compile else self.trained
        self.clipped = self._clipped_parameters()
        if self.step == 0 and self.eval_prompts:  # the starting point of the held-out curves
            self.first_eval = self.last_eval = self.experience.evaluate(self.trained, self.eval_prompts,
                                                                        greedy_accuracy=True)
            self.run.metrics.log(0, self.first_eval)

    def train_step(self) -> StepOutcome:
        started = time.perf_counter()
        exp, metrics = self.experience.make(self.trained, self.step, self.kl_ctl.value)
        t0 = time.perf_counter()
        finite = exp.is_finite()
        if finite:  # a NaN score or reward would poison every update of the step
            metrics.update(self.update(exp))
            finite = NonFiniteGuard.finite(*(v for k, v in metrics.items() if k.startswith(("loss/", "grad_norm/"))))
        metrics["time/training"] = time.perf_counter() - t0
        metrics["time/step"] = time.perf_counter() - started
        metrics["time/tokens_per_second"] = float(exp.mask.sum()) / max(metrics["time/generation"], 1e-9)
        if "kl/ref" in metrics:
            self.kl_ctl.update(metrics["kl/ref"], self.cfg.batch.rollout_batch_size)
        self.step += 1
        t = self.cfg.train
        self.generated_tokens += int(exp.mask.sum())
        metrics["tokens/generated"] = self.generated_tokens
        if t.max_generated_tokens and self.generated_tokens >= t.max_generated_tokens:
            self.total_steps = self.step  # the token budget is spent: this is the last step
        evaluated = bool(self.eval_prompts) and (self.step % t.eval_every == 0 or self.step == self.total_steps)
        if evaluated:
            self.last_eval = self.experience.evaluate(self.trained, self.eval_prompts,
                                                      greedy_accuracy=self.step == self.total_steps)
            metrics.update(self.last_eval)
        if t.n_samples and self.ranks.is_main and (self.step % t.sample_every == 0 or self.step in (1, t.steps)):
            write_samples(self.run.dir / "samples.jsonl", self.step,
                          sample_records(exp, self.tokenizer, self.step, t.n_samples))
        self.history.append({k: float(metrics[k]) for k in SUMMARY_KEYS if k in metrics})
        return StepOutcome(metrics, finite, log=evaluated)

    def progress(self) -> tuple[int, int, str]:
        """Generated tokens against `train.max_generated_tokens` when that budget can end the run before its
        steps do (the arena sets a million steps and a budget); steps otherwise."""
        t = self.cfg.train
        most_per_step = self.cfg.batch.rollout_batch_size * self.cfg.rollout.generation_limit
        if t.max_generated_tokens and t.max_generated_tokens < t.steps * most_per_step:
            return min(self.generated_tokens, t.max_generated_tokens), t.max_generated_tokens, "tok"
        return self.step, self.total_steps, "step"

    def postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        # the sampled score, the KL to the reference (kl/ref) and the mean response length
        return format_postfix(metrics, ["score/mean", "kl/ref", "response/length"], labels={"kl/ref": "kl"})

    def _full_state_dicts(self) -> tuple[dict | None, dict | None]:
        """Gathered actor and critic weights when training shards them (a collective), else None."""
        state = self.ranks.full_state_dict(self.trained) if self.ranks.shards_parameters else None
        if state is None:
            return None, None
        return ({k[len("actor."):]: v for k, v in state.items() if k.startswith("actor.")},
                {k[len("critic.model."):]: v for k, v in state.items() if k.startswith("critic.model.")})

    def model_writer(self) -> Callable[[Path], None]:
        actor_state, critic_state = self._full_state_dicts()

        def write(tmp: Path) -> None:
            save_model(self.actor, self.tokenizer, tmp / "actor", state_dict=actor_state)
            if self.critic is not None:
                save_model(self.critic, self.tokenizer, tmp / "critic", state_dict=critic_state)
            if self.experience.producer is not None:
                self.experience.producer.write_snapshots(tmp / SNAPSHOT_DIR, self.step)
        return write

    def training_state(self) -> dict[str, Any]:
        # a sharded optimizer's state lives on every rank; it is not gathered
        return {"optimizer": None if self.ranks.shards_parameters else self.optimizer.state_dict(),
                "kl_ctl": self.kl_ctl.state_dict(), "history": self.history, "generated_tokens": self.generated_tokens,
                "first_eval": self.first_eval, "last_eval": self.last_eval, **self.experience.state_dict()}

    def load_models(self, checkpoint: Path) -> None:
        load_weights(self.actor, checkpoint / "actor")
        if self.critic is not None:
            load_weights(self.critic, checkpoint / "critic")

    def sharded_parts(self) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        return self.policy, self.optimizer

    def frozen_models(self) -> tuple[torch.nn.Module, ...]:
        return tuple(m for m in (self.reference, self.reward.model) if m is not None)

    def load_training_state(self, state: dict[str, Any], checkpoint: Path) -> None:
        load_optimizer_state(self.optimizer, state["optimizer"], checkpoint)
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        if self.experience.producer is not None:
            self.experience.producer.read_snapshots(checkpoint / SNAPSHOT_DIR, state["step"])
        self.experience.load_state_dict(state)
        self.history = list(state["history"])
        self.generated_tokens = state.get("generated_tokens", 0)  # checkpoints of earlier versions have none
        self.first_eval, self.last_eval = state.get("first_eval", {}), state.get("last_eval", {})

    def train(self) -> dict[str, Any]:
        try:
            seconds = RunLoop(self, self.run, self.cfg.train).run_to_end()
        finally:
            if self.experience.producer is not None:
                self.experience.producer.close()
        return {"steps": self.step, "seconds": seconds, "generated_tokens": self.generated_tokens,
                **{f"initial_{k}": v for k, v in self.first_eval.items()}, **self.last_eval,
                "history": list(self.history)}

    def final_models(self) -> tuple[tuple[PreTrainedModel, dict | None], tuple[PreTrainedModel | None, dict | None]]:
        """(actor, its gathered weights or None), (critic or None, likewise): `final/` and `final_critic/`."""
        actor_state, critic_state = self._full_state_dicts()
        return (unwrap_lora(self.actor), actor_state), (self.critic, critic_state)


# ----------------------------------------------------------------------------- set-up


def run_rl(cfg: RLConfig, resume: bool = False, reward_fn: RewardFn | None = None,
           metric_fns: Sequence[MetricFn] = ()) -> dict[str, Any]:
    """Run the online-RL stage described by `cfg` (its algorithm: `cfg.algorithm.name`).

    `reward_fn(prompts, responses) -> scores` may replace the reward model; each of
    `metric_fns(prompts, responses) -> {name: value}` adds measurements to every step's metrics.
    """
    if not cfg.data.train:
        raise ValueError("data.train is required: a prompt file (fields 'prompt' or 'messages')")
    algorithm = get_algorithm(cfg.algorithm.name)
    seed_everything(cfg.run.seed)
    run = Run(cfg.run.output_dir, cfg, stage=algorithm.name, resume=resume)
    check_batches_split(cfg, run.ranks)
    m = cfg.models
    for role, path in (("models.actor", m.actor), ("models.reference", m.reference), ("models.critic", m.critic),
                       ("models.reward", None if (reward_fn or m.reward_fn) else m.reward)):
        if path:
            check_model_dir(path, role, m.allow_pickle)
    tokenizer = load_tokenizer(m.actor, m.trust_remote_code)
    tokenizer.padding_side = "left"
    prompts, eval_prompts, stats = load_rl_prompts(cfg, tokenizer)
    reward, reward_stats = build_reward_source(m, tokenizer, reward_fn)
    run.ranks.print(f"[{algorithm.name}] {len(prompts)} prompts" + (f", {len(eval_prompts)} held out" if eval_prompts else "")
                    + f"; {stats.summary()}")
    if m.critic_init_defaulted:
        run.ranks.print(f"[{algorithm.name}] the critic starts from the actor (models.critic_init=actor): reward "
                        "functions give no reward model to start it from")
    actor, reference, critic = load_rl_models(cfg, algorithm, tokenizer)
    r = cfg.rollout
    if r.episodes:  # every turn's answer and observation, or the episode's budget
        after_prompt = r.max_turns * (r.max_new_tokens + r.max_observation_tokens)
        check_context_length(actor, max(len(ids) for ids, _ in prompts) + min(after_prompt, r.max_episode_tokens or after_prompt),
                             "prompt + an episode's tokens",
                             "data.max_prompt_length, rollout.max_turns, max_new_tokens, max_observation_tokens or "
                             "max_episode_tokens")
    else:
        check_context_length(actor, max(len(ids) for ids, _ in prompts) + r.max_new_tokens,
                             "prompt + generated tokens", "data.max_prompt_length and rollout.max_new_tokens")
    check_fsdp_options(run.ranks, lora=cfg.lora.enabled, shared_trunk=cfg.models.shared_trunk, compile=cfg.train.compile,
                       episodes=r.episodes)
    run.start()  # inputs are valid: only now is the output directory touched
    trainer = RLTrainer(cfg, actor, reference, critic, reward, tokenizer, prompts, run, reward_stats, metric_fns,
                        eval_prompts)
    result = trainer.train()
    (actor, actor_state), (critic, critic_state) = trainer.final_models()
    if critic is not None:
        run.save_final(critic, tokenizer, name="final_critic", state_dict=critic_state)
    run.save_final(actor, tokenizer, state_dict=actor_state)
    history = result.pop("history")
    summary = {"stage": algorithm.name, "final_dir": str(run.final_dir), "n_prompts": len(prompts), **result}
    if history:
        k = max(1, len(history) // 5)  # first and last fifth of the run
        for key in SUMMARY_KEYS:
            if all(key in h for h in history):  # kl/ref only where a reference was scored
                summary[f"first/{key}"] = sum(h[key] for h in history[:k]) / k
                summary[f"last/{key}"] = sum(h[key] for h in history[-k:]) / k
    run.write_summary(summary)
    run.close()
    if history:
        run.ranks.print(closing_line(summary, cfg.rollout, run.steps_done(result["steps"], result["seconds"])))
    return summary


def closing_line(summary: dict[str, Any], rollout: SamplingConfig, steps_done: str | None = None) -> str:
    """The line an RL run ends with: what this process ran (`steps_done`, default the summary's steps
    and seconds), its training score (sampled at the rollout's settings, the mean of the first and of the
    last fifth of the steps), held-out greedy accuracy where a verifier judged held-out prompts, the KL to
    the reference, and where the actor is."""
    sampling = "greedy" if rollout.greedy else f"T={rollout.temperature:g}"
    steps_done = steps_done or f"{summary['steps']} steps in {summary['seconds']:.1f}s"
    parts = [f"[{summary['stage']}] {steps_done}",
             f"sampled score ({sampling}) {summary['first/score/mean']:.3f} -> {summary['last/score/mean']:.3f} "
             "(first -> last fifth of the steps)"]
    for key in sorted(k for k in summary if k.startswith("greedy_eval/accuracy/")):
        before = summary.get(f"initial_{key}")
        parts.append(f"held-out greedy accuracy ({key.rsplit('/', 1)[1]}) "
                     + (f"{before:.3f} -> " if before is not None else "") + f"{summary[key]:.3f}")
    if "last/kl/ref" in summary:
        parts.append(f"KL to reference {summary['last/kl/ref']:.3f}")
    return "; ".join([*parts, f"actor in {summary['final_dir']}"])
