"""The README's Python examples run as written, each on its own (a reader pastes one block into
a fresh interpreter), and its install commands include the CPU-only route."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _run(block: str) -> dict:
    namespace: dict = {"__name__": "__readme__"}  # a fresh namespace: nothing from other blocks
    exec(compile(block, str(README), "exec"), namespace)
    return namespace


def test_readme_examples_run_each_on_its_own():
    blocks = _blocks()
    assert len(blocks) >= 3
    loop, joint, api = (_run(block) for block in blocks[:3])
    # the plain loop learns (chance is 10%; the README states 62.1%, backprop 64.3%)
    assert loop["top1"] > 0.55, loop["top1"]
    # the second loop (the authors' dynamics): F in W's optimizer, trained to W (sa)
    assert [g["weight_decay"] for g in joint["opt"].param_groups] == [1e-4, 0.0]
    assert max(joint["angles"].values()) < 5, joint["angles"]
    # the API tour
    assert api["model"] is not None and set(api["local"]) and set(api["e2e"])
    assert "fc" not in api["e2e"]  # fc was kept plain (rule bp)
    assert set(api["lags"]) == {n for n, layer in api["na"].feedback_layers(api["model"])
                                if layer.rule.name == "sa"}  # sa's fixed point is W
    for block in blocks[3:]:
        _run(block)


def test_readme_gives_a_cpu_only_install():
    text = README.read_text()
    section = text[text.index("[start:commands]"):text.index("[end:commands]")]
    # in the section docs/getting-started.md includes, before the package's own install
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" \
        in section
    assert 'pip install -e ".[dev]"' in section
