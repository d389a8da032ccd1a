"""The methods a run can name, each by the import path of its `Method` class.

A method's module is imported only when a run asks for it. `config.AlgorithmName` lists the same
names for validation; `tests/test_layout.py` keeps the two in step.
"""

from __future__ import annotations

from importlib import import_module

from entgan.engine.method import Method

METHOD_PATHS: dict[str, str] = {
    "entgan": "entgan.algorithms.entgan:EntGAN",
    "ren-serial": "entgan.algorithms.ren:RenSerial",
    "ren-parallel": "entgan.algorithms.ren:RenParallel",
    "mdgan": "entgan.algorithms.mdgan:MDGAN",
    "flgan": "entgan.algorithms.flgan:FLGAN",
    "acgan-dance": "entgan.algorithms.dance:DanceACGAN",
    "dgan-1": "entgan.algorithms.dgan:DGANSelectiveUpdates",
    "dgan-2": "entgan.algorithms.dgan:DGANAveragedOutputs",
    "dgan-3": "entgan.algorithms.dgan:DGANEachInTurn",
    "central": "entgan.algorithms.central:Central",
}


def method_class(name: str) -> type[Method]:
    """The `Method` registered as `name`."""
    try:
        path = METHOD_PATHS[name]
    except KeyError:
        raise ValueError(f"algorithm must be one of {sorted(METHOD_PATHS)}, found {name!r}") from None
    method = load_method(path)
    if method.name != name:
        raise RuntimeError(f"{path} is registered as {name!r} but names itself {method.name!r}")
    return method


def load_method(path: str) -> type[Method]:
    """The `Method` subclass at `module:Class` (registry entries, or a user's own method)."""
    module_name, _, class_name = path.partition(":")
    method = getattr(import_module(module_name), class_name, None)
    if not (isinstance(method, type) and issubclass(method, Method)):
        raise ValueError(f"{path}: not an entgan.engine.method.Method subclass")
    return method
