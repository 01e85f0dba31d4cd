"""Multi-turn episodes on the kept KV cache: the model acts, an environment answers, the model acts again.

Token in, token out: the history is never re-tokenised. Each turn appends the ids the model
sampled (its end-of-turn token included), then the environment's observation rendered as the
chat template's suffix for those messages, as ids, prefilled onto the same KV cache. The rows of a
batch take their turns together: a row whose turn ended early, or whose episode is over, writes
padding that no later position attends to, and each observation chunk is left-padded to the
batch's longest, so the next-token logits of every row sit in the chunk's last column.

The result is compacted, row by row, to prompt + response with no holes: `response_mask` marks
the tokens that exist (model and observation tokens), `action_mask` the ones the policy chose,
`turn_ids` the turn of each chosen token. Random draws are per turn (one generator a turn, seeded
from the batch's generator before the first token), so a row samples the same tokens however a
global batch is split over ranks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quartet.config import SamplingConfig
from quartet.models.compiled_decode import CompiledDecoder, compiled_capacity
from quartet.models.forward import cache_kwarg, position_ids_from_mask
from quartet.models.lean import lean_decode_step
from quartet.rollout.generate import Rollout, TokenSampler, rollout_cache

__all__ = ["EpisodeLimits", "EpisodeDriver", "EpisodeRecord", "ObservationRenderer", "TemplateMismatch",
           "sample_episodes"]

Message = dict[str, Any]
END_REASONS = ("done", "max_turns", "length", "budget")  # why an episode ended


class TemplateMismatch(ValueError):
    """The tokenizer's chat template does not extend a conversation by appending to it."""


class StepOutcome(Protocol):
    messages: list[Message]  # the observation as chat messages (none when the episode is done)
    reward: float
    done: bool


class EpisodeDriver(Protocol):
    """The environments of a batch's episodes: `step` acts for the rows given, in that order."""

    def step(self, rows: list[int], actions: list[str]) -> Sequence[StepOutcome]: ...


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int = 4  # model turns per episode
    max_observation_tokens: int = 256  # per observation message's content; longer ones are cut, and say so
    max_episode_tokens: int | None = None  # model + observation tokens after the prompt


@dataclass
class EpisodeRecord:
    """What happened in one episode, for rewards, metrics and reports."""

    messages: list[Message] = field(default_factory=list)  # the assistant and observation messages, in order
    turn_rewards: list[float] = field(default_factory=list)  # the environment's reward after each model turn
    ended: str = "max_turns"  # one of END_REASONS
    observations_cut: int = 0

    @property
    def turns(self) -> int:
        return sum(1 for m in self.messages if m["role"] == "assistant")

    @property
    def env_reward(self) -> float:
        return float(sum(self.turn_rewards))


class ObservationRenderer:
    """Observation messages as the ids the chat template appends after an assistant turn.

    The suffix is the difference between rendering a conversation with and without the messages
    (with the next assistant turn opened), plus whatever the template writes after the assistant's
    end-of-turn token (a newline in some templates); the model's own tokens end at that token.
    """

    _BASE = [{"role": "user", "content": "?"}]
    _ACTION = {"role": "assistant", "content": "!"}

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_observation_tokens: int = 256):
        self.tokenizer, self.max_tokens = tokenizer, max_observation_tokens
        opened = self._render(self._BASE, open_turn=True)
        self.with_action = self._render([*self._BASE, self._ACTION])
        after = self.with_action[len(opened):]
        eos = tokenizer.eos_token or ""
        if not (self.with_action.startswith(opened) and after.startswith("!" + eos)):
            raise TemplateMismatch(
                f"the chat template of {type(tokenizer).__name__} does not end an assistant turn with the end-of-turn "
                f"token {eos!r} right after its text (it renders {after!r}): multi-turn episodes append the model's "
                "tokens as sampled, so they need a template that does")
        self.after_turn = after[len("!" + eos):]  # e.g. "\n" after <|im_end|>
        # Episodes repeat observations (the same feedback, the same tool error): rendering a chat template and
        # tokenizing cost more than a decode step for a whole batch, and both depend on the text alone.
        self._cut_contents: dict[str, tuple[str, bool]] = {}
        self._suffixes: dict[str, list[int]] = {}
        self.suffix([{"role": "tool", "content": "probe"}])  # a template that cannot extend fails before training

    def _render(self, messages: list[Message], open_turn: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_turn)

    def cut(self, messages: list[Message]) -> tuple[list[Message], int]:
        """Messages whose contents fit `max_observation_tokens` (longer ones cut, with a note), and how many were cut."""
        out, n_cut = [], 0
        for message in messages:
            content = str(message.get("content", ""))
            if content not in self._cut_contents:
                ids = self.tokenizer(content, add_special_tokens=False)["input_ids"]
                too_long = len(ids) > self.max_tokens
                kept = (self.tokenizer.decode(ids[:self.max_tokens]) + f" [cut: {len(ids)} tokens, {self.max_tokens} kept]"
                        if too_long else content)
                _remember(self._cut_contents, content, (kept, too_long))
            content, was_cut = self._cut_contents[content]
            n_cut += was_cut
            out.append({**message, "content": content})
        return out, n_cut

    def suffix(self, messages: list[Message]) -> list[int]:
        """The ids of `messages` after an assistant turn, ending with the next assistant turn opened (a list the
        caller must not change: the same messages give the same list)."""
        key = json.dumps(messages, sort_keys=True, default=str)
        if key not in self._suffixes:
            _remember(self._suffixes, key, self._suffix(messages))
        return self._suffixes[key]

    def _suffix(self, messages: list[Message]) -> list[int]:
        full = self._render([*self._BASE, self._ACTION, *messages], open_turn=True)
        if not full.startswith(self.with_action):
            raise TemplateMismatch(
                f"the chat template of {type(self.tokenizer).__name__} rewrites the conversation when "
                f"{[m.get('role') for m in messages]} messages follow an assistant turn (it does not only append): "
                "multi-turn episodes need a template that extends the previous tokens")
        text = self.after_turn + full[len(self.with_action):]
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def _remember(memo: dict, key, value, most: int = 4096) -> None:
    """memo[key] = value, forgetting everything once `most` entries are held (observations that never repeat)."""
    if len(memo) >= most:
        memo.clear()
    memo[key] = value


@torch.no_grad()
def sample_episodes(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt_ids: torch.Tensor,
                    prompt_mask: torch.Tensor, cfg: SamplingConfig, limits: EpisodeLimits, driver: EpisodeDriver,
                    renderer: ObservationRenderer, generator: torch.Generator | None = None, row_offset: int = 0,
                    total_rows: int | None = None, n: int = 1, decoder: CompiledDecoder | None = None
                    ) -> tuple[Rollout, list[EpisodeRecord]]:
    """`n` episodes per left-padded prompt (rows of one prompt next to each other), each up to
    `limits.max_turns` model turns of at most `cfg.max_new_tokens` tokens, the environment answering
    each turn that ended with EOS; the rollout (with `action_mask` and `turn_ids`) and a record per episode.

    `driver.step` is called with this batch's row indices (0-based here; add `row_offset` for the
    global row). With a `decoder` (`rollout.compile`), single-token steps run compiled."""
    if cfg.temperature <= 0 and not cfg.greedy:
        raise ValueError("generation.temperature must be > 0 for sampling (use greedy for argmax decoding)")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            loop = _EpisodeLoop(model, tokenizer, prompt_ids, prompt_mask, cfg, limits, driver, renderer, generator,
                                row_offset, total_rows or n * prompt_ids.shape[0], n, decoder)
            loop.run()
    finally:
        model.train(was_training)
    return loop.compact(), loop.records


class _EpisodeLoop:
    """The state of one batch of episodes: the kept cache and a growing record of every position."""

    def __init__(self, model, tokenizer, prompt_ids, prompt_mask, cfg, limits, driver, renderer, generator,
                 row_offset, total_rows, n, decoder=None):
        self.model, self.tokenizer, self.cfg, self.limits, self.decoder = model, tokenizer, cfg, limits, decoder
        self.driver, self.renderer, self.n = driver, renderer, n
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.device = prompt_ids.device
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask
        self.batch = prompt_ids.shape[0] * n
        # one generator per turn, seeded up front: a row's draws do not depend on how long other rows' turns ran
        seeds = torch.randint(0, 2**62, (limits.max_turns,), generator=generator, device=self.device)
        self.turn_generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds.tolist()]
        self.rows = slice(row_offset, row_offset + self.batch)
        self.total_rows = total_rows
        self.records = [EpisodeRecord() for _ in range(self.batch)]
        self.over = torch.zeros(self.batch, dtype=torch.bool, device=self.device)  # the episode has ended
        # per position after the prompt: token, exists (attended to), chosen by the policy, its log-prob, its turn
        self.columns: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.used = torch.zeros(self.batch, dtype=torch.long, device=self.device)  # tokens after the prompt, per row

    # ------------------------------------------------------------------ the model side

    def _prefill_prompts(self) -> torch.Tensor:
        n, model = self.n, self.model
        prompt_len = self.prompt_ids.shape[1]
        capacity = prompt_len + self.limits.max_turns * (self.cfg.max_new_tokens + self.limits.max_observation_tokens)
        self.cache = rollout_cache(model, compiled_capacity(capacity) if self.decoder is not None else capacity)
        self.cache_key = cache_kwarg(model)
        positions = position_ids_from_mask(self.prompt_mask)
        out = model(input_ids=self.prompt_ids, attention_mask=self.prompt_mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{self.cache_key: self.cache})
        logits = out.logits[:, -1].float()
        mask = self.prompt_mask
        if n > 1:
            self.cache.batch_repeat_interleave(n)
            logits, mask, positions = (x.repeat_interleave(n, 0) for x in (logits, mask, positions))
        self.attention = mask.long()  # [batch, positions so far], grows with every column
        self.next_position = positions[:, -1] + 1  # [batch]
        step = lean_decode_step(model)
        layers_ok = len(self.cache.layers) == model.config.num_hidden_layers and all(
            hasattr(layer, "capacity") for layer in self.cache.layers)
        self.lean_step = step if layers_ok else None
        self.compiled = layers_ok and self.decoder is not None and self.decoder.prepare(self.batch)
        return logits

    def _forward(self, ids: torch.Tensor, exists: torch.Tensor) -> torch.Tensor:
        """Append `ids` [batch, k] (`exists` 0 on padding) to the cache; the logits after the last column."""
        positions = self.next_position[:, None] + (exists.long().cumsum(1) - 1).clamp(min=0)  # [batch, k]
        self.attention = torch.cat([self.attention, exists.long()], dim=1)
        self.next_position = self.next_position + exists.long().sum(1)
        if ids.shape[1] == 1 and self.compiled:
            layers = self.cache.layers
            for layer in layers:  # the compiled step writes at the slot after the cached positions: room for it
                layer.reserve(layer.length + 1)
            # the static cache's key mask: padding False, positions not yet written masked by the step; the new
            # token attends to itself even where it is padding (such a row's logits are never sampled from)
            key_mask = torch.ones(self.batch, layers[0].capacity, dtype=torch.bool, device=self.device)
            key_mask[:, : self.attention.shape[1]] = self.attention.bool()
            logits = self.decoder.step(ids, positions, layers[0].length, key_mask, layers)
            if logits is not None:
                return logits.float()
            self.compiled = False  # it could not compile: the eager step from here on
        if ids.shape[1] == 1 and self.lean_step is not None:
            return self.lean_step(ids, positions, self.cache.layers, self.attention.bool()[:, None, None, :]).float()
        out = self.model(input_ids=ids, attention_mask=self.attention, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self.cache_key: self.cache})
        return out.logits[:, -1].float()

    def _record(self, token, exists, chosen, logprob, turn: int) -> None:
        turn_ids = torch.where(chosen, torch.full_like(token, turn), torch.full_like(token, -1))
        self.columns.append((token, exists, chosen, logprob, turn_ids))
        self.used += exists.long()

    # ------------------------------------------------------------------ the turns

    def run(self) -> None:
        logits = self._prefill_prompts()
        sampler = TokenSampler(self.cfg, self.eos, self.pad, self.batch, logits)
        for turn in range(self.limits.max_turns):
            logits = self._environment_turn(turn, self._model_turn(sampler, logits, turn))
            if logits is None:
                break

    def _model_turn(self, sampler: TokenSampler, logits: torch.Tensor, turn: int) -> dict[int, list[int]]:
        """Sample turn `turn` for every row whose episode goes on, from the `logits` after the history: each
        such row's sampled ids (its EOS last when the turn ended with one)."""
        finished = self.over.clone()
        budget = self.limits.max_episode_tokens
        first = len(self.columns)
        for t in range(self.cfg.max_new_tokens):
            if t > 0:
                logits = self._forward(*self.pending)
            if budget is not None:
                finished |= self.used >= budget  # the episode's token budget is spent
            token, logprob = sampler.draw(logits, t, self.turn_generators[turn], self.rows, self.total_rows, finished)
            chosen = ~finished
            self._record(token, chosen, chosen, torch.where(chosen, logprob, torch.zeros_like(logprob)), turn)
            # the turn's last token enters the cache with the observation after it (or never, when nothing follows)
            self.pending = (token[:, None], chosen[:, None])
            finished = finished | (token == self.eos)
            if bool(finished.all()):
                break
        tokens = torch.stack([c[0] for c in self.columns[first:]], dim=1).tolist()  # [batch, turn length]
        chosen = torch.stack([c[2] for c in self.columns[first:]], dim=1).tolist()
        return {row: [tok for tok, c in zip(tokens[row], chosen[row]) if c]
                for row in (~self.over).nonzero().squeeze(1).tolist()}

    def _environment_turn(self, turn: int, sampled: dict[int, list[int]]) -> torch.Tensor | None:
        """The environment answers the rows that ended their turn with EOS; the logits after the observations,
        or None when no episode goes on."""
        actions = [ids[:-1] if ids and ids[-1] == self.eos else ids for ids in sampled.values()]
        texts = dict(zip(sampled, self.tokenizer.batch_decode(actions, skip_special_tokens=True)))
        for row, text in texts.items():
            self.records[row].messages.append({"role": "assistant", "content": text})
        answered = [row for row, ids in sampled.items() if ids and ids[-1] == self.eos]
        for row, ids in sampled.items():
            if not (ids and ids[-1] == self.eos):
                self.over[row] = True
                budget = self.limits.max_episode_tokens
                self.records[row].ended = "budget" if budget is not None and int(self.used[row]) >= budget else "length"
        outcomes = self.driver.step(answered, [texts[row] for row in answered]) if answered else []
        chunks: dict[int, list[int]] = {}
        last_turn = turn == self.limits.max_turns - 1
        for row, outcome in zip(answered, outcomes):
            record = self.records[row]
            record.turn_rewards.append(float(outcome.reward))
            if outcome.done:
                self.over[row], record.ended = True, "done"
                continue
            messages, n_cut = self.renderer.cut(outcome.messages)
            record.observations_cut += n_cut
            record.messages.extend(messages)
            if last_turn:
                self.over[row], record.ended = True, "max_turns"
                continue
            ids = self.renderer.suffix(messages)
            budget = self.limits.max_episode_tokens
            if budget is not None and int(self.used[row]) + len(ids) >= budget:
                self.over[row], record.ended = True, "budget"
                continue
            chunks[row] = ids
        if not chunks:
            return None
        width = max(map(len, chunks.values()))
        ids = torch.full((self.batch, width), self.pad, dtype=torch.long, device=self.device)
        exists = torch.zeros(self.batch, width, dtype=torch.bool, device=self.device)
        for row, chunk in chunks.items():  # left-padded: every row's last observation token in the last column
            ids[row, width - len(chunk):] = torch.tensor(chunk, dtype=torch.long, device=self.device)
            exists[row, width - len(chunk):] = True
        no = torch.zeros(self.batch, dtype=torch.bool, device=self.device)
        zero = torch.zeros(self.batch, device=self.device)
        for k in range(width):
            self._record(ids[:, k], exists[:, k], no, zero, -1)
        last_token, last_exists = self.pending
        return self._forward(torch.cat([last_token, ids], dim=1), torch.cat([last_exists, exists], dim=1))

    # ------------------------------------------------------------------ the result

    def compact(self) -> Rollout:
        """Prompt + response per row with no holes: the padding columns dropped, right padding after."""
        token, exists, chosen, logprob, turn_ids = (torch.stack(column, dim=1) for column in zip(*self.columns))
        lengths = exists.sum(1)  # [batch]
        width = max(1, int(lengths.max()))
        # a stable sort puts each row's existing positions first, in order
        order = torch.sort((~exists).to(torch.int8), dim=1, stable=True).indices[:, :width]  # [batch, width]
        kept = torch.arange(width, device=self.device)[None, :] < lengths[:, None]  # [batch, width]
        pick = lambda x, fill: torch.where(kept, x.gather(1, order), torch.full_like(x.gather(1, order), fill))  # noqa: E731
        response_ids = pick(token, self.pad)
        action = pick(chosen, False)
        rollout = Rollout(
            prompt_ids=self.prompt_ids.repeat_interleave(self.n, 0), prompt_mask=self.prompt_mask.repeat_interleave(self.n, 0),
            response_ids=response_ids, response_mask=kept.to(self.prompt_mask.dtype),
            logprobs=pick(logprob, 0.0) * action,
            has_eos=torch.tensor([r.ended in ("done", "max_turns") for r in self.records], device=self.device),
            action_mask=action.to(self.prompt_mask.dtype), turn_ids=pick(turn_ids, -1))
        return rollout
