"""The package's import graph has no cycle: no module imports another that imports it back,
directly or around a loop (imports inside functions count; ``if TYPE_CHECKING:`` ones do not,
and neither does a module's own parent package, which Python imports first anyway)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "neuralign"


def _modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name in modules)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                subs = [f"{target}.{a.name}" for a in child.names if f"{target}.{a.name}" in modules]
                if subs:
                    found.update(subs)
                elif target in modules:
                    found.add(target)
            visit(child)

    visit(ast.parse(path.read_text()))
    parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return found - parents - {name}


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    cycles = []

    def walk(node, path, on_path):
        for nxt in sorted(graph[node]):
            if nxt == path[0]:
                cycles.append(" -> ".join(path + [nxt]))
            elif nxt not in on_path and nxt > path[0]:
                walk(nxt, path + [nxt], on_path | {nxt})

    for m in sorted(graph):
        walk(m, [m], {m})
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
