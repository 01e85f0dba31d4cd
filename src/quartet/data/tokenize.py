"""Examples -> token ids, with one over-long policy for every stage.

Over-long policy:

1. The prompt keeps at most ``max_prompt_length`` tokens, taken from its END (left
   truncation: the end of a dialogue is what is nearest the answer).
2. Then prompt + completion is cut on the right at ``max_length`` (the completion loses its
   end, EOS included).
3. An example left with zero completion tokens (for a pair: either answer) is dropped.

Everything truncated or dropped is counted in the returned :class:`TruncationStats`: a
dropped example counts only in ``n_dropped``; a kept one may count as both prompt- and
completion-truncated.

Tokenization: prompt and completion are tokenized separately, with no special tokens added
by the tokenizer (special-token text such as a chat template's ``<|endoftext|>`` still maps
to its id), then concatenated. Every completion ends with the EOS token: it is appended
unless the completion's tokens already end with it (chat templates often close each turn
with EOS), so the model learns to stop.

BOS: a tokenizer whose BOS token differs from EOS and which normally prepends it (its plain
``tokenizer("x")`` starts with BOS, as Llama's does) gets that BOS at the start of every
sequence, as part of the prompt (label -100; it is never a prediction target), counted in
``max_prompt_length`` and kept by truncation; a prompt that already starts with BOS (a chat
template that writes it) does not get a second one. Tokenizers that add no BOS (GPT-2 style,
or Quartet's trained BPE where BOS == EOS) get none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quartet.data.formats import PreferenceExample, PromptExample, SFTExample

IGNORE_INDEX = -100


@dataclass
class TruncationStats:
    """What the over-long policy did to a set of examples."""

    n_examples: int = 0
    n_prompt_truncated: int = 0
    n_completion_truncated: int = 0
    n_dropped: int = 0

    def summary(self) -> str:
        """e.g. '2000 examples; 12 prompts left-truncated, 3 completions cut at max_length, 1 dropped (...)'."""
        parts = [(self.n_prompt_truncated, "prompts left-truncated to max_prompt_length"),
                 (self.n_completion_truncated, "completions cut at max_length"),
                 (self.n_dropped, "dropped (no completion tokens left)")]
        done = ", ".join(f"{n} {what}" for n, what in parts if n)
        return f"{self.n_examples} examples; {done or 'none truncated'}"


def bos_prefix(tokenizer: Any) -> list[int]:
    """[bos_token_id] when the tokenizer prepends a BOS distinct from EOS, else []."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or bos == eos:
        return []
    probe = tokenizer("a")["input_ids"]
    return [bos] if probe and probe[0] == bos else []


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _check_lengths(max_length: int | None, max_prompt_length: int) -> None:
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be at least 1, got {max_prompt_length}")


def _eos_ids(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; completions must end with one (set tokenizer.eos_token)")
    return tokenizer.eos_token_id


def _with_eos(ids: list[int], eos: int) -> list[int]:
    return ids if ids and ids[-1] == eos else ids + [eos]


class _Truncator:
    def __init__(self, tokenizer: Any, max_prompt_length: int):
        self.lead = bos_prefix(tokenizer)
        self.max_prompt_length = max_prompt_length

    def prompt(self, ids: list[int]) -> tuple[list[int], bool]:
        """(lead + the prompt's last tokens within max_prompt_length, whether anything was cut)."""
        if self.lead and ids[: len(self.lead)] == self.lead:
            ids = ids[len(self.lead):]
        budget = max(self.max_prompt_length - len(self.lead), 0)
        if len(ids) > budget:
            return self.lead + (ids[len(ids) - budget:] if budget else []), True
        return self.lead + ids, False


def tokenize_sft(examples: list[SFTExample], tokenizer: Any, max_length: int, max_prompt_length: int,
                 mask_prompt: bool = True) -> tuple[list[dict[str, list[int]]], TruncationStats]:
    """[{input_ids, labels}] (labels -100 on prompt tokens when mask_prompt) and what truncation did."""
    _check_lengths(max_length, max_prompt_length)
    eos = _eos_ids(tokenizer)
    trunc = _Truncator(tokenizer, max_prompt_length)
    prompts = _encode(tokenizer, [ex.prompt or "" for ex in examples])
    completions = _encode(tokenizer, [ex.completion for ex in examples])
    stats = TruncationStats(n_examples=len(examples))
    out = []
    for ex, p_ids, c_ids in zip(examples, prompts, completions):
        if ex.prompt is None:
            p_ids, p_cut = list(trunc.lead), False  # plain text: no prompt (only a BOS, if the tokenizer uses one)
        else:
            p_ids, p_cut = trunc.prompt(p_ids)
        c_ids = _with_eos(c_ids, eos)
        c_labels = list(c_ids)
        if ex.segments is not None:  # an agent's trace: each piece as its own ids, only the assistant's trained
            c_ids, c_labels = _segment_ids(tokenizer, ex.segments)
        room = max(max_length - len(p_ids), 0)
        c_cut = len(c_ids) > room
        c_ids, c_labels = c_ids[:room], c_labels[:room]
        if not c_ids:
            stats.n_dropped += 1
            continue
        stats.n_prompt_truncated += p_cut
        stats.n_completion_truncated += c_cut
        hidden = ex.prompt is None or mask_prompt  # a text row's only prompt token is BOS: never a target
        labels = ([IGNORE_INDEX] * len(p_ids) if hidden else list(p_ids)) + c_labels
        out.append({"input_ids": p_ids + c_ids, "labels": labels})
    return out, stats


def _segment_ids(tokenizer: Any, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids of each segment encoded on its own (as an episode appends them) and labels: the ids where
    trained, IGNORE_INDEX elsewhere."""
    ids, labels = [], []
    for piece, trained in zip(_encode(tokenizer, [text for text, _ in segments]), segments):
        ids += piece
        labels += piece if trained[1] else [IGNORE_INDEX] * len(piece)
    return ids, labels


def tokenize_preferences(examples: list[PreferenceExample], tokenizer: Any, max_length: int,
                         max_prompt_length: int) -> tuple[list[dict[str, Any]], TruncationStats]:
    """[{chosen_ids, rejected_ids, prompt_len, margin}]: prompt + answer + EOS for each answer, same policy as SFT.

    Both sequences start with the same `prompt_len` prompt tokens (BOS included, if used); the
    answer tokens are the rest.
    """
    _check_lengths(max_length, max_prompt_length)
    eos = _eos_ids(tokenizer)
    trunc = _Truncator(tokenizer, max_prompt_length)
    prompts = _encode(tokenizer, [ex.prompt for ex in examples])
    chosen = _encode(tokenizer, [ex.chosen for ex in examples])
    rejected = _encode(tokenizer, [ex.rejected for ex in examples])
    stats = TruncationStats(n_examples=len(examples))
    out = []
    for ex, p_ids, c_ids, r_ids in zip(examples, prompts, chosen, rejected):
        p_ids, p_cut = trunc.prompt(p_ids)
        room = max(max_length - len(p_ids), 0)
        c_ids, r_ids = _with_eos(c_ids, eos), _with_eos(r_ids, eos)
        a_cut = len(c_ids) > room or len(r_ids) > room
        c_ids, r_ids = c_ids[:room], r_ids[:room]
        if not c_ids or not r_ids:
            stats.n_dropped += 1
            continue
        stats.n_prompt_truncated += p_cut
        stats.n_completion_truncated += a_cut
        out.append({"chosen_ids": p_ids + c_ids, "rejected_ids": p_ids + r_ids, "prompt_len": len(p_ids),
                    "margin": ex.margin})
    return out, stats


def tokenize_prompts(examples: list[PromptExample], tokenizer: Any,
                     max_prompt_length: int) -> tuple[list[list[int]], TruncationStats]:
    """Prompt token ids, each left-truncated to its last max_prompt_length tokens (BOS kept, if used)."""
    kept, stats = tokenize_prompt_examples(examples, tokenizer, max_prompt_length)
    return [ids for ids, _ in kept], stats


def tokenize_prompt_examples(examples: list[PromptExample], tokenizer: Any, max_prompt_length: int
                             ) -> tuple[list[tuple[list[int], PromptExample]], TruncationStats]:
    """`tokenize_prompts`, each kept prompt's ids with its example (whose columns reward functions read)."""
    _check_lengths(None, max_prompt_length)
    trunc = _Truncator(tokenizer, max_prompt_length)
    stats = TruncationStats(n_examples=len(examples))
    out = []
    for ids, example in zip(_encode(tokenizer, [ex.prompt for ex in examples]), examples):
        ids, cut = trunc.prompt(ids)
        if not ids:
            stats.n_dropped += 1
            continue
        stats.n_prompt_truncated += cut
        out.append((ids, example))
    return out, stats
