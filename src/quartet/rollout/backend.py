"""Rollout backends: where an online-RL step's responses come from.

The trainer talks to this interface only: prompts in; token ids, masks, the sampled tokens'
log-probs and finish reasons out (a `Rollout`), and a way to push the actor's current weights
in. `hf` samples with the actor itself in this process (a KV-cached loop, rollout/generate.py).
A backend in another engine (vLLM) samples from its own copy of the weights with its own
kernels; its log-probs then differ slightly from the trainer's forward pass, so such a backend
says `logprobs_match_trainer = False` and the trainer recomputes the old log-probs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch

from quartet.config import SamplingConfig
from quartet.models.compiled_decode import CompiledDecoder
from quartet.rollout.generate import Rollout, sample_responses


class RolloutBackend(ABC):
    """Samples responses to left-padded prompts with the actor's current weights."""

    name: ClassVar[str]
    logprobs_match_trainer: ClassVar[bool]  # sampled-token log-probs equal the trainer's forward pass
    decoder: CompiledDecoder | None = None  # compiled decode steps, for episodes sampled outside `generate`

    @abstractmethod
    def load_weights(self, actor: torch.nn.Module) -> None:
        """Make the backend sample from `actor`'s current weights (call after every update)."""

    @abstractmethod
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingConfig,
                 n: int = 1, generator: torch.Generator | None = None, row_offset: int = 0,
                 total_rows: int | None = None) -> Rollout:
        """`n` responses per prompt, the rows (samples) of one prompt next to each other.

        `generator`, `row_offset` and `total_rows` make the draws reproducible and independent of
        how a global batch of `total_rows` samples is split over ranks (this batch holds samples
        `row_offset ...`); a backend that cannot honour them must say so.
        """


class HFRollout(RolloutBackend):
    """Samples with the actor module itself, in this process: the weights are the trainer's own.

    With `compile` (`rollout.compile`), decode steps run compiled over a static cache
    (models/compiled_decode.py). Their log-probs are within float32 rounding of the trainer's
    forward, as the eager decode steps' are (a KV-cached step does not round as a full forward
    does): at the anchor shape both differ from it by at most 2e-6. `note` receives its one-line
    messages.
    """

    name = "hf"
    logprobs_match_trainer = True

    def __init__(self, eos_token_id: int, pad_token_id: int, compile: bool = False,
                 note: Callable[[str], None] = print):
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.compile, self.note = compile, note
        self.actor: torch.nn.Module | None = None
        self.decoder: CompiledDecoder | None = None

    def load_weights(self, actor: torch.nn.Module) -> None:
        self.actor = actor  # the same parameters: nothing to copy (the compiled step repacks them per rollout)
        if self.compile and (self.decoder is None or self.decoder.model is not actor):
            self.decoder = CompiledDecoder(actor, note=self.note)

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingConfig,
                 n: int = 1, generator: torch.Generator | None = None, row_offset: int = 0,
                 total_rows: int | None = None) -> Rollout:
        if self.actor is None:
            raise RuntimeError("HFRollout.generate before load_weights: no actor to sample from")
        return sample_responses(self.actor, prompt_ids, prompt_mask, sampling, self.eos_token_id, self.pad_token_id,
                                generator=generator, row_offset=row_offset, total_rows=total_rows, n=n,
                                decoder=self.decoder)


ROLLOUT_BACKENDS: dict[str, type[RolloutBackend]] = {"hf": HFRollout}


def make_rollout_backend(name: str, eos_token_id: int, pad_token_id: int, compile: bool = False,
                         note: Callable[[str], None] = print) -> RolloutBackend:
    if name not in ROLLOUT_BACKENDS:
        raise ValueError(f"unknown rollout backend {name!r}; known: {', '.join(ROLLOUT_BACKENDS)}")
    return ROLLOUT_BACKENDS[name](eos_token_id, pad_token_id, compile=compile, note=note)
