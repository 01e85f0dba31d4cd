"""A scored rollout batch before the algorithm turns it into rewards and advantages.

Each rank samples and scores its share of a step's prompts (`ScoredRollout`, local rows); the
shares are gathered into the global batch, rank by rank in prompt order. Dynamic sampling keeps
some groups of a batch (`select`) and joins the batches of several sampling rounds (`concat`).
Rows are samples; the `n` samples of a prompt are next to each other and share a group id.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from quartet.runs.distributed import Ranks

# per-row tensors whose second dimension is the prompt (left-padded) or the response (right-padded)
_PROMPT_SIDE = ("prompt_ids", "prompt_mask")
_RESPONSE_SIDE = ("response_ids", "mask", "old_logprobs", "behaviour_logprobs", "ref_logprobs", "old_values",
                  "attention", "turn_ids")
_ROW_VALUES = ("scores", "has_eos", "group_ids")
_PAD = {"prompt_ids": None, "response_ids": None, "turn_ids": -1}  # None: the pad token; others pad with 0


@dataclass(kw_only=True)
class ScoredRollout:
    prompt_ids: torch.Tensor  # [B, prompt_len] left-padded
    prompt_mask: torch.Tensor  # [B, prompt_len]
    response_ids: torch.Tensor  # [B, response_len], pad after the first EOS
    mask: torch.Tensor  # [B, response_len] float, 1 on the tokens the policy chose (multi-turn: not observations)
    old_logprobs: torch.Tensor  # [B, response_len], 0 on invalid positions
    ref_logprobs: torch.Tensor | None  # [B, response_len]; None when no KL term needs the reference
    old_values: torch.Tensor | None  # [B, response_len]; None without a critic
    scores: torch.Tensor  # [B] raw scores (reward model, or the weighted reward functions)
    has_eos: torch.Tensor  # [B] bool
    group_ids: torch.Tensor  # [B] int64, the prompt each sample answers
    score_parts: dict[str, torch.Tensor] = field(default_factory=dict)  # [B] per reward function, NaN where unjudged
    prompts: list[str] | None = None  # decoded texts, when something read them
    responses: list[str] | None = None
    # multi-turn episodes: the response tokens that exist (model and observation tokens; None: `mask`),
    # each chosen token's turn (-1 elsewhere), and each turn's environment reward (NaN past a row's turns)
    attention: torch.Tensor | None = None  # [B, response_len]
    turn_ids: torch.Tensor | None = None  # [B, response_len] int64
    turn_rewards: torch.Tensor | None = None  # [B, max_turns]
    # with an off-policy correction: the sampler's log-probs, beside the trainer's recomputed old ones
    behaviour_logprobs: torch.Tensor | None = None  # [B, response_len]

    @property
    def response_attention(self) -> torch.Tensor:
        return self.mask if self.attention is None else self.attention

    def __len__(self) -> int:
        return self.scores.shape[0]

    def gather(self, ranks: Ranks, pad_id: int) -> "ScoredRollout":
        """The global batch from every rank's share (each rank's tensors padded to the longest)."""
        if not ranks.distributed:
            return self
        out = {}
        for name in _PROMPT_SIDE:
            out[name] = ranks.gather_rows(getattr(self, name), _pad_value(name, pad_id), pad_first=True)
        for name in _RESPONSE_SIDE:
            value = getattr(self, name)
            out[name] = None if value is None else ranks.gather_rows(value, _pad_value(name, pad_id))
        for name in _ROW_VALUES:
            value = getattr(self, name)
            out[name] = ranks.gather_rows(value.long() if value.dtype == torch.bool else value).to(value.dtype)
        out["turn_rewards"] = None if self.turn_rewards is None else ranks.gather_rows(self.turn_rewards, float("nan"))
        out["score_parts"] = {k: ranks.gather_rows(v) for k, v in sorted(self.score_parts.items())}
        if self.prompts is not None:
            out["prompts"], out["responses"] = ranks.gather_objects(self.prompts), ranks.gather_objects(self.responses)
        return ScoredRollout(**out)

    def select(self, rows: torch.Tensor) -> "ScoredRollout":
        """The given rows (a [k] index tensor), in that order."""
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                picked[f.name] = value[rows]
            elif isinstance(value, dict):
                picked[f.name] = {k: v[rows] for k, v in value.items()}
            elif value is not None:
                picked[f.name] = [value[i] for i in rows.tolist()]
        return replace(self, **picked)


def concat(parts: list[ScoredRollout], pad_id: int) -> ScoredRollout:
    """The rows of several batches, in order, padded to the widest prompt and response; group ids
    stay distinct (each part's are shifted past the previous parts')."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for name in _PROMPT_SIDE + _RESPONSE_SIDE:
        values = [getattr(p, name) for p in parts]
        if values[0] is None:
            out[name] = None
            continue
        width = max(v.shape[1] for v in values)
        side = "left" if name in _PROMPT_SIDE else "right"
        out[name] = torch.cat([_pad_columns(v, width, _pad_value(name, pad_id), side) for v in values])
    out["turn_rewards"] = (None if parts[0].turn_rewards is None
                           else torch.cat([_pad_columns(p.turn_rewards, max(q.turn_rewards.shape[1] for q in parts),
                                                        float("nan"), "right") for p in parts]))
    out["scores"] = torch.cat([p.scores for p in parts])
    out["has_eos"] = torch.cat([p.has_eos for p in parts])
    shifted, offset = [], 0
    for p in parts:
        shifted.append(p.group_ids + offset)
        offset += int(p.group_ids.max()) + 1 if len(p) else 0
    out["group_ids"] = torch.cat(shifted)
    out["score_parts"] = {k: torch.cat([p.score_parts[k] for p in parts]) for k in parts[0].score_parts}
    if parts[0].prompts is not None:
        out["prompts"] = [t for p in parts for t in p.prompts]
        out["responses"] = [t for p in parts for t in p.responses]
    return ScoredRollout(**out)


def _pad_value(name: str, pad_id: int) -> int:
    value = _PAD.get(name, 0)
    return pad_id if value is None else value


def _pad_columns(x: torch.Tensor, width: int, value: float, side: str) -> torch.Tensor:
    missing = width - x.shape[1]
    if missing == 0:
        return x
    pad = torch.full((x.shape[0], missing), value, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if side == "left" else [x, pad], dim=1)
