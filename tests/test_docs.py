"""The documentation site: every public name documented, every page's Python code runs as
written, the rules page's catalog is the library's. (`.ci/run` builds the site in strict mode.)"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import subprocess
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


# -- the API reference: what mkdocstrings renders from the docstrings --------------------------


def _griffe_objects():
    griffe = pytest.importorskip("griffe")
    package = griffe.load("neuralign", search_paths=[str(ROOT / "src")],
                          docstring_parser="google",
                          docstring_options={"warn_missing_types": False})

    def walk(obj):
        yield obj
        for member in obj.members.values():
            if not member.is_alias:
                yield from walk(member)

    return [obj for obj in walk(package) if obj.docstring]


def test_each_returns_section_is_one_item():
    """A wrapped ``Returns:`` description continues indented (Google style); otherwise each line
    renders as a return value of its own, and ``A :class:...`` reads as a named one."""
    bad = []
    for obj in _griffe_objects():
        for section in obj.docstring.parsed:
            if section.kind.value in ("returns", "yields") and (
                    len(section.value) != 1 or section.value[0].name):
                bad.append(f"{obj.path}: {[(r.name, r.description) for r in section.value]}")
    assert not bad, "\n".join(bad)


def test_doctest_examples_are_in_examples_sections():
    """``>>>`` outside an ``Examples:`` section renders as nested quotes, not code."""
    bad = [obj.path for obj in _griffe_objects() for section in obj.docstring.parsed
           if section.kind.value == "text" and ">>>" in section.value]
    assert not bad, bad


def test_package_docstring_example_runs():
    import doctest

    result = doctest.testmod(neuralign, verbose=False)
    assert result.attempted >= 1 and result.failed == 0, result


# -- the site reads offline ---------------------------------------------------------------------


def test_mathjax_ships_with_the_site():
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    scripts = [s if isinstance(s, str) else s["path"] for s in config["extra_javascript"]]
    assert not [s for s in scripts if re.match(r"(https?:)?//", s)], scripts
    for script in scripts:
        assert (DOCS / script).is_file(), script
    mathjax = [s for s in scripts if "mathjax" in s and s != "javascripts/mathjax.js"]
    assert mathjax, scripts
    vendor = (DOCS / mathjax[0]).parent
    assert "Apache License" in (vendor / "LICENSE").read_text()


@pytest.mark.slow
def test_built_site_renders_returns_and_examples_and_loads_no_remote_script(tmp_path):
    """The site as `.ci/run` builds it: no script from the network; `revert` and `param_groups`
    with one return row; the package's example as code."""
    pytest.importorskip("mkdocs")

    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                        "--site-dir", str(site)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr
    for page in site.rglob("*.html"):
        remote = re.findall(r'<script[^>]+src="((?:https?:)?//[^"]+)"', page.read_text())
        assert not remote, (page, remote)
    core = (site / "api" / "core" / "index.html").read_text()
    for name in ("revert", "param_groups", "convert.convert", "convert.bypassed_layers"):
        start = core.index(f'id="neuralign.{name}"')
        section = core[start:core.index('<div class="doc doc-object', start + 1)]
        returns = section[section.index("Returns:"):]
        returns = returns[:returns.index("</table>")]
        assert returns.count('class="doc-section-item"') == 1, name
    package = core[:core.index('id="neuralign.revert"')]  # the package's own docstring
    assert '<span class="gp">&gt;&gt;&gt; </span>' in package and "<blockquote>" not in package


def test_experiments_guide_says_what_its_code_does():
    text = (DOCS / "guides" / "experiments.md").read_text()
    start = text.index("## From Python")
    prose = " ".join(text[start:text.index("```python", start)].split())
    code = text[text.index("```python", start):]
    over = dict(re.findall(r'"([a-z_]+\.[a-z_]+)=([^"]+)"', code))
    n, val = int(over["data.num_samples"]), float(over["data.val_split"])
    width = yaml_list(over["model.widths"])
    train = int(n * 0.8)  # MNIST-1D: 80% train, 20% test
    held = round(train * val)
    assert f"{n} MNIST-1D examples ({train - held} to train, {held} to validate, " \
           f"{n - train} to test)" in prose
    assert f"one hidden layer of {width[0]} units" in prose and len(width) == 1
    assert f"batches of {over['data.batch_size']}" in prose
    assert f"for {over['train.epochs']} epochs" in prose
    models = re.search(r'parse_models\("([^"]+)"\)', code).group(1)
    depths = [len(yaml_list(w)) + 1 for w in re.findall(r"widths=(\[[^\]]*\])", models)]
    assert f"MLPs of {depths[0]} and {depths[1]} weight layers" in code
    trials = re.search(r"trials=(\d+)", code).group(1)
    assert f"({trials} trials;" in code


def yaml_list(text: str) -> list:
    import yaml

    return yaml.safe_load(text)


def test_user_facing_files_use_the_projects_own_tools():
    """No script outside the repository (fetch-mnist lived in a development folder): the way to
    get MNIST is `neuralign fetch`, documented where the datasets are."""
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *DOCS.rglob("*.md"),
             *(ROOT / "configs").rglob("*.yaml"), *(ROOT / "src").rglob("*.py")]
    bad = [str(f.relative_to(ROOT)) for f in files
           if "fetch-mnist" in f.read_text() or "../shared" in f.read_text()]
    assert not bad, bad
    assert "neuralign fetch mnist fashion-mnist --data-dir DIR" in (DOCS / "cli.md").read_text()
