"""The package's layering and the method registry, checked from the source."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

import pytest

from entgan.config import AlgorithmName
from entgan.engine.method import Method, ServerRole, WorkerRole
from entgan.engine.registry import METHOD_PATHS, method_class

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "entgan"


def imported_modules(path: Path, package: str | None = None) -> set[str]:
    """Every module a source file of `package` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    if package is None:
        package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
    return names


@pytest.mark.parametrize("lower", ["engine", "gan"])
def test_lower_layers_import_nothing_from_the_methods(lower: str) -> None:
    """engine/ (the round loop, transport, registry) and gan/ (shared mechanics) never import
    entgan.algorithms: methods build on them, not the other way round."""
    offenders = {
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in sorted((PACKAGE / lower).rglob("*.py"))
        for name in imported_modules(path)
        if name == "entgan.algorithms" or name.startswith("entgan.algorithms.")
    }
    assert not offenders, sorted(offenders)


def test_the_import_check_sees_an_upward_import(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"
    source.write_text("from entgan.algorithms.entgan import EntGAN\nfrom ..algorithms import dgan\nimport torch\n")
    assert imported_modules(source, "entgan.engine") == {"entgan.algorithms.entgan", "entgan.algorithms", "torch"}


def test_registry_and_config_name_the_same_methods() -> None:
    assert set(METHOD_PATHS) == set(get_args(AlgorithmName))


@pytest.mark.parametrize("name", sorted(METHOD_PATHS))
def test_every_registered_method_has_both_roles(name: str) -> None:
    method = method_class(name)
    assert issubclass(method, Method) and method.name == name
    assert issubclass(method.server, ServerRole) and issubclass(method.worker, WorkerRole)
