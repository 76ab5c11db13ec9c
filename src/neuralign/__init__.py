"""neuralign: credit assignment without weight symmetry, for any PyTorch model.

Examples:
    >>> import torch
    >>> import neuralign as na
    >>> model = na.convert(torch.nn.Sequential(torch.nn.Linear(4, 3)), "sa")
    >>> type(model[0]).__name__
    'FeedbackLinear'
"""

from . import estimate, metrics, rules
from .attention import FeedbackMultiheadAttention
from .convert import (
    after_step,
    bypassed_layers,
    convert,
    exact_backprop,
    feedback_layers,
    feedback_points,
    param_groups,
    revert,
)
from .layers import (
    DFAPoint,
    FeedbackConv1d,
    FeedbackConv2d,
    FeedbackConv3d,
    FeedbackConvTranspose1d,
    FeedbackConvTranspose2d,
    FeedbackConvTranspose3d,
    FeedbackLinear,
)
from .recipe import FeedbackOptimizer, feedback_optimizer
from .recurrent import (
    FeedbackGRU,
    FeedbackGRUCell,
    FeedbackLSTM,
    FeedbackLSTMCell,
    FeedbackRNN,
    FeedbackRNNCell,
)
from .report import report
from .rules import Rule, get_rule, list_rules

__version__ = "0.1.0"

__all__ = [
    "convert", "revert", "feedback_layers", "feedback_points", "bypassed_layers", "param_groups",
    "exact_backprop",
    "after_step", "report",
    "feedback_optimizer", "FeedbackOptimizer",
    "Rule", "get_rule", "list_rules", "metrics", "rules", "estimate",
    "FeedbackLinear", "FeedbackConv1d", "FeedbackConv2d", "FeedbackConv3d",
    "FeedbackConvTranspose1d", "FeedbackConvTranspose2d", "FeedbackConvTranspose3d",
    "FeedbackMultiheadAttention", "FeedbackRNNCell", "FeedbackGRUCell", "FeedbackLSTMCell",
    "FeedbackRNN", "FeedbackGRU", "FeedbackLSTM", "DFAPoint",
]
