"""Distributed-GAN methods, one module each, all running on the same engine."""

from __future__ import annotations

from entgan.algorithms.base import Algorithm
from entgan.algorithms.entgan import EntGAN

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (EntGAN,)}


def algorithm_class(name: str) -> type[Algorithm]:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"algorithm must be one of {sorted(ALGORITHMS)}, found {name!r}") from None


__all__ = ["ALGORITHMS", "Algorithm", "EntGAN", "algorithm_class"]
