"""Data-only case lists shared by the tests: every layer type and option combination."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from neuralign.convert import DEFAULT_MAPPING
from neuralign.layers import FeedbackLayer


@dataclass(frozen=True)
class LayerCase:
    id: str
    cls: type
    args: tuple
    kwargs: dict
    input_shape: tuple
    channels_last: bool = False

    def make(self, dtype=torch.float64, seed=0) -> nn.Module:
        torch.manual_seed(seed)
        layer = self.cls(*self.args, **self.kwargs).to(dtype)
        with torch.no_grad():  # a non-zero bias, so bias handling is visible
            if layer.bias is not None:
                layer.bias.normal_()
        return layer

    def input(self, dtype=torch.float64, seed=1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(self.input_shape, generator=g, dtype=dtype)
        if self.channels_last:
            x = x.to(memory_format=torch.channels_last)
        return x


def _c(id, cls, args, shape, channels_last=False, **kwargs):
    return LayerCase(id, cls, args, kwargs, shape, channels_last)


LAYER_CASES = [
    _c("linear", nn.Linear, (6, 5), (4, 6)),
    _c("linear-nobias", nn.Linear, (6, 5), (4, 6), bias=False),
    _c("linear-3d", nn.Linear, (6, 5), (3, 4, 6)),
    _c("linear-4d", nn.Linear, (6, 5), (2, 3, 2, 6)),
    _c("linear-unbatched", nn.Linear, (6, 5), (6,)),
    _c("conv1d", nn.Conv1d, (3, 4, 3), (2, 3, 9)),
    _c("conv1d-stride-pad-dil", nn.Conv1d, (4, 6, 3), (2, 4, 13), stride=2, padding=2, dilation=2),
    _c("conv1d-groups-nobias", nn.Conv1d, (4, 6, 3), (2, 4, 8), groups=2, bias=False),
    _c("conv1d-same-even", nn.Conv1d, (3, 4, 4), (2, 3, 9), padding="same"),
    _c("conv1d-valid", nn.Conv1d, (3, 4, 3), (2, 3, 9), padding="valid"),
    _c("conv1d-reflect", nn.Conv1d, (3, 4, 3), (2, 3, 9), padding=2, padding_mode="reflect"),
    _c("conv1d-replicate", nn.Conv1d, (3, 4, 3), (2, 3, 9), padding=1, padding_mode="replicate"),
    _c("conv1d-circular", nn.Conv1d, (3, 4, 3), (2, 3, 9), padding=2, padding_mode="circular",
       stride=2),
    _c("conv1d-unbatched", nn.Conv1d, (3, 4, 3), (3, 9), padding=1),
    _c("conv2d", nn.Conv2d, (3, 4, 3), (2, 3, 7, 6)),
    _c("conv2d-stride-pad", nn.Conv2d, (3, 4, 3), (2, 3, 8, 7), stride=2, padding=1),
    _c("conv2d-rect-dil", nn.Conv2d, (3, 4, (3, 2)), (2, 3, 9, 8), dilation=(2, 1),
       padding=(1, 2)),
    _c("conv2d-depthwise", nn.Conv2d, (4, 8, 3), (2, 4, 6, 6), groups=4, padding=1),
    _c("conv2d-same-even-dil", nn.Conv2d, (3, 4, (2, 4)), (2, 3, 7, 8), padding="same",
       dilation=(1, 3)),
    _c("conv2d-reflect", nn.Conv2d, (3, 4, 3), (2, 3, 6, 7), padding=(1, 2),
       padding_mode="reflect"),
    _c("conv2d-circular-nobias", nn.Conv2d, (3, 4, 3), (2, 3, 6, 7), padding=2,
       padding_mode="circular", bias=False),
    _c("conv2d-replicate-same", nn.Conv2d, (3, 4, 2), (2, 3, 6, 7), padding="same",
       padding_mode="replicate"),
    _c("conv2d-few-positions", nn.Conv2d, (3, 4, 3), (2, 3, 4, 3), stride=2, padding=1),
    _c("conv2d-one-position-cl", nn.Conv2d, (3, 4, 3), (2, 3, 3, 3), channels_last=True),
    _c("conv2d-channels-last", nn.Conv2d, (3, 4, 3), (2, 3, 7, 6), channels_last=True,
       padding=1),
    _c("conv3d", nn.Conv3d, (2, 3, 3), (2, 2, 5, 4, 5), stride=(1, 2, 1), padding=1),
    _c("conv3d-groups-replicate", nn.Conv3d, (4, 2, 2), (1, 4, 4, 5, 3), groups=2,
       padding=1, padding_mode="replicate"),
    _c("convT1d", nn.ConvTranspose1d, (3, 4, 3), (2, 3, 7)),
    _c("convT1d-stride-outpad-dil", nn.ConvTranspose1d, (4, 6, 3), (2, 4, 6), stride=3,
       padding=2, output_padding=1, dilation=2),
    _c("convT1d-groups-nobias", nn.ConvTranspose1d, (4, 6, 3), (2, 4, 5), groups=2, bias=False),
    _c("convT1d-unbatched", nn.ConvTranspose1d, (3, 4, 3), (3, 6), padding=1),
    _c("convT2d", nn.ConvTranspose2d, (3, 4, 3), (2, 3, 5, 4)),
    _c("convT2d-stride-pad-outpad", nn.ConvTranspose2d, (3, 4, (3, 2)), (2, 3, 4, 5), stride=2,
       padding=(1, 0), output_padding=(1, 1)),
    _c("convT2d-depthwise-dil", nn.ConvTranspose2d, (4, 8, 3), (2, 4, 4, 4), groups=4,
       dilation=2, stride=2, output_padding=1),
    _c("convT2d-channels-last", nn.ConvTranspose2d, (3, 4, 3), (2, 3, 5, 4), channels_last=True,
       stride=2),
    _c("convT3d-groups", nn.ConvTranspose3d, (4, 2, 2), (1, 4, 3, 4, 3), groups=2, stride=(2, 1, 2),
       padding=1, output_padding=(1, 0, 0)),
]

try:  # the hf extra: GPT-2's Conv1D ([in, out] weights), registered by the integration
    from transformers.pytorch_utils import Conv1D

    import neuralign.integrations.hf  # noqa: F401

    LAYER_CASES += [_c("hf-conv1d", Conv1D, (5, 6), (4, 6)),  # Conv1D(nf=out, nx=in)
                    _c("hf-conv1d-3d", Conv1D, (5, 6), (3, 4, 6))]
except ImportError:
    pass

try:  # the timm extra: timm's own Linear (nn.Linear's map), registered by the integration
    from timm.layers import Linear as TimmLinear

    import neuralign.integrations.timm  # noqa: F401

    LAYER_CASES += [_c("timm-linear-3d", TimmLinear, (6, 5), (3, 4, 6))]
except ImportError:
    pass

# Every layer type the converter knows has at least one case.
# (containers of projections have their own tests: test_attention.py, test_recurrent.py)
assert {c.cls for c in LAYER_CASES} == {cls for cls, feedback in DEFAULT_MAPPING.items()
                                        if issubclass(feedback, FeedbackLayer)}, \
    "a mapped layer type has no case"


def plain_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """The torch layer's own forward with the given kernel and bias (an independent reference)."""
    plain = layer.to_module() if hasattr(layer, "to_module") else layer
    out = torch.func.functional_call(plain, {"weight": weight}, (x,), strict=False)
    if plain.bias is not None and bias is None:  # the layer's bias was used: take it off again
        out = torch.func.functional_call(plain, {"weight": weight, "bias": torch.zeros_like(plain.bias)},
                                         (x,))
    elif bias is not None:
        out = torch.func.functional_call(plain, {"weight": weight, "bias": bias}, (x,))
    return out
