"""Batches of token ids -> padded LongTensors (SFT and preferences right-padded, prompts left-padded)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from quartet.data.tokenize import IGNORE_INDEX


def pad_sequences(seqs: Sequence[Sequence[int] | torch.Tensor], pad_value: int, side: str = "right") -> torch.Tensor:
    """[n, longest] LongTensor of `seqs` (lists of ints or 1-D tensors), padded with `pad_value` on `side`."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if len(seqs) == 0:
        raise ValueError("pad_sequences needs at least one sequence")
    if pad_value is None:
        raise ValueError("pad_value is None (does the tokenizer have a pad token? see ensure_pad_token)")
    tensors = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seqs]
    longest = max(t.numel() for t in tensors)
    out = torch.full((len(tensors), longest), pad_value, dtype=torch.long)
    for i, t in enumerate(tensors):
        if t.numel():
            if side == "right":
                out[i, : t.numel()] = t
            else:
                out[i, longest - t.numel():] = t
    return out


def _masks(seqs: list[Any], side: str) -> torch.Tensor:
    return pad_sequences([[1] * len(s) for s in seqs], 0, side)


def collate_sft(batch: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on padding)."""
    ids = [b["input_ids"] for b in batch]
    return {
        "input_ids": pad_sequences(ids, pad_token_id, "right"),
        "attention_mask": _masks(ids, "right"),
        "labels": pad_sequences([b["labels"] for b in batch], IGNORE_INDEX, "right"),
    }


def collate_preferences(batch: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """ONE right-padded batch of 2n rows: rows [0, n) the chosen, rows [n, 2n) the rejected of the same pairs.

    `margin` is a float tensor [n] when every pair has one, None when none has (a mix is an error).
    """
    seqs = [b["chosen_ids"] for b in batch] + [b["rejected_ids"] for b in batch]
    margins = [b.get("margin") for b in batch]
    if all(m is None for m in margins):
        margin = None
    elif any(m is None for m in margins):
        raise ValueError("some pairs in the batch have a margin and some do not; give every pair a margin, or none")
    else:
        margin = torch.tensor(margins, dtype=torch.float)
    return {
        "input_ids": pad_sequences(seqs, pad_token_id, "right"),
        "attention_mask": _masks(seqs, "right"),
        "margin": margin,
    }


def collate_preference_answers(batch: list[dict[str, Any]], pad_token_id: int, side: str = "right") -> dict[str, Any]:
    """The 2n rows of `collate_preferences` (chosen [0, n), rejected [n, 2n)) with the mask of answer tokens.

    `answer_mask` [2n, T] is 1 on each row's answer tokens (after its pair's `prompt_len` prompt
    tokens, EOS included) and 0 on prompt tokens and padding. Rows are padded on `side` (the
    answer tokens keep their place in the row). When every pair carries precomputed reference
    log-probs (`ref_chosen_logp`, `ref_rejected_logp`), `ref_logps` [2n] holds them in row order.
    """
    seqs = [b["chosen_ids"] for b in batch] + [b["rejected_ids"] for b in batch]
    prompt_lens = [b["prompt_len"] for b in batch] * 2
    answers = [[0] * p + [1] * (len(s) - p) for s, p in zip(seqs, prompt_lens)]
    out: dict[str, Any] = {
        "input_ids": pad_sequences(seqs, pad_token_id, side),
        "attention_mask": _masks(seqs, side),
        "answer_mask": pad_sequences(answers, 0, side),
    }
    refs = [("ref_chosen_logp" in b, "ref_rejected_logp" in b) for b in batch]
    if any(any(r) for r in refs):
        if not all(all(r) for r in refs):
            raise ValueError("some pairs in the batch carry precomputed reference log-probs and some do not")
        out["ref_logps"] = torch.tensor([b["ref_chosen_logp"] for b in batch] + [b["ref_rejected_logp"] for b in batch],
                                        dtype=torch.float)
    return out


def collate_prompts(batch: list[dict[str, Any] | Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded input_ids and attention_mask (items: {'input_ids': ids} or the ids themselves)."""
    ids = [b["input_ids"] if isinstance(b, dict) else b for b in batch]
    return {"input_ids": pad_sequences(ids, pad_token_id, "left"), "attention_mask": _masks(ids, "left")}
