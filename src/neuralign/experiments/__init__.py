"""The paper's evaluation as commands: metaparameter search, transfer across depth, robustness
to noisy feedback updates.

Examples:
    >>> from neuralign.experiments import search, transfer, robustness
"""

from .common import run_once
from .compare import compare
from .robustness import robustness
from .search import search
from .space import SearchSpace, SpaceError, load_space, parse_space
from .transfer import parse_models, transfer

__all__ = ["compare", "search", "transfer", "robustness", "run_once", "SearchSpace",
           "SpaceError", "load_space", "parse_space", "parse_models"]
