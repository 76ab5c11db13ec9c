"""Models: a registry of plain PyTorch builders, converted afterwards with a learning rule.

Builders make ordinary ``torch.nn`` models (``nn.Linear``/``nn.Conv*`` layers); the trainer turns
them into feedback models with :func:`neuralign.convert`. Names:

- ``mlp``: flatten, then ``Linear`` + ReLU per hidden width (``ModelConfig.widths``).
- ``lenet``: LeNet-5 (conv 6@5x5, pool, conv 16@5x5, pool, 120, 84), ReLU and max-pooling
  (``model.kwargs.batch_norm``: batch norm after each hidden ReLU).
- ``cnn1d``: the MNIST-1D authors' 1-D CNN (three stride-2 convolutions of 25 channels, then a
  linear read-out), for ``[N, C, L]`` inputs.
- ``gru1d``: a bidirectional GRU over the positions of ``[N, C, L]`` inputs, after the
  MNIST-1D authors' GRU; ``transformer1d``: a small patch transformer for them.
- ``charlm``: a small causal transformer language model (data ``pydoc``), next-token logits
  at every position.
- ``gpt2``: GPT-2's architecture (Hugging Face transformers' ``GPT2LMHeadModel``, built from a
  config: needs the ``hf`` extra), small, for the same data: its projections are
  transformers' ``Conv1D``, converted by :mod:`neuralign.integrations.hf`.
- ``resnet8``, ``resnet20`` … ``resnet110``: the CIFAR ResNets of He et al. 2016 (§4.2): 3
  stages of 16/32/64 channels, n basic blocks each (depth 6n+2); ``resnet1d``: the same
  network of ``Conv1d`` layers for ``[N, C, L]`` inputs (``model.kwargs.depth``, default 8).
  The shortcut is **option A** by default (identity; when the shape changes, stride-2
  subsampling and zero-padded channels: no parameters, as in the paper's CIFAR experiments);
  ``shortcut: B`` uses 1x1 convolution + BN projections where the shape changes.
- any torchvision classifier by name (``resnet18`` … ``resnet152``, ``vgg11``, …), built
  untrained with ``num_classes`` set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

__all__ = ["ModelConfig", "build_model", "check_model_name", "list_models", "register_model"]

#: Initialisations of the forward weights (``ModelConfig.init``).
MODEL_INITS = ("default", "xavier_uniform")


@dataclass
class ModelConfig:
    """Which network.

    Attributes:
        name: a registered name (see :func:`list_models`) or a torchvision classifier.
        widths: ``mlp``: hidden widths.
        channels: ``cnn1d``: channels of its three convolutions.
        shortcut: CIFAR ResNets: ``A`` (parameter-free identity with zero padding) or ``B``
            (1x1 convolution projections).
        kwargs: extra keyword arguments for a torchvision builder, or the options of
            ``gru1d`` (``hidden``), ``transformer1d`` (``dim``, ``depth``, ``heads``, ``patch``,
            ``norm_first``), ``charlm`` (``dim``, ``depth``, ``heads``, ``norm_first``),
            ``resnet1d`` (``depth``) and ``lenet`` (``batch_norm``).
        init: the forward weights' initialisation: ``default`` (each torch layer's own) or
            ``xavier_uniform`` (every Linear and Conv weight Xavier-uniform, every bias zero:
            BioTorch's benchmark models).
    """

    name: str = "cnn1d"
    widths: list[int] = field(default_factory=lambda: [100, 100])
    channels: list[int] = field(default_factory=lambda: [25, 25, 25])
    shortcut: str = "A"
    kwargs: dict[str, Any] = field(default_factory=dict)
    init: str = "default"


_Builder = Callable[[ModelConfig, tuple[int, ...], int], nn.Module]
_MODELS: dict[str, _Builder] = {}


def register_model(*names: str) -> Callable[[_Builder], _Builder]:
    """Register a builder ``(cfg, input_shape, num_classes) -> nn.Module`` under ``names``."""

    def deco(fn: _Builder) -> _Builder:
        for name in names:
            if name in _MODELS:
                raise ValueError(f"model {name!r} is already registered")
            _MODELS[name] = fn
        return fn

    return deco


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def list_models(include_torchvision: bool = True) -> list[str]:
    """Model names accepted by ``ModelConfig.name``."""
    names = sorted(_MODELS)
    if include_torchvision:
        names += [n for n in _torchvision_names() if n not in _MODELS]
    return names


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A plain (unconverted) model for inputs ``[N, *input_shape]`` and ``num_classes`` outputs."""
    if cfg.init not in MODEL_INITS:
        raise ValueError(f"unknown model.init {cfg.init!r}; valid: {', '.join(MODEL_INITS)}")
    model = _build(cfg, input_shape, num_classes)
    if cfg.init == "xavier_uniform":
        for mod in model.modules():
            if isinstance(mod, nn.Linear | nn.modules.conv._ConvNd):
                nn.init.xavier_uniform_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
    return model


def _build(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if cfg.name in _MODELS:
        return _MODELS[cfg.name](cfg, tuple(input_shape), num_classes)
    tv = _torchvision_names()
    if cfg.name in tv:
        import torchvision.models as tvm

        if len(input_shape) != 3:
            raise ValueError(f"torchvision model {cfg.name!r} needs image inputs [C, H, W], "
                             f"the data give {tuple(input_shape)}")
        model = tvm.get_model(cfg.name, weights=None, num_classes=num_classes, **cfg.kwargs)
        if input_shape[0] != 3:
            _adapt_first_conv(model, input_shape[0])
        return model
    raise _unknown_model(cfg.name)


def check_model_name(name: str) -> None:
    """Raise :func:`build_model`'s error for a model name it does not know (before a command
    makes its folders or loads its data)."""
    if name not in _MODELS and name not in _torchvision_names():
        raise _unknown_model(name)


def _unknown_model(name: str) -> ValueError:
    tv = _torchvision_names()
    return ValueError(f"unknown model {name!r}; valid: {', '.join(sorted(_MODELS))}, or a "
                      f"torchvision classifier ({', '.join(tv[:6])}, … {len(tv)} in all)")


def _check_options(name: str, cfg: ModelConfig, valid: tuple[str, ...]) -> None:
    """``cfg.kwargs`` holds only options of model ``name`` (else an error naming the valid)."""
    unknown = set(cfg.kwargs) - set(valid)
    if unknown:
        raise ValueError(f"{name} has no option {', '.join(sorted(unknown))} (model.kwargs); "
                         f"valid: {', '.join(valid)}")


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap a torchvision model's first convolution for one with ``in_channels`` inputs."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            new = nn.Conv2d(in_channels, mod.out_channels, mod.kernel_size, mod.stride,
                            mod.padding, mod.dilation, mod.groups, mod.bias is not None,
                            mod.padding_mode)
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], new)
            log.info("model: first convolution %s takes %d input channels", name, in_channels)
            return


# ---------------------------------------------------------------------------------------------
# small models


@register_model("mlp")
def _mlp(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    n_in = 1
    for s in input_shape:
        n_in *= s
    layers: list[nn.Module] = [nn.Flatten()]
    for w in cfg.widths:
        layers += [nn.Linear(n_in, w), nn.ReLU()]
        n_in = w
    layers.append(nn.Linear(n_in, num_classes))
    return nn.Sequential(*layers)


class LeNet(nn.Module):
    """LeNet-5 with ReLU and max-pooling, for ``[N, C, H, W]`` images (28x28 or larger).
    ``batch_norm``: batch normalisation after each hidden layer's ReLU, as in Guerguiev et
    al.'s 2020 network (convolution, ReLU, batch norm, pooling). It shifts the module indices
    after the first layer (the second convolution is ``features.4``)."""

    def __init__(self, in_channels: int, num_classes: int, size: tuple[int, int],
                 batch_norm: bool = False):
        super().__init__()

        def relu(channels: int, conv: bool) -> list[nn.Module]:
            if not batch_norm:
                return [nn.ReLU()]
            return [nn.ReLU(), nn.BatchNorm2d(channels) if conv else nn.BatchNorm1d(channels)]

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), *relu(6, True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), *relu(16, True), nn.MaxPool2d(2),
        )
        with torch.no_grad():  # (in eval mode: the probe must not move batch norm's statistics)
            n = self.features.eval()(torch.zeros(1, in_channels, *size)).numel()
        self.features.train()
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(n, 120), *relu(120, False), nn.Linear(120, 84),
            *relu(84, False), nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("lenet")
def _lenet(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 3:
        raise ValueError(f"lenet needs image inputs [C, H, W], the data give {input_shape}")
    _check_options("lenet", cfg, ("batch_norm",))
    return LeNet(input_shape[0], num_classes, tuple(input_shape[1:]), **cfg.kwargs)


class CNN1d(nn.Module):
    """The MNIST-1D authors' CNN: three stride-2 ``Conv1d`` + ReLU, then a linear read-out."""

    def __init__(self, in_channels: int, length: int, num_classes: int,
                 channels: list[int]):
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"cnn1d needs 3 channel counts (model.channels), got {channels}")
        c1, c2, c3 = channels
        self.conv1 = nn.Conv1d(in_channels, c1, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(c1, c2, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(c2, c3, 3, stride=2, padding=1)
        with torch.no_grad():
            n = self._features(torch.zeros(1, in_channels, length)).numel()
        self.fc = nn.Linear(n, num_classes)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return F.relu(self.conv3(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self._features(x).flatten(1))


@register_model("cnn1d")
def _cnn1d(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 2:
        raise ValueError(f"cnn1d needs sequence inputs [C, L], the data give {input_shape}")
    return CNN1d(input_shape[0], input_shape[1], num_classes, list(cfg.channels))


class GRU1d(nn.Module):
    """A bidirectional GRU over a sequence's positions (one step per position, the channels as
    its input), then a linear read-out of every step's output: after the MNIST-1D authors'
    GRU (``model.kwargs.hidden``: 6 units per direction by default)."""

    def __init__(self, in_channels: int, length: int, num_classes: int, hidden: int = 6):
        super().__init__()
        self.gru = nn.GRU(in_channels, hidden, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * hidden * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x.transpose(1, 2))  # [N, C, L] -> steps [N, L, C]
        return self.fc(out.flatten(1))


@register_model("gru1d")
def _gru1d(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 2:
        raise ValueError(f"gru1d needs sequence inputs [C, L], the data give {input_shape}")
    return GRU1d(input_shape[0], input_shape[1], num_classes, **{"hidden": 6, **cfg.kwargs})


class Transformer1d(nn.Module):
    """A small vision-transformer-style encoder for sequences: the signal cut into patches
    (``model.kwargs.patch``, default 4 positions), each embedded by a Linear map plus a learned
    position embedding, ``depth`` pre-norm encoder layers (``nn.TransformerEncoderLayer``:
    multi-head self-attention and a ReLU feed-forward block; ``norm_first=false``: post-norm),
    a final layer norm, mean pooling, a linear read-out."""

    def __init__(self, in_channels: int, length: int, num_classes: int, dim: int = 32,
                 depth: int = 2, heads: int = 4, patch: int = 4, norm_first: bool = True):
        super().__init__()
        if length % patch:
            raise ValueError(f"transformer1d: the length {length} is not a multiple of the "
                             f"patch {patch} (model.kwargs.patch)")
        self.patch = patch
        self.embed = nn.Linear(in_channels * patch, dim)
        self.position = nn.Parameter(torch.zeros(1, length // patch, dim))
        nn.init.normal_(self.position, std=0.02)
        self.encoder = nn.Sequential(*[
            nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True,
                                       norm_first=norm_first) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, length = x.shape
        tokens = x.view(n, c, length // self.patch, self.patch).permute(0, 2, 1, 3).flatten(2)
        h = self.encoder(self.embed(tokens) + self.position)
        return self.head(self.norm(h).mean(1))


@register_model("transformer1d")
def _transformer1d(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int
                   ) -> nn.Module:
    if len(input_shape) != 2:
        raise ValueError(f"transformer1d needs sequence inputs [C, L], the data give "
                         f"{input_shape}")
    return Transformer1d(input_shape[0], input_shape[1], num_classes, **cfg.kwargs)


class CharTransformer(nn.Module):
    """A small causal transformer language model over token ids ``[N, T]``: an embedding plus a
    learned position embedding, ``depth`` pre-norm encoder layers under a causal mask
    (``norm_first=false``: post-norm), a final layer norm, a linear read-out. It returns
    next-token logits for every position as ``[N, vocab, T]``, the layout ``F.cross_entropy``
    takes with per-position targets ``[N, T]``."""

    def __init__(self, vocab: int, length: int, dim: int = 64, depth: int = 2, heads: int = 4,
                 norm_first: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(1, length, dim))
        nn.init.normal_(self.position, std=0.02)
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True,
                                       norm_first=norm_first) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        h = self.embed(x) + self.position[:, :length]
        mask = self.mask[:length, :length]
        for layer in self.layers:
            h = layer(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h)).transpose(1, 2)


@register_model("charlm")
def _charlm(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 1:
        raise ValueError(f"charlm needs token sequences [T], the data give {input_shape}")
    return CharTransformer(num_classes, input_shape[0], **cfg.kwargs)


class GPT2(nn.Module):
    """GPT-2's architecture at a small size (transformers' ``GPT2LMHeadModel`` from a config,
    random initialisation, no dropout) over token ids ``[N, T]``; next-token logits as
    ``[N, vocab, T]``, as :class:`CharTransformer`. The read-out is tied to the token
    embedding, as in GPT-2."""

    def __init__(self, vocab: int, length: int, dim: int = 64, depth: int = 2, heads: int = 2):
        super().__init__()
        try:
            from transformers import GPT2Config, GPT2LMHeadModel
        except ImportError as e:
            raise ImportError("model gpt2 needs transformers: pip install 'neuralign[hf]'") from e
        config = GPT2Config(vocab_size=vocab, n_positions=length, n_embd=dim, n_layer=depth,
                            n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=0, eos_token_id=0)
        self.gpt2 = GPT2LMHeadModel(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gpt2(input_ids=x).logits.transpose(1, 2)


@register_model("gpt2")
def _gpt2(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 1:
        raise ValueError(f"gpt2 needs token sequences [T], the data give {input_shape}")
    return GPT2(num_classes, input_shape[0], **cfg.kwargs)


# ---------------------------------------------------------------------------------------------
# CIFAR ResNets (He et al. 2016, section 4.2)


class PadShortcut(nn.Module):
    """Option A shortcut: subsample by ``stride`` and zero-pad channels (no parameters); for
    ``[N, C, L]`` and ``[N, C, H, W]`` inputs."""

    def __init__(self, stride: int, extra_channels: int):
        super().__init__()
        self.stride = stride
        self.extra = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[(slice(None), slice(None), *[slice(None, None, self.stride)] * (x.dim() - 2))]
        lo = self.extra // 2
        return F.pad(x, (0, 0) * (x.dim() - 2) + (lo, self.extra - lo))


_CONV_BN = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d)}


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: str, dim: int = 2):
        super().__init__()
        conv, bn = _CONV_BN[dim]
        self.conv1 = conv(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = bn(c_out)
        self.conv2 = conv(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = bn(c_out)
        if stride == 1 and c_in == c_out:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(stride, c_out - c_in)
        else:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride, bias=False), bn(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: 16/32/64 channels, global average pool, linear.
    ``dim=1``: the same network of ``Conv1d`` layers, for sequences ``[C, L]``."""

    def __init__(self, depth: int, in_channels: int, num_classes: int, shortcut: str = "A",
                 dim: int = 2):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, ...), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"model.shortcut must be 'A' or 'B', got {shortcut!r}")
        n = (depth - 2) // 6
        conv, bn = _CONV_BN[dim]
        self.conv1 = conv(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = bn(16)
        stages, c_in = [], 16
        for i, c in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(c_in, c, stride, shortcut, dim))
                c_in = c
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, conv):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(x.mean(tuple(range(2, x.dim()))), 1))


def _cifar_resnet(depth: int) -> _Builder:
    def build(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        if len(input_shape) != 3:
            raise ValueError(f"resnet{depth} needs image inputs [C, H, W], the data give "
                             f"{input_shape}")
        return CifarResNet(depth, input_shape[0], num_classes, cfg.shortcut.upper())

    return build


@register_model("resnet1d")
def _resnet1d(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 2:
        raise ValueError(f"resnet1d needs sequence inputs [C, L], the data give {input_shape}")
    _check_options("resnet1d", cfg, ("depth",))
    return CifarResNet(int(cfg.kwargs.get("depth", 8)), input_shape[0], num_classes,
                       cfg.shortcut.upper(), dim=1)


for _d in (8, 20, 32, 44, 56, 110):
    register_model(f"resnet{_d}")(_cifar_resnet(_d))
