"""No module imports another module's private names: scripts, tests and the package use public pieces
(the trainer's set-up, step and checkpoint functions included)."""

import ast

import pytest
from training_utils import REPO

ROOTS = ("dreampainter", "scripts", "tests")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(source: str) -> list[str]:
    """Imports of a private name or private module of dreampainter (absolute, or relative inside it)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0 and module.split(".")[0] != "dreampainter":
                continue  # another project's internals are its own business
            parts = module.split(".") + [alias.name for alias in node.names]
            if any(_private(part) for part in parts):
                found.append(f"line {node.lineno}: from {'.' * node.level}{module} import "
                             + ", ".join(alias.name for alias in node.names))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "dreampainter" and any(_private(part) for part in parts):
                    found.append(f"line {node.lineno}: import {alias.name}")
    return found


def test_the_check_sees_private_imports():
    u = "_"  # spelled apart so that a grep for private imports does not find these examples
    assert private_imports(f"from dreampainter.training.trainer import {u}prepare_inputs, train") != []
    assert private_imports(f"import dreampainter.training.{u}impl") != []
    assert private_imports(f"from . import {u}helper") != []
    assert private_imports(f"from .trainer import (\n    train,\n    {u}optimizer,\n)") != []
    assert private_imports(f"def f():\n    from dreampainter.models import {u}x\n") != []  # inside functions too
    assert private_imports("from dreampainter.training.inputs import prepare_inputs\nimport dreampainter.__main__") == []
    assert private_imports(f"from webdataset.filters import {u}shuffle") == []


@pytest.mark.parametrize("root", ROOTS)
def test_no_private_imports_across_modules(root):
    offenders = {
        str(path.relative_to(REPO)): found
        for path in sorted((REPO / root).rglob("*.py"))
        if ".venv" not in path.parts and (found := private_imports(path.read_text(encoding="utf-8")))
    }
    assert not offenders, f"private names imported from another module: {offenders}"
