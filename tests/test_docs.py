"""The documentation site: every public name documented, every page's Python code runs as
written, the rules page's catalog is the library's. (`.ci/run` builds the site in strict mode.)"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

import pytest

import neuralign

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"


def _modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(neuralign.__path__, "neuralign.")]
    return ["neuralign", *(n for n in names if not n.endswith("__main__"))]


def _public(module) -> list[tuple[str, object]]:
    """A module's public functions and classes: its ``__all__``, or else every name it defines
    without a leading underscore."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, obj in vars(module).items() if not n.startswith("_")
                 and getattr(obj, "__module__", None) == module.__name__]
    objs = [(n, getattr(module, n)) for n in names]
    return [(n, o) for n, o in objs if inspect.isfunction(o) or inspect.isclass(o)]


def _undocumented() -> list[str]:
    missing = []
    for name in _modules():
        module = importlib.import_module(name)
        if not inspect.getdoc(module):
            missing.append(name)
        for attr, obj in _public(module):
            if not inspect.getdoc(obj):
                missing.append(f"{name}.{attr}")
            if not inspect.isclass(obj) or obj.__module__ != name:
                continue
            for member, value in vars(obj).items():
                if member.startswith("_"):
                    continue
                if isinstance(value, property):
                    doc = inspect.getdoc(value)
                elif inspect.isfunction(value) or isinstance(value, classmethod | staticmethod):
                    doc = inspect.getdoc(getattr(obj, member))  # inherited docs count
                else:
                    continue
                if not doc:
                    missing.append(f"{name}.{attr}.{member}")
    return missing


def test_every_public_name_has_a_docstring():
    missing = _undocumented()
    assert not missing, f"{len(missing)} public names without a docstring: {missing}"


def _pages() -> list[Path]:
    return [DOCS / "getting-started.md", DOCS / "weight-estimation.md",
            *sorted((DOCS / "concepts").glob("*.md")), *sorted((DOCS / "guides").glob("*.md"))]


@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.slow) if p.stem == "experiments"
                                  else p for p in _pages()], ids=lambda p: p.stem)
def test_page_code_runs(page, tmp_path, monkeypatch, one_thread):
    text = page.read_text()
    # snippets from the README (getting started) are run by tests/test_readme.py
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    if page.stem != "getting-started":
        assert blocks, f"{page.name} has no Python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)


def test_snippets_point_at_existing_sections():
    readme = (ROOT / "README.md").read_text()
    for page in DOCS.rglob("*.md"):
        for target in re.findall(r'--8<-- "([^"]+)"', page.read_text()):
            path, _, section = target.partition(":")
            assert (ROOT / path).is_file(), f"{page.name}: {path} does not exist"
            if section:
                assert f"--8<-- [start:{section}]" in readme and f"--8<-- [end:{section}]" in readme


def test_catalog_table_is_the_librarys():
    sys.path.insert(0, str(DOCS))
    try:
        import hooks
    finally:
        sys.path.remove(str(DOCS))
    table = hooks._catalog_table()
    for name in neuralign.list_rules():
        rule = neuralign.get_rule(name)
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` |"))
        for term, value in rule.terms.items():
            assert f"{term} {value:g}" in row
        assert row.count("|") - row.count("\\|") == 8  # seven cells: no stray column
