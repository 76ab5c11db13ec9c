"""timm: its own ``Linear`` (``nn.Linear`` with a forward of its own for TorchScript, the same
map) as a layer family.

Importing this module registers the family; ``na.convert`` imports it by itself when ``timm``
is already imported. Every other weight-bearing layer of timm's models is a torch layer that
neuralign knows, or stays on backprop for the reasons the convert guide lists
(docs/guides/convert.md: weight-standardised and dynamically padded convolutions, additive
tokens and position embeddings, elementwise scales, layers whose weights the model reads
itself).
"""

from __future__ import annotations

from timm.layers import Linear

from ..layers import FeedbackLayer, register_layer
from ..ops import LinearOps

__all__ = ["FeedbackTimmLinear"]


@register_layer(Linear, LinearOps.from_module)
class FeedbackTimmLinear(FeedbackLayer, Linear):
    """``timm.layers.Linear`` (``nn.Linear``'s map) with a feedback weight."""
