"""Models in Hugging Face format: save -> load round trips, safety of loading, presets."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from quartet.models.forward import sequence_scores
from quartet.models.loading import ModelLoadError, load_causal_lm, load_scalar_model, save_model
from quartet.models.presets import PRESETS, build_preset_model
from quartet.models.tokenizer import load_tokenizer


def test_save_load_round_trip_gives_identical_logits(tmp_path, tokenizer):
    model = build_preset_model("nano", tokenizer, seed=3).eval()
    save_model(model, tokenizer, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()  # plain transformers
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "m")("hello")["input_ids"] == tokenizer("hello")["input_ids"]


def test_scalar_model_loads_in_plain_transformers_with_same_scores(scalar_dir, tokenizer):
    ours = load_scalar_model(scalar_dir).eval()
    theirs = AutoModelForSequenceClassification.from_pretrained(scalar_dir).eval()
    texts = ["Once upon a time there was a robot.", "Try Lotus Garden near the station."]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(ours, enc["input_ids"], enc["attention_mask"]),
                                   theirs(**enc).logits.squeeze(-1), atol=1e-5, rtol=0)


def test_scalar_model_from_causal_lm_checkpoint(lm_dir):
    model = load_scalar_model(lm_dir)
    assert model.config.num_labels == 1 and model.score.out_features == 1


def test_pickle_weights_are_refused_unless_allowed(tmp_path, tokenizer):
    model = build_preset_model("nano", tokenizer)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle, as older tools write
    with pytest.raises(ModelLoadError, match="pickle"):
        load_causal_lm(tmp_path)
    assert load_causal_lm(tmp_path, allow_pickle=True) is not None


def test_directory_without_weights_and_missing_directory(tmp_path, tokenizer):
    build_preset_model("nano", tokenizer).config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no model weights"):
        load_causal_lm(tmp_path)
    with pytest.raises(ModelLoadError, match="not found"):
        load_causal_lm(tmp_path / "nope")


def test_tokenizer_gets_a_pad_token(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    import json
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("pad_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token is not None


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_run(name, tokenizer):
    model = build_preset_model(name, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 10_000
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, len(tokenizer))


def test_gpt2_preset_takes_the_fused_tanh_gelu_with_stock_gpt2s_math(tokenizer):
    """gpt2-tiny runs the anchors' one-kernel tanh GELU (what the lean passes call directly), whose
    values are stock GPT-2's five-kernel gelu_new up to rounding."""
    from transformers.activations import ACT2FN, GELUTanh

    model = build_preset_model("gpt2-tiny", tokenizer)
    activation = model.transformer.h[0].mlp.act
    assert type(activation) is GELUTanh
    x = torch.linspace(-8, 8, 4001)
    assert torch.allclose(activation(x), ACT2FN["gelu_new"](x), rtol=0, atol=1e-5)  # the erf GELU is 4.7e-4 away
