"""Rollouts as text: what reward functions, metric functions and sample tables read."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase


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
