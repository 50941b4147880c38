"""The package's layering: no import cycles, production code never imports the toy world,
no private names imported from other modules or libraries."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dreampainter"
# The only non-toy modules allowed to import dreampainter.toy: the CLI commands that run the toy world.
TOY_ENTRY_POINTS = {"dreampainter.commands.demo", "dreampainter.commands.data"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, imported names)`` for every import statement in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


MODULES = {_module_name(path): path for path in _python_files("dreampainter")}


def _resolve(target: str) -> str | None:
    """The dreampainter module an import refers to (a package's ``__init__`` counts as the package)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        edges = set()
        for module, names in _imports(path):
            if not module.startswith("dreampainter"):
                continue
            for target in [f"{module}.{n}" for n in names] or [module]:
                resolved = _resolve(target)
                if resolved and resolved != name and not name.startswith(f"{resolved}."):
                    edges.add(resolved)
        graph[name] = edges
    return graph


def test_no_import_cycles_between_modules():
    """Function-level imports count too: a cycle dodged by importing inside a function is still a cycle."""
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_production_modules_never_import_the_toy_world():
    offenders = [
        f"{name} imports {module}"
        for name, path in MODULES.items()
        if not name.startswith("dreampainter.toy") and name not in TOY_ENTRY_POINTS
        for module, names in _imports(path)
        if module.startswith("dreampainter.toy") or (module == "dreampainter" and "toy" in names)
    ]
    assert not offenders, offenders


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(source: str) -> list[str]:
    """Imports of a private name from any module (ours or a library's), or of a private dreampainter
    module (absolute, or relative inside the package), at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            ours = node.level > 0 or module.split(".")[0] == "dreampainter"
            parts = (module.split(".") if ours else []) + [alias.name for alias in node.names]
            if any(_private(part) for part in parts):
                names = ", ".join(alias.name for alias in node.names)
                found.append(f"line {node.lineno}: from {'.' * node.level}{module} import {names}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "dreampainter" and any(_private(part) for part in parts):
                    found.append(f"line {node.lineno}: import {alias.name}")
    return found


def test_the_private_import_check_sees_them():
    u = "_"  # spelled apart so that a grep for private imports does not find these examples
    assert private_imports(f"from dreampainter.training.trainer import {u}prepare_inputs, train") != []
    assert private_imports(f"import dreampainter.training.{u}impl") != []
    assert private_imports(f"from . import {u}helper") != []
    assert private_imports(f"from .trainer import (\n    train,\n    {u}optimizer,\n)") != []
    assert private_imports(f"def f():\n    from dreampainter.models import {u}x\n") != []  # inside functions too
    assert private_imports(f"from webdataset.filters import {u}shuffle") != []  # a library's internals too
    assert private_imports("from dreampainter.training.inputs import prepare_inputs\nimport dreampainter.__main__") == []
    assert private_imports("from open_clip import CLIP\nimport torch._dynamo") == []  # a module path is not a name


@pytest.mark.parametrize("folder", ["dreampainter", "scripts", "tests"])
def test_no_private_names_imported(folder):
    """``from x import _y`` couples to another module's internals (ours or a library's)."""
    offenders = {
        str(path.relative_to(REPO)): found
        for path in _python_files(folder)
        if (found := private_imports(path.read_text(encoding="utf-8")))
    }
    assert not offenders, offenders
