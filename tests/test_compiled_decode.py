"""rollout.compile: the compiled decode step (models/compiled_decode.py) samples what the eager sampler
samples (tokens equal, log-probs within float32 rounding), after the weights change too, whole or split
over ranks, in one turn and in multi-turn episodes; its log-probs are as close to the trainer's forward
as the eager step's; a model it cannot take decodes eagerly after one note."""

import pytest
import torch

import quartet.models.compiled_decode as compiled_decode
import quartet.rollout.episodes as episodes
import test_episodes
from quartet.config import RLConfig, SamplingConfig, build_config
from quartet.models.compiled_decode import CompiledDecoder, compiled_capacity
from quartet.models.policy import response_logprobs
from quartet.rollout.backend import make_rollout_backend
from quartet.rollout.generate import sample_responses
from quartet.runs.metrics import read_metrics
from quartet.stages.rl import run_rl
from test_episodes import _eos_biased, _episodes, _tiny_gpt2
from test_lean_forward import EOS, PAD, _model, _prompts

LOGPROB_TOL = dict(atol=1e-5, rtol=1e-4)  # the packed products and fused kernels round differently


def _sample(model, cfg, decoder=None, seed=3, rows=slice(None), row_offset=0, total_rows=None, n=2):
    ids, mask = _prompts()
    return sample_responses(model, ids[rows], mask[rows], cfg, EOS, PAD, generator=torch.Generator().manual_seed(seed),
                            n=n, decoder=decoder, row_offset=row_offset, total_rows=total_rows)


def _assert_same_samples(compiled, eager):
    assert torch.equal(compiled.response_ids, eager.response_ids)
    assert torch.equal(compiled.response_mask, eager.response_mask)
    torch.testing.assert_close(compiled.logprobs, eager.logprobs, **LOGPROB_TOL)


@pytest.mark.parametrize("arch", ["gpt2-tanh", "llama"])  # Llama with grouped-query attention (2 heads per KV head)
def test_the_compiled_sampler_samples_what_the_eager_one_does_before_and_after_an_update(arch):
    model = _model(arch)
    notes = []
    decoder = CompiledDecoder(model, note=notes.append)
    cfg = SamplingConfig(max_new_tokens=10, min_new_tokens=2, temperature=0.9, top_k=40, top_p=0.95)
    _assert_same_samples(_sample(model, cfg, decoder), _sample(model, cfg))
    assert decoder.packed is not None and len(decoder.packed.entries) == 4 * 2 + 1 + (3 if arch == "llama" else 0) * 2
    assert notes[0].startswith("rollout.compile: compiling the decode step for 8 rows x 64 cache positions")
    assert notes[1].startswith("rollout.compile: compiled in ")

    # an optimizer step changes the weights in place: the next rollout must not read stale packed copies
    # (a fused AdamW, as Quartet's trainers use, writes them without moving their version counters)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model.lm_head.weight.grad = torch.randn_like(model.lm_head.weight)
    for p in model.base_model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    greedy = SamplingConfig(max_new_tokens=10, greedy=True)
    for sampling in (cfg, greedy):
        _assert_same_samples(_sample(model, sampling, decoder, seed=4), _sample(model, sampling, seed=4))
    assert len(notes) == 2  # one shape, compiled once


def test_a_split_batch_samples_what_the_whole_batch_samples_compiled():
    model = _model("gpt2-tanh")
    decoder = CompiledDecoder(model, note=lambda text: None)
    cfg = SamplingConfig(max_new_tokens=8, temperature=1.0)
    whole = _sample(model, cfg, decoder)
    halves = [_sample(model, cfg, decoder, rows=slice(0, 2), row_offset=0, total_rows=8),
              _sample(model, cfg, decoder, rows=slice(2, 4), row_offset=4, total_rows=8)]
    width = max(h.response_ids.shape[1] for h in halves)
    assert whole.response_ids.shape[1] == width
    for i, half in enumerate(halves):
        rows = slice(4 * i, 4 * i + 4)
        length = half.response_ids.shape[1]
        assert torch.equal(half.response_ids, whole.response_ids[rows, :length])
        torch.testing.assert_close(half.logprobs, whole.logprobs[rows, :length], **LOGPROB_TOL)


@pytest.mark.parametrize("room", ["estimated", "outgrown"])
def test_multi_turn_episodes_compiled_match_the_eager_episodes(tokenizer, monkeypatch, room):
    model = _eos_biased(_tiny_gpt2(tokenizer), tokenizer.eos_token_id)  # a hooked head: called as a module
    eager, eager_records, eager_driver = _episodes(model, tokenizer)
    compiled_decoder = CompiledDecoder(model, note=lambda text: None)
    original = test_episodes.sample_episodes
    monkeypatch.setattr(test_episodes, "sample_episodes", lambda *a, **k: original(*a, **k, decoder=compiled_decoder))
    if room == "outgrown":  # a cache with room for 3 tokens after the prompt: decode steps and observations grow it
        monkeypatch.setattr(episodes, "compiled_capacity", lambda positions: 5 + 3)
    compiled, records, driver = _episodes(model, tokenizer)
    assert compiled_decoder.usable and compiled_decoder._shapes_compiled  # the steps did run compiled
    if room == "outgrown":
        assert len({shape[3] for shape in compiled_decoder._shapes_compiled}) > 1  # compiled for each capacity
    assert driver.calls == eager_driver.calls and [r.turns for r in records] == [r.turns for r in eager_records]
    for name in ("response_ids", "response_mask", "action_mask", "turn_ids"):
        assert torch.equal(getattr(compiled, name), getattr(eager, name)), name
    torch.testing.assert_close(compiled.logprobs, eager.logprobs, **LOGPROB_TOL)


def test_a_model_it_cannot_take_or_a_failed_compilation_decodes_eagerly_after_one_note(monkeypatch):
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.8)
    eager_attention = _model("gpt2-tanh", attn="eager")  # the lean passes (and so the compiled step) do SDPA only
    notes = []
    decoder = CompiledDecoder(eager_attention, note=notes.append)
    assert not decoder.usable and len(notes) == 1 and "attention implementation 'eager'" in notes[0]
    _assert_bitwise(_sample(eager_attention, cfg, decoder), _sample(eager_attention, cfg))

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("inductor is not available here\nmore detail")
        return run

    monkeypatch.setattr(compiled_decode.torch, "compile", broken_compile)
    model = _model("llama")
    notes = []
    decoder = CompiledDecoder(model, note=notes.append)
    _assert_bitwise(_sample(model, cfg, decoder), _sample(model, cfg))  # the eager step from the failed one on
    assert notes[-1] == ("rollout.compile: compilation failed, decoding eagerly from here on (RuntimeError: inductor "
                         "is not available here)")
    _assert_bitwise(_sample(model, cfg, decoder), _sample(model, cfg))
    assert sum("compil" in note for note in notes) == 2  # the try and the failure, once


def _assert_bitwise(a, b):
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)


def test_capacities_round_up_to_the_compilation_unit():
    assert [compiled_capacity(n) for n in (1, 64, 65, 200)] == [64, 64, 128, 256]


def test_compiled_log_probs_are_as_close_to_the_trainers_forward_as_the_eager_ones():
    """Neither decode step rounds as a full forward does; the compiled one stays within float32 rounding of it
    too, so its log-probs serve as old log-probs as the eager step's do."""
    model = _model("llama")
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.9)
    eager = _sample(model, cfg)
    compiled = _sample(model, cfg, CompiledDecoder(model, note=lambda text: None))
    with torch.no_grad():
        forward = response_logprobs(model, eager.sequences, eager.attention_mask, eager.response_ids, temperature=0.9)
    valid = eager.response_mask.bool()
    assert torch.equal(compiled.response_ids, eager.response_ids)
    assert (compiled.logprobs - forward)[valid].abs().max() < 1e-5
    assert (eager.logprobs - forward)[valid].abs().max() < 1e-5
    assert make_rollout_backend("hf", EOS, PAD, compile=True).logprobs_match_trainer


def test_a_grpo_run_on_an_environment_with_compile_gives_the_eager_runs_numbers(fruit, capsys):
    def run(name, compile):
        run_rl(build_config(RLConfig, {
            "run": {"output_dir": str(fruit / name)}, "models": {"actor": str(fruit / "sft" / "final")},
            "data": {"train": str(fruit / "prompts.jsonl")}, "algorithm": {"name": "grpo"},
            # old log-probs recomputed in both: the losses then differ only where the sampled tokens do
            "rollout": {"max_new_tokens": 8, "n": 4, "env": "agent_envs:AppleRounds", "max_turns": 3,
                        "max_observation_tokens": 32, "compile": compile, "logprobs_from_generation": False},
            "batch": {"rollout_batch_size": 8, "mini_batch_size": 8}, "optim": {"actor_lr": 3e-4},
            "train": {"steps": 2}}))
        return read_metrics(fruit / name / "metrics.jsonl")

    eager = run("compile_off", False)
    compiled = run("compile_on", True)
    assert "rollout.compile: compiled in" in capsys.readouterr().out
    for e, c in zip(eager, compiled, strict=True):
        for key in ("score/mean", "turns/mean", "env/reward", "response/length"):
            assert c[key] == e[key], key  # the same tokens were sampled
        for key in ("loss/policy", "kl/ref", "policy/entropy"):
            assert c[key] == pytest.approx(e[key], rel=1e-4, abs=1e-6), key
