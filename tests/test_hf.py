"""Hugging Face transformers (the hf extra): GPT-2's Conv1D as a layer family; GPT-2, BERT, ViT
and T5 built from small configs convert whole (but for what the convert guide lists), give
the unconverted model's outputs and gradients with F = W, and round-trip through
save_pretrained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import neuralign as na
from neuralign.convert import _holds_weights

tf = pytest.importorskip("transformers")
hf = pytest.importorskip("neuralign.integrations.hf")


@pytest.fixture(autouse=True)
def _quiet_transformers():
    verbosity = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()
    yield
    tf.logging.set_verbosity(verbosity)


def _gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=8,
                                            vocab_size=20, bos_token_id=0, eos_token_id=0,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _ids(g, *shape):
    return torch.randint(0, 20, shape, generator=g)


# name -> (model from a small config, inputs from a generator)
MODELS = {
    "gpt2": (_gpt2, lambda g: {"input_ids": _ids(g, 2, 8)}),
    "bert": (lambda: tf.BertForMaskedLM(tf.BertConfig(
        num_hidden_layers=2, num_attention_heads=2, hidden_size=16, intermediate_size=32,
        vocab_size=20, max_position_embeddings=8)), lambda g: {"input_ids": _ids(g, 2, 8)}),
    "vit": (lambda: tf.ViTForImageClassification(tf.ViTConfig(
        num_hidden_layers=2, num_attention_heads=2, hidden_size=16, intermediate_size=32,
        image_size=8, patch_size=4, num_labels=3)),
        lambda g: {"pixel_values": torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)}),
    "t5": (lambda: tf.T5ForConditionalGeneration(tf.T5Config(
        num_layers=2, num_decoder_layers=2, num_heads=2, d_model=16, d_kv=8, d_ff=32,
        vocab_size=20, decoder_start_token_id=0)),
        lambda g: {"input_ids": _ids(g, 2, 8), "labels": _ids(g, 2, 5)}),
}

# What docs/guides/convert.md lists as staying on backprop in these models.
LEFT = {"gpt2": set(), "bert": {"BertLMPredictionHead"}, "vit": {"ViTEmbeddings"},
        "t5": {"T5LayerNorm"}}


@pytest.mark.parametrize("name", MODELS)
def test_models_convert_whole_and_with_f_equal_w_give_the_plain_gradients(name):
    build, inputs = MODELS[name]
    torch.manual_seed(0)
    plain = build().double().eval()  # (eval: no dropout)
    model = na.convert(plain, na.get_rule("fa", init="weight"), on_unsupported="ignore")
    x = inputs(torch.Generator().manual_seed(1))
    assert not na.bypassed_layers(model, lambda: model(**x))
    assert {type(m).__name__ for m in model.modules() if _holds_weights(m)} == LEFT[name]
    if name == "gpt2":
        assert all(type(m) is not tf.pytorch_utils.Conv1D for m in model.modules())
    out_plain, out = plain(**x).logits, model(**x).logits
    torch.testing.assert_close(out, out_plain, rtol=0, atol=1e-10)
    out_plain.square().sum().backward()
    out.square().sum().backward()
    grads = dict(model.named_parameters())
    for n, p in plain.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(grads[n].grad, p.grad, rtol=1e-10, atol=1e-10)


def test_the_errors_go_through_f():
    """A random F changes the gradients below the read-out: the rule is active."""
    torch.manual_seed(0)
    plain = _gpt2().double().eval()
    model = na.convert(plain, "fa")
    x = _ids(torch.Generator().manual_seed(1), 2, 8)
    plain(input_ids=x).logits.square().sum().backward()
    model(input_ids=x).logits.square().sum().backward()
    w = "transformer.h.0.attn.c_attn.weight"
    assert not torch.allclose(model.get_parameter(w).grad, plain.get_parameter(w).grad)
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, hf.FeedbackConv1D) and c_attn.feedback.shape == (16, 48)


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = na.convert(_gpt2(), "aa")
    opt = na.feedback_optimizer(model)
    x = _ids(torch.Generator().manual_seed(1), 2, 8)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(tf.GPT2LMHeadModel, tmp_path, "aa")
    want, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    # and training goes on exactly
    for m in (model, loaded):
        o = na.feedback_optimizer(m) if m is loaded else opt
        m(input_ids=x, labels=x).loss.backward()
        o.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="does not fit"):
        hf.from_pretrained(tf.GPT2LMHeadModel, tmp_path, "fa")  # fa keeps no recipe state


def test_convert_registers_the_family_when_transformers_is_imported():
    """``import neuralign`` does not import transformers; converting a model once it is
    imported converts Conv1D with no import of the integration by the user."""
    script = """
import sys
import neuralign as na
assert "transformers" not in sys.modules
import transformers as tf
tf.logging.set_verbosity_error()
m = tf.GPT2Model(tf.GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=4, vocab_size=10))
model = na.convert(m, "sa", on_unsupported="raise")
print(type(model.h[0].attn.c_attn).__name__)
"""
    src = str(Path(__file__).parents[1] / "src")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={"PYTHONPATH": src, "PATH": ""}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "FeedbackConv1D"
