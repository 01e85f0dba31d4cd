"""ppo.compile: the compiled update forward gives the eager numbers (log-probs, values, gradients)."""

import torch

from quartet.models.policy import ActorCritic
from quartet.models.presets import build_preset_model


def test_compiled_actor_critic_matches_eager(tokenizer):
    pair = ActorCritic(build_preset_model("nano", tokenizer, seed=0),
                       build_preset_model("nano", tokenizer, seed=1, scalar=True)).eval()
    compiled = torch.compile(pair)  # what PPOTrainer does with ppo.compile (same parameters)
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(3, len(tokenizer), (4, 14), generator=generator)
    attention = torch.ones_like(sequences)
    attention[0, :3] = 0  # a left-padded prompt
    response = sequences[:, 8:]

    def run(module):
        pair.zero_grad(set_to_none=True)
        logprobs, entropy, values = module(sequences, attention, response, 0.7, True)
        (logprobs.sum() + values.square().sum()).backward()
        return logprobs.detach(), entropy, values.detach(), [p.grad.clone() for p in pair.parameters()]

    eager_out, compiled_out = run(pair), run(compiled)
    for eager, fast in zip(eager_out[:3], compiled_out[:3]):
        torch.testing.assert_close(fast, eager, atol=1e-5, rtol=1e-5)
    for eager, fast in zip(eager_out[3], compiled_out[3]):
        torch.testing.assert_close(fast, eager, atol=1e-5, rtol=1e-4)
