"""Forward passes shared by every stage: padding-independent positions, per-token values, scores.

Reward model and critic are the same thing in Hugging Face terms: an
`AutoModelForSequenceClassification` with one output. Its linear `score` head applied to
every position gives the critic's per-token values; read at the last non-padding token it
gives the reward model's score. Positions are computed from the attention mask, so left
and right padding give the same numbers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.modeling_utils import slice_logits_to_keep

from quartet.models.lean import lean_body, lean_causal_lm_body


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [batch, seq]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row, for left- or right-padded rows."""
    seq_len = attention_mask.shape[-1]
    positions = torch.arange(seq_len, device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)  # [batch]


def score_head(model: PreTrainedModel) -> torch.nn.Module:
    """The linear `score` head of a one-output sequence classifier (reward model or critic)."""
    head = getattr(model, "score", None)
    if head is None:
        raise ValueError(
            f"{type(model).__name__} has no 'score' head; reward models and critics must be "
            "AutoModelForSequenceClassification models with num_labels=1"
        )
    return head


def token_values(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per token from a one-output sequence-classification model: [batch, seq]."""
    positions = position_ids_from_mask(attention_mask)
    body = lean_body(model.base_model)  # the same numbers without the forward's per-call Python (models/lean.py)
    if body is not None:
        hidden = body(input_ids, attention_mask, positions)
    else:
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=positions).last_hidden_state  # [batch, seq, hidden]
    head = score_head(model)
    return head(hidden.to(head.weight.dtype)).squeeze(-1).float()


def scores_at_last_token(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token values [batch, seq] read at each row's last non-padding token: [batch]."""
    return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)


def sequence_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The score of each whole sequence, read at its last non-padding token: [batch]."""
    return scores_at_last_token(token_values(model, input_ids, attention_mask), attention_mask)


class TokenValueModel(torch.nn.Module):
    """A one-output sequence classifier whose forward returns per-token values [batch, seq].

    Trained scalar models (reward model, critic) run through this module so that the
    distributed wrappers (DDP, FSDP, DeepSpeed) see, and synchronise, the whole forward.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return token_values(self.model, input_ids, attention_mask)


def cache_kwarg(model: PreTrainedModel) -> str:
    """`cache` on transformers versions that renamed it, else `past_key_values`.

    An unknown keyword would vanish into the model's **kwargs and silently decode without a
    cache, so the name is read from the forward signature (of the wrapped model under PEFT).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def causal_lm_logits(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     logits_to_keep: int = 0, cache: DynamicCache | None = None) -> torch.Tensor:
    """Logits of a causal LM with padding-independent positions.

    `logits_to_keep=k` computes the LM head on the last k positions only (0 = all), which
    saves the head's work on prompt positions when only response log-probs are needed.
    With a KV `cache`, `input_ids` continue the positions it holds (attending to them, and appended
    to it); `attention_mask` then covers the cached positions and the new ones.
    """
    positions = position_ids_from_mask(attention_mask)[:, -input_ids.shape[1]:]  # the new tokens' positions
    body = lean_causal_lm_body(model, cache)  # the same numbers without the forward's per-call Python (models/lean.py)
    if body is not None:
        return model.lm_head(slice_logits_to_keep(body(input_ids, attention_mask, positions), logits_to_keep))
    cached = {} if cache is None else {cache_kwarg(model): cache}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                logits_to_keep=logits_to_keep, use_cache=cache is not None, **cached)
    return out.logits


def in_row_chunks(fn: Callable[..., torch.Tensor], rows: int | None, *tensors: torch.Tensor) -> torch.Tensor:
    """`fn(*tensors)` computed `rows` rows at a time and concatenated along the first dimension.

    The same numbers (rows are independent), with a peak memory of one chunk's activations and
    logits instead of the whole batch's. `rows=None` runs the whole batch at once.
    """
    n = tensors[0].shape[0]
    if rows is None or rows >= n:
        return fn(*tensors)
    return torch.cat([fn(*(t[start : start + rows] for t in tensors)) for start in range(0, n, rows)])


SCORING_LOGITS_BUDGET = 64 * 2**20  # bytes of float32 logits per scoring forward


def scoring_rows(min_rows: int, response_len: int, vocab_size: int | None,
                 budget_bytes: int = SCORING_LOGITS_BUDGET) -> int:
    """Rows per no-grad scoring forward: at least `min_rows`, more while one forward's float32
    logits [rows, response_len, vocab] stay within `budget_bytes`.

    `min_rows` is the training micro-batch, whose forward already holds its logits several times
    over (with gradients). Fewer, larger forwards lose less time to per-call overhead and small
    matrix products; with real vocabularies and response lengths the budget keeps `min_rows`.
    """
    if not vocab_size:
        return min_rows
    return max(min_rows, budget_bytes // (4 * max(1, response_len) * vocab_size))


def vocab_size(model: torch.nn.Module) -> int | None:
    """The vocabulary size of a (possibly PEFT-wrapped or multimodal) causal LM's config, if it says."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "vocab_size", None)


def share_trunk(actor: PreTrainedModel, critic: PreTrainedModel) -> PreTrainedModel:
    """Make `critic` (a one-output sequence classifier) run on `actor`'s own trunk modules.

    Afterwards the critic's only parameters of its own are its score head; everything else is
    the actor's, so training either moves both. Saved with `save_pretrained`, the critic is still
    a complete sequence-classification model (the trunk as it was at that moment).
    """
    score_head(critic)
    trunk, critic_trunk = actor.base_model, critic.base_model
    if type(trunk) is not type(critic_trunk):
        raise ValueError(f"cannot share a trunk between {type(actor).__name__} ({type(trunk).__name__}) and "
                         f"{type(critic).__name__} ({type(critic_trunk).__name__})")
    setattr(critic, critic.base_model_prefix, trunk)
    return critic


def head_parameters(critic: PreTrainedModel, actor: PreTrainedModel) -> list[torch.nn.Parameter]:
    """The critic's parameters that are not the actor's: all of them, or with a shared trunk its head only."""
    actor_ids = {id(p) for p in actor.parameters()}
    return [p for p in critic.parameters() if id(p) not in actor_ids]
