"""Reward sources: a frozen reward model, Python reward functions with weights, or reward servers
(`scoring.remote`), behind one call.

A reward function is `fn(prompts, responses, **columns) -> one score per response`, where
`columns` are the batch's other dataset columns (e.g. `answer=[...]`), aligned with the rows:
a verifier checks a response against its row's ground truth. A function may return None for a
row it does not judge (that row is left out of its share). Functions that take only
`(prompts, responses)` keep working; `async def` functions are awaited concurrently.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quartet.config import RLModelsConfig
from quartet.models.forward import in_row_chunks, sequence_scores
from quartet.models.loading import ModelLoadError, load_scalar_model
from quartet.models.tokenizer import load_tokenizer
from quartet.rollout.generate import Rollout
from quartet.scoring.remote import RemoteRewards, remote_rewards_from_config
from quartet.user_code import function_name, keywords_taken
from quartet.user_code import load_callable as _load_user_callable

RewardFn = Callable[..., Sequence[float | None]]
# Extra per-step measurements of the rollouts, e.g. the demo's hidden gold judge.
MetricFn = Callable[[list[str], list[str]], dict[str, float]]


def load_callable(spec: str) -> RewardFn:
    """Import a reward function 'package.module:function' (or 'package.module.function')."""
    return _load_user_callable(spec, "models.reward_fn")


def _columns_taken(fn: Callable, columns: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """The columns `fn` accepts as keywords besides (prompts, responses)."""
    return keywords_taken(fn, columns, exclude=("prompts", "responses"))


class RewardFunctions:
    """Several reward functions with weights; the score of a row is the weighted sum over the
    functions that judged it (0 when none did)."""

    def __init__(self, fns: Sequence[RewardFn], weights: Sequence[float] | None = None):
        self.fns = list(fns)
        self.weights = [1.0] * len(self.fns) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.fns):
            raise ValueError(f"{len(self.weights)} reward weights for {len(self.fns)} reward functions")
        names = [function_name(fn) for fn in self.fns]
        # two functions of one name (e.g. two lambdas) are told apart by their position
        self.names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]

    def verifiers(self) -> list[str]:
        """Names of the functions that say correct (1.0) or incorrect (0.0)."""
        return [name for name, fn in zip(self.names, self.fns) if getattr(fn, "verifies", False)]

    def __call__(self, prompts: list[str], responses: list[str], columns: dict[str, list[Any]]
                 ) -> tuple[list[float], dict[str, list[float]]]:
        """Total scores, and each function's scores (NaN where it did not judge).

        A NaN a function returns stays NaN in the total: the step is then skipped as non-finite.
        """
        outputs = self._call_all(prompts, responses, columns)
        parts = {name: self._checked(name, out, len(responses)) for name, out in zip(self.names, outputs)}
        totals = [sum(w * part[i] for w, part in zip(self.weights, parts.values()) if part[i] is not None)
                  for i in range(len(responses))]
        return totals, {name: [math.nan if v is None else v for v in part] for name, part in parts.items()}

    def _call_all(self, prompts: list[str], responses: list[str], columns: dict[str, list[Any]]) -> list[Any]:
        calls = [partial(fn, prompts, responses, **_columns_taken(fn, columns)) for fn in self.fns]
        outputs: list[Any] = [None] * len(calls)
        pending = []
        for i, (fn, call) in enumerate(zip(self.fns, calls)):
            if inspect.iscoroutinefunction(fn):
                pending.append(i)
            else:
                outputs[i] = call()
        if pending:
            async def gather() -> list[Any]:
                return await asyncio.gather(*(calls[i]() for i in pending))
            for i, out in zip(pending, asyncio.run(gather())):
                outputs[i] = out
        return outputs

    @staticmethod
    def _checked(name: str, out: Any, n: int) -> list[float | None]:
        try:
            values = list(out)
        except TypeError:
            raise ValueError(f"reward function {name} returned {type(out).__name__}, not one score per response") from None
        if len(values) != n:
            raise ValueError(f"reward function {name} returned {len(values)} values for {n} responses")
        checked = []
        for i, v in enumerate(values):
            if v is None:
                checked.append(None)
            elif isinstance(v, numbers.Real) or (isinstance(v, torch.Tensor) and v.numel() == 1):
                checked.append(float(v))
            else:
                raise ValueError(f"reward function {name} returned {v!r} ({type(v).__name__}) for row {i}: "
                                 "return a number, or None for a row it does not judge")
        return checked


class RewardSource:
    """Scores prompt+response: a frozen reward model, reward functions, or reward servers."""

    def __init__(self, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 same_tokenizer: bool = True, fn: RewardFn | RewardFunctions | None = None,
                 remote: RemoteRewards | None = None):
        if fn is not None and not isinstance(fn, RewardFunctions):
            fn = RewardFunctions([fn])
        self.model, self.tokenizer, self.same_tokenizer, self.functions = model, tokenizer, same_tokenizer, fn
        self.remote = remote

    @property
    def reads_text(self) -> bool:
        """Reward functions, reward servers, or a reward model with its own tokenizer, score decoded text
        (not token ids)."""
        return self.functions is not None or self.remote is not None or not self.same_tokenizer

    @torch.no_grad()
    def __call__(self, rollout: Rollout, prompts: list[str] | None, responses: list[str] | None,
                 rows_per_forward: int | None = None, columns: dict[str, list[Any]] | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One score per rollout row, and each reward function's share ({} for a reward model).

        A reward model runs `rows_per_forward` rows at a time (None: all). `prompts` and
        `responses` are the decoded texts, needed only when `reads_text`; `columns` the rows'
        other dataset columns, for reward functions.
        """
        device = rollout.prompt_ids.device
        if self.remote is not None:  # every answer checked; a server down past its retries raises RewardServerDown
            labels = (columns or {}).get("label")
            return torch.tensor(self.remote(prompts, responses, labels), dtype=torch.float32, device=device), {}
        if self.functions is None and self.model is None:  # an environment's rewards alone
            return torch.zeros(rollout.prompt_ids.shape[0], device=device), {}
        if self.functions is not None:
            totals, parts = self.functions(prompts, responses, columns or {})
            as_tensor = partial(torch.as_tensor, dtype=torch.float32, device=device)
            return as_tensor(totals), {name: as_tensor(values) for name, values in parts.items()}
        if self.same_tokenizer:
            ids, mask = rollout.sequences, rollout.attention_mask
        else:  # a reward model with its own tokenizer reads the text, re-encoded its way
            texts = [p + r + (self.tokenizer.eos_token or "") for p, r in zip(prompts, responses)]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            ids, mask = enc["input_ids"], enc["attention_mask"]
        return in_row_chunks(partial(sequence_scores, self.model), rows_per_forward, ids, mask).float(), {}


def _same_vocab(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    return a.get_vocab() == b.get_vocab()


def build_reward_source(models: RLModelsConfig, tokenizer: PreTrainedTokenizerBase,
                        reward_fn: RewardFn | Sequence[RewardFn] | None) -> tuple[RewardSource, tuple[float, float] | None]:
    """The configured reward source, and the reward model's stored score mean/std when it has them.

    `reward_fn` (one function or several, from Python) takes the place of `models.reward_fn`.
    """
    if reward_fn is not None or models.reward_fn:
        if reward_fn is None:
            specs = models.reward_fn if isinstance(models.reward_fn, list) else [models.reward_fn]
            fns = [load_callable(spec) for spec in specs]
        else:
            fns = list(reward_fn) if isinstance(reward_fn, (list, tuple)) else [reward_fn]
        return RewardSource(fn=RewardFunctions(fns, models.reward_weights)), None
    if models.reward_urls:
        return RewardSource(remote=remote_rewards_from_config(models)), None
    if not models.reward:  # an environment's rewards alone
        return RewardSource(), None
    reward_tokenizer = tokenizer
    if (Path(models.reward) / "tokenizer_config.json").exists():
        reward_tokenizer = load_tokenizer(models.reward, models.trust_remote_code)
    try:
        model = load_scalar_model(models.reward, models.trust_remote_code, models.allow_pickle,
                                  pad_token_id=reward_tokenizer.pad_token_id, require_trained_head=True)
    except ModelLoadError as err:
        raise ModelLoadError(f"models.reward: {err}") from None
    stats = None
    if getattr(model.config, "reward_mean", None) is not None:
        stats = (float(model.config.reward_mean), float(model.config.reward_std))
    return RewardSource(model=model, tokenizer=reward_tokenizer,
                        same_tokenizer=_same_vocab(tokenizer, reward_tokenizer)), stats
