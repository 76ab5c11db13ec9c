"""CONTRIBUTING.md's worked examples run as written, in order, in one namespace."""

import re
from pathlib import Path

import neuralign as na
from neuralign.layers import FEEDBACK_CLASSES
from neuralign.ops import OPS
from neuralign.rules import _CATALOG

GUIDE = Path(__file__).parents[1] / "CONTRIBUTING.md"


def test_contributing_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    try:
        for block in blocks:
            exec(compile(block, str(GUIDE), "exec"), namespace)
        assert type(namespace["layer"]) is namespace["FeedbackScaledLinear"]
        assert namespace["rule"].name == "mine" and "ia-light" in na.list_rules()
    finally:  # leave the registries as they were
        cls = namespace.get("ScaledLinear")
        FEEDBACK_CLASSES.pop(cls, None)
        OPS.pop(cls, None)
        _CATALOG.pop("ia-light", None)
