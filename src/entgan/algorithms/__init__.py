"""Distributed-GAN methods, one module each, all running on the same engine.

The registry names each method's class by import path, so a method's module is imported only
when a run asks for it.
"""

from __future__ import annotations

from importlib import import_module

from entgan.algorithms.base import Algorithm

ALGORITHM_PATHS: dict[str, str] = {
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


def algorithm_class(name: str) -> type[Algorithm]:
    try:
        module_name, class_name = ALGORITHM_PATHS[name].split(":")
    except KeyError:
        raise ValueError(f"algorithm must be one of {sorted(ALGORITHM_PATHS)}, found {name!r}") from None
    algorithm = getattr(import_module(module_name), class_name)
    if algorithm.name != name:
        raise RuntimeError(f"{ALGORITHM_PATHS[name]} is registered as {name!r} but names itself {algorithm.name!r}")
    return algorithm


__all__ = ["ALGORITHM_PATHS", "Algorithm", "algorithm_class"]
