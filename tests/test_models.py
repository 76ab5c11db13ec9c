"""Models: every registered name builds, converts with a rule, and trains its feedback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neuralign as na
from neuralign.attention import Projection
from neuralign.models import ModelConfig, build_model, list_models

# input shape per model family (the CIFAR ResNets and LeNet take images, cnn1d sequences)
_SHAPES = {"mlp": (1, 40), "cnn1d": (1, 40), "lenet": (1, 28, 28), "gru1d": (1, 40),
           "transformer1d": (1, 40), "resnet1d": (1, 40)}
_REGISTERED = [m for m in list_models(include_torchvision=False)
               if m not in ("charlm", "gpt2")]  # (tokens)


def _convertible(model: nn.Module) -> int:
    """How many feedback layers converting ``model`` should give: one per Linear/Conv, four per
    attention module, two per recurrent layer and direction."""
    n = 0
    for m in model.modules():
        if type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
            n += 1
        elif isinstance(m, nn.MultiheadAttention):
            n += 4
        elif isinstance(m, nn.RNNBase):
            n += 2 * m.num_layers * (2 if m.bidirectional else 1)
    return n


@pytest.mark.parametrize("name", _REGISTERED + ["resnet18"])
def test_every_model_builds_and_converts(name):
    # small images keep the deep CIFAR ResNets quick (global average pooling takes any size)
    shape = _SHAPES.get(name, (3, 8, 8) if name.startswith("resnet") and name != "resnet18"
                        else (3, 32, 32))
    torch.manual_seed(0)
    plain = build_model(ModelConfig(name=name), shape, 7)
    x = torch.randn(2, *shape)
    assert plain(x).shape == (2, 7)
    n_layers = _convertible(plain)
    model = na.convert(plain, "ia")
    layers = list(na.feedback_layers(model))
    assert len(layers) == n_layers > 0  # every Linear/Conv became a feedback layer
    torch.testing.assert_close(model(x), plain(x))  # same forward
    model(x).square().mean().backward()
    for lname, layer in layers:  # the rule's gradient reached every feedback weight
        assert layer.feedback.grad is not None, lname
        # (an attention or recurrent projection's W is its module's Parameter, or rows of it)
        weight = layer._source[0] if isinstance(layer, Projection) else layer.weight
        assert weight.grad is not None, lname


def test_registry_names():
    names = list_models()
    for n in ("mlp", "lenet", "cnn1d", "resnet20", "resnet32", "resnet44", "resnet56",
              "resnet110", "resnet18", "resnet50", "resnet152"):
        assert n in names


def test_unknown_model_lists_valid():
    with pytest.raises(ValueError, match="valid: .*cnn1d.*torchvision"):
        build_model(ModelConfig(name="resnet7"), (3, 32, 32), 10)


def test_mlp_widths():
    m = build_model(ModelConfig(name="mlp", widths=[30, 20, 10]), (1, 8, 8), 3)
    linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [
        (64, 30), (30, 20), (20, 10), (10, 3)]


def test_cnn1d_is_the_mnist1d_authors_cnn():
    m = build_model(ModelConfig(name="cnn1d"), (1, 40), 10)
    assert m.fc.in_features == 25 * 5  # 40 -> 19 -> 10 -> 5 positions, 25 channels


@pytest.mark.parametrize("depth,params", [(20, 0.27e6), (56, 0.85e6), (110, 1.7e6)])
def test_cifar_resnet_sizes_option_a(depth, params):
    m = build_model(ModelConfig(name=f"resnet{depth}"), (3, 32, 32), 10)
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - params) / params < 0.03  # He et al. 2016, Table 6
    # option A: parameter-free shortcuts, so no 1x1 convolutions at all
    assert all(c.kernel_size != (1, 1) for c in m.modules() if isinstance(c, nn.Conv2d))


def test_cifar_resnet_option_b_projects():
    m = build_model(ModelConfig(name="resnet20", shortcut="B"), (3, 32, 32), 10)
    assert sum(isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1) for c in m.modules()) == 2
    with pytest.raises(ValueError, match="'A' or 'B'"):
        build_model(ModelConfig(name="resnet20", shortcut="C"), (3, 32, 32), 10)


def test_torchvision_model_on_grey_images():
    m = build_model(ModelConfig(name="resnet18"), (1, 28, 28), 10)
    assert m.conv1.in_channels == 1
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="cnn1d needs sequence inputs"):
        build_model(ModelConfig(name="cnn1d"), (1, 28, 28), 10)
    with pytest.raises(ValueError, match="lenet needs image inputs"):
        build_model(ModelConfig(name="lenet"), (1, 40), 10)


def test_xavier_init_draws_every_weight_from_xavier_bound_and_zeroes_biases():
    torch.manual_seed(0)
    m = build_model(ModelConfig(name="lenet", init="xavier_uniform"), (1, 28, 28), 10)
    layers = [mod for mod in m.modules() if isinstance(mod, nn.Linear | nn.Conv2d)]
    assert len(layers) == 5
    for mod in layers:
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(mod.weight)
        bound = (6 / (fan_in + fan_out)) ** 0.5
        w = mod.weight.detach()
        # uniform on [-bound, bound]: inside it, and spread over it (std bound/sqrt(3))
        assert w.abs().max() <= bound
        assert abs(w.std().item() - bound / 3 ** 0.5) < 0.15 * bound
        assert torch.count_nonzero(mod.bias) == 0
    with pytest.raises(ValueError, match="valid: default, xavier_uniform"):
        build_model(ModelConfig(name="lenet", init="xavier"), (1, 28, 28), 10)


def test_lenet_takes_batch_norm_and_refuses_other_options():
    m = build_model(ModelConfig(name="lenet", kwargs={"batch_norm": True}), (1, 28, 28), 10)
    norms = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d)]
    assert [n.num_features for n in norms] == [6, 16, 120, 84]
    assert all(n.num_batches_tracked == 0 for n in norms)  # the size probe moved nothing
    assert m(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    with pytest.raises(ValueError, match="lenet has no option width.*valid: batch_norm"):
        build_model(ModelConfig(name="lenet", kwargs={"width": 3}), (1, 28, 28), 10)


def test_charlm_is_causal_and_trains_on_per_position_targets():
    torch.manual_seed(0)
    plain = build_model(ModelConfig(name="charlm", kwargs={"dim": 16, "heads": 2}), (12,), 7)
    x = torch.randint(0, 7, (3, 12))
    out = plain(x)
    assert out.shape == (3, 7, 12)  # [N, vocab, T]: cross_entropy's layout
    changed = x.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 7
    torch.testing.assert_close(plain(changed)[..., :8], out[..., :8])  # no peeking ahead
    model = na.convert(plain, "sa")
    assert len(list(na.feedback_layers(model))) == 2 * (4 + 2) + 1  # attention, FF, read-out
    y = torch.randint(0, 7, (3, 12))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for name, layer in na.feedback_layers(model):  # the rule's gradient reached every F
        assert layer.feedback.grad is not None, name


@pytest.mark.parametrize("name, shape", [("charlm", (12,)), ("transformer1d", (1, 40))])
def test_transformers_take_post_norm_blocks(name, shape):
    """``norm_first=false``: post-norm encoder layers (Launay et al.'s DFA transformer): each
    block's output is normalised over the features (layer norm's scale 1 and shift 0 at
    initialisation), the default pre-norm block's is not."""
    torch.manual_seed(0)
    post = build_model(ModelConfig(name=name, kwargs={"norm_first": False}), shape, 7)
    blocks = post.layers if name == "charlm" else post.encoder
    assert all(not b.norm_first for b in blocks)
    assert all(b.norm_first for b in (build_model(ModelConfig(name=name), shape, 7).layers
                                      if name == "charlm" else
                                      build_model(ModelConfig(name=name), shape, 7).encoder))
    h = 3 * torch.randn(2, 5, blocks[0].self_attn.embed_dim) + 1
    out = blocks[0](h)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 5), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(2, 5), rtol=0, atol=1e-3)


def test_resnet1d_is_the_cifar_resnet_in_one_dimension():
    """resnet1d: the CIFAR ResNet's stages of Conv1d (16/32/64 channels, option A shortcuts,
    batch norm), depth 6n+2; a 1-D sequence [C, L] repeated along a second axis of size 1 gives
    the 2-D network with (1 x 3) kernels the same output."""
    torch.manual_seed(0)
    for depth in (8, 14):
        m = build_model(ModelConfig(name="resnet1d", kwargs={"depth": depth}), (1, 40), 10)
        convs = [c for c in m.modules() if isinstance(c, nn.Conv1d)]
        assert len(convs) == 1 + 2 * 3 * (depth - 2) // 6  # stem + two a block
        assert m(torch.randn(4, 1, 40)).shape == (4, 10)
    x = torch.randn(3, 1, 40)
    with pytest.raises(ValueError, match="depth must be 6n\\+2"):
        build_model(ModelConfig(name="resnet1d", kwargs={"depth": 10}), (1, 40), 10)
    with pytest.raises(ValueError, match="resnet1d has no option width"):
        build_model(ModelConfig(name="resnet1d", kwargs={"width": 8}), (1, 40), 10)
    with pytest.raises(ValueError, match="needs sequence inputs"):
        build_model(ModelConfig(name="resnet1d"), (1, 28, 28), 10)
    # resnet8 on [C, 1, L], its 3 x 3 kernels' middle rows set to resnet1d's kernels and the
    # rest to zero (the padded rows), gives resnet1d's output
    plain2d = build_model(ModelConfig(name="resnet8"), (1, 1, 40), 10).eval()
    m8 = build_model(ModelConfig(name="resnet1d"), (1, 40), 10).eval()
    with torch.no_grad():
        for a, b in zip(m8.state_dict().values(), plain2d.state_dict().values(), strict=True):
            if a.dim() == 3:
                b.zero_()[:, :, b.shape[2] // 2] = a
            else:
                b.copy_(a)
    torch.testing.assert_close(m8(x), plain2d(x[:, :, None]), rtol=1e-5, atol=1e-5)


def test_gpt2_is_causal_and_converts_whole():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    plain = build_model(ModelConfig(name="gpt2", kwargs={"dim": 16, "heads": 2}), (12,), 7)
    x = torch.randint(0, 7, (3, 12))
    out = plain(x)
    assert out.shape == (3, 7, 12)  # [N, vocab, T]
    changed = x.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 7
    torch.testing.assert_close(plain(changed)[..., :8], out[..., :8])  # no peeking ahead
    model = na.convert(plain, "sa", on_unsupported="raise")
    assert len(list(na.feedback_layers(model))) == 2 * 4 + 1  # 4 Conv1D a layer, read-out
    torch.nn.functional.cross_entropy(model(x), torch.randint(0, 7, (3, 12))).backward()
    for name, layer in na.feedback_layers(model):
        assert layer.feedback.grad is not None, name
