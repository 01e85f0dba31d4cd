"""The forward passes of online RL: response log-probs, critic values, and the trained module.

The actor (and, for algorithms that have one, the critic) train as one `ActorCritic` module:
one distributed wrapper, one optimizer, one backward. Dropout stays off in every RL forward
pass (models are kept in eval mode), so before the first update the new/old ratio is exactly 1.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from quartet.models.forward import TokenValueModel, causal_lm_logits, position_ids_from_mask, score_head
from quartet.models.shared_prompt import grouped_response_logit_parts, grouped_response_logits
from quartet.rl import token_logprobs, token_logprobs_and_entropy, token_logprobs_inplace


def response_logits(model: PreTrainedModel, sequences: torch.Tensor, attention_mask: torch.Tensor,
                    response_ids: torch.Tensor, group_size: int = 1) -> torch.Tensor:
    """Logits that predicted each response token: [batch, response_len, vocab].

    The last position is left out of the forward pass: its logits would predict a token after
    the response, and a causal model's earlier positions do not depend on it. With `group_size`
    n > 1 the rows come in groups of n sharing their prompt, and each prompt is computed once
    (models/shared_prompt.py: the same numbers, a fraction of the prompt's arithmetic).
    """
    if group_size > 1:
        return grouped_response_logits(model, sequences, attention_mask, response_ids, group_size)
    response_len = response_ids.shape[1]
    return causal_lm_logits(model, sequences[:, :-1], attention_mask[:, :-1], logits_to_keep=response_len)


def response_logit_pieces(model: PreTrainedModel, sequences: torch.Tensor, attention_mask: torch.Tensor,
                          response_ids: torch.Tensor, group_size: int = 1
                          ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`response_logits` as (logits [batch, k, vocab], the response tokens they predict [batch, k]) pieces
    along the response: one piece per row forward; with shared prompts the first token's logits (from the
    prompt's forward) and the rest's, which per-token functions take apart instead of a concatenated copy."""
    if group_size > 1:
        first, rest = grouped_response_logit_parts(model, sequences, attention_mask, response_ids, group_size)
        return [(first, response_ids[:, :1])] + ([] if rest is None else [(rest, response_ids[:, 1:])])
    return [(response_logits(model, sequences, attention_mask, response_ids), response_ids)]


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


@torch.no_grad()
def response_logprobs(model: PreTrainedModel, sequences: torch.Tensor, attention_mask: torch.Tensor,
                      response_ids: torch.Tensor, temperature: float, group_size: int = 1) -> torch.Tensor:
    """Log-probs of the response tokens [batch, response_len], for scoring (no gradients).

    The LM head runs on response positions only, and the log-softmax overwrites the fresh
    logits: one vocabulary-sized tensor per forward instead of three.
    """
    pieces = response_logit_pieces(model, sequences, attention_mask, response_ids, group_size)
    return _joined([token_logprobs_inplace(logits, ids, temperature) for logits, ids in pieces])


def response_values(critic_values: torch.nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor,
                    response_len: int) -> torch.Tensor:
    """V(S_t) for each response token t: the critic's value at the token before it.

    `critic_values` maps (input_ids, attention_mask) to per-token values (a TokenValueModel).
    The last position has no response token after it, so it is left out of the forward pass.
    """
    prompt_len = sequences.shape[1] - response_len
    values = critic_values(sequences[:, :-1], attention_mask[:, :-1])  # [batch, seq - 1]
    return values[:, prompt_len - 1 :]


def logprobs_and_entropy(logits: torch.Tensor, response_ids: torch.Tensor, temperature: float,
                         with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Differentiable response log-probs and (without gradient) the entropy when asked for.

    `logits` are the fresh output of this forward, read by nothing else: full-precision ones are
    divided by the temperature in place (the LM head's backward needs its input, not its output),
    which saves a vocabulary-sized tensor per micro-batch and gives the same numbers bit for bit.
    """
    if temperature != 1.0 and logits.dtype in (torch.float32, torch.float64):
        logits, temperature = logits.div_(temperature), 1.0
    if with_entropy:
        return token_logprobs_and_entropy(logits, response_ids, temperature)
    return token_logprobs(logits, response_ids, temperature), None


class ActorCritic(torch.nn.Module):
    """The trained models of online RL as one module: the actor, and a critic when the algorithm has one.

    DeepSpeed drives one model per engine (TRL's PPO pairs policy and value the same way);
    actor and critic keep separate learning rates (optimizer parameter groups) and gradient
    clipping. With `shared_trunk` the critic runs on the actor's trunk (see `share_trunk`), and
    one trunk pass feeds both the LM head and the critic's score head.
    """

    def __init__(self, actor: PreTrainedModel, critic: PreTrainedModel | None = None, shared_trunk: bool = False):
        super().__init__()
        self.actor = actor
        self.critic = TokenValueModel(critic) if critic is not None else None
        self.shared_trunk = shared_trunk

    def forward(self, sequences: torch.Tensor, attention_mask: torch.Tensor, response_ids: torch.Tensor,
                temperature: float, with_entropy: bool = True, group_size: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Response log-probs [b, r], the policy's entropy at each response position [b, r]
        (no gradient; None unless `with_entropy`) and values V(S_t) [b, r] (None without a critic).
        `group_size` > 1: whole groups of rows sharing a prompt, each prompt computed once."""
        if self.shared_trunk:
            return self._shared_trunk_forward(sequences, attention_mask, response_ids, temperature, with_entropy)
        pieces = [logprobs_and_entropy(logits, ids, temperature, with_entropy)
                  for logits, ids in response_logit_pieces(self.actor, sequences, attention_mask, response_ids,
                                                           group_size)]
        values = (response_values(self.critic, sequences, attention_mask, response_ids.shape[1])
                  if self.critic is not None else None)
        entropy = _joined([e for _, e in pieces]) if with_entropy else None
        return _joined([lp for lp, _ in pieces]), entropy, values

    def _shared_trunk_forward(self, sequences: torch.Tensor, attention_mask: torch.Tensor, response_ids: torch.Tensor,
                              temperature: float, with_entropy: bool
                              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The positions that predict the response tokens are the states S_t the values belong to:
        one forward (without the last position, as in `response_logits`) gives both."""
        response_len = response_ids.shape[1]
        seq, mask = sequences[:, :-1], attention_mask[:, :-1]
        out = self.actor(input_ids=seq, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                         logits_to_keep=response_len, use_cache=False, output_hidden_states=True)
        head = score_head(self.critic.model)
        hidden = out.hidden_states[-1][:, -response_len:]  # the trunk's output, after its final norm
        values = head(hidden.to(head.weight.dtype)).squeeze(-1).float()
        return (*logprobs_and_entropy(out.logits, response_ids, temperature, with_entropy), values)
