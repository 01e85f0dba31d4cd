"""What the online-RL stage sets up before its first step: prompts, models, and the checks that
stop a run before its directory is touched."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quartet.config import RLConfig
from quartet.data import TruncationStats, load_prompts, tokenize_prompt_examples
from quartet.envs import load_tools, tool_schema
from quartet.models.loading import load_causal_lm, load_scalar_model
from quartet.models.shared_prompt import prompt_sharing_supported
from quartet.rl.algorithms import Algorithm
from quartet.runs.distributed import Ranks
from quartet.stages.common import apply_lora, split_held_out

PromptRow = tuple[list[int], dict[str, Any]]  # a prompt's token ids and its row's other dataset columns


def load_rl_prompts(cfg: RLConfig, tokenizer: PreTrainedTokenizerBase
                    ) -> tuple[list[PromptRow], list[PromptRow], TruncationStats]:
    """The training prompts and the held-out ones (data.eval, or data.eval_fraction of data.train), with
    their dataset columns; the training prompts' truncation counts."""
    d = cfg.data
    # an agent's tools are described to the model where the chat template renders them
    tools = [tool_schema(fn) for fn in load_tools(cfg.rollout.tools)] if cfg.rollout.tools else None

    def rows(path: str, limit: int | None = None) -> tuple[list[PromptRow], TruncationStats]:
        examples = load_prompts(path, tokenizer, tools=tools)[:limit]
        kept, stats = tokenize_prompt_examples(examples, tokenizer, d.max_prompt_length)
        return [(ids, example.columns) for ids, example in kept], stats

    prompts, stats = rows(d.train, d.limit)
    if d.eval:
        eval_prompts = rows(d.eval)[0]
    else:
        prompts, eval_prompts = split_held_out(prompts, d.eval_fraction, cfg.run.seed)
    if not prompts:
        raise ValueError(f"{d.train}: no prompts left after loading")
    return prompts, eval_prompts, stats


def check_batches_split(cfg: RLConfig, ranks: Ranks) -> None:
    """Every rank must get an equal share of the prompts (whole groups: a group never straddles two
    ranks) and of each mini-batch's micro-batches."""
    b, n = cfg.batch, cfg.rollout.n
    ranks.check_divisible(b.rollout_batch_size // n, "batch.rollout_batch_size" if n == 1 else
                          f"the prompts per step (batch.rollout_batch_size / rollout.n = {b.rollout_batch_size} / {n})")
    ranks.check_divisible(b.mini_batch_size // b.grad_accum, "batch.mini_batch_size / batch.grad_accum")


def prompt_sharing(cfg: RLConfig, actor: PreTrainedModel, critic: PreTrainedModel | None, ranks: Ranks) -> int:
    """The group size whose rows share one prompt computation in the reference and training forwards,
    or 1 (per row): batch.share_prompts, by default on for group sampling without a critic. Where a
    setting or the model cannot take it, a one-line note says why and every row computes its prompt."""
    n, asked = cfg.rollout.n, cfg.batch.share_prompts
    if n == 1 or asked is False:
        return 1
    micro = cfg.batch.mini_batch_size // cfg.batch.grad_accum // ranks.world
    ok, reason = prompt_sharing_supported(actor)
    if critic is not None:
        ok, reason = False, "the critic's values are computed per row"
    elif micro % n:
        ok, reason = False, (f"a micro-batch ({micro} rows per process) is not whole groups of rollout.n = {n}; "
                             "make batch.mini_batch_size / batch.grad_accum / processes a multiple of it")
    if not ok and (asked or critic is None):
        ranks.print(f"[{cfg.algorithm.name}] note: prompts are computed per row, not once per group: {reason}")
    return n if ok else 1


def load_rl_models(cfg: RLConfig, algorithm: Algorithm, tokenizer: PreTrainedTokenizerBase
                   ) -> tuple[PreTrainedModel, PreTrainedModel | None, PreTrainedModel | None]:
    """Actor (with LoRA when asked), frozen reference (None without a KL term, or with LoRA: the actor with
    its adapters off), critic (None without)."""
    m = cfg.models
    actor = load_causal_lm(m.actor, m.trust_remote_code, m.allow_pickle)
    reference = None
    if cfg.lora.enabled:
        actor = apply_lora(actor, cfg.lora)
        if cfg.algorithm.uses_reference and (m.reference or m.actor) != m.actor:
            reference = load_causal_lm(m.reference, m.trust_remote_code, m.allow_pickle)
    elif cfg.algorithm.uses_reference:  # no KL term: no reference
        reference = load_causal_lm(m.reference or m.actor, m.trust_remote_code, m.allow_pickle)
    critic = None
    if algorithm.needs_critic:
        # a shared trunk is the actor's: the critic's score head starts fresh, as with critic_init=actor
        source = m.actor if m.shared_trunk else m.critic or (m.reward if m.critic_init == "reward" else m.actor)
        critic = load_scalar_model(source, m.trust_remote_code, m.allow_pickle, pad_token_id=tokenizer.pad_token_id)
    return actor, reference, critic
