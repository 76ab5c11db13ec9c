"""The README's Python examples run as written, in order, in one namespace."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    # the plain loop learns (chance is 10%; the README states 62.1%, backprop 64.3%)
    assert namespace["top1"] > 0.55, namespace["top1"]
    assert namespace["model"] is not None and set(namespace["local"]) and set(namespace["e2e"])
    # the second loop (the authors' dynamics): F in W's optimizer, trained to W (sa)
    assert [g["weight_decay"] for g in namespace["opt"].param_groups] == [1e-4, 0.0]
    assert max(namespace["angles"].values()) < 5, namespace["angles"]
    assert "fc" not in namespace["e2e"]  # fc was kept plain (rule bp)
    assert set(namespace["lags"]) == {n for n, layer in namespace["na"].feedback_layers(
        namespace["model"]) if layer.rule.name == "sa"}  # sa's fixed point is W
