"""Sample rollouts, token by token: samples.jsonl records and the table shown during training."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from quartet.rl.experience import Experience
from quartet.rollout.texts import decode_texts


def sample_records(exp: Experience, tokenizer: PreTrainedTokenizerBase, step: int, n: int) -> list[dict[str, Any]]:
    """Per-token view of the first `n` rollouts: the quantities of the user's note, token by token.

    `value` and `return` appear only for algorithms with a critic.
    """
    n = min(n, exp.sequences.shape[0])
    p = exp.prompt_len
    exists = exp.attention_mask[:, p:]  # [batch, response_len] model and observation tokens (one turn: = mask)
    prompts, responses = exp.prompts, exp.responses
    if prompts is None or not torch.equal(exists, exp.mask.to(exists.dtype)):
        # not decoded for scoring, or an episode (scoring read its last answer): decode the rows shown whole
        prompts, responses = decode_texts(tokenizer, exp.sequences[:n, :p], exp.attention_mask[:n, :p],
                                          exp.response_ids[:n], exists[:n])
    per_token = {"actor_logprob": exp.old_logprobs, "ref_logprob": exp.ref_logprobs, "kl_penalty": exp.kl_penalty,
                 "value": exp.old_values, "reward": exp.rewards, "advantage": exp.advantages, "return": exp.returns}
    records = []
    for i in range(n):
        length = int(exists[i].sum())
        ids = exp.response_ids[i, :length].tolist()

        def row(t: torch.Tensor, i: int = i, length: int = length) -> list[float]:
            return [round(float(x), 5) for x in t[i, :length]]

        record = {"step": step, "prompt": prompts[i], "response": responses[i], "score": float(exp.scores[i]),
                  "tokens": [tokenizer.decode([t]) for t in ids],
                  **{key: row(t) for key, t in per_token.items() if t is not None}}
        chosen = exp.mask[i, :length]
        if not bool(chosen.all()):  # an episode: which tokens the policy chose, and which the environment wrote
            record["action"] = [int(x) for x in chosen.tolist()]
        records.append(record)
    return records


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


def write_samples(path: Path, step: int, records: list[dict[str, Any]]) -> None:
    """Append the records to samples.jsonl and show them as a small table above the progress bar."""
    with path.open("a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    tqdm.write(format_sample_table(step, records), file=sys.stderr)
