"""How an embedded run's processes are started: forked from a fork server that imported torch once.

A spawned process imports torch and the engine afresh (over a second of CPU each); a run of K
workers pays that K+1 times at every start and every restart, all at once, on the same cores. A
fork server imports them once per launching process and forks every rank from that clean state
(it never ran an operator, so no thread pool or CUDA context is forked).

A forked rank would otherwise inherit the fork server's surroundings, fixed when the first launch
started it, not those of the launch that asked for it. `LauncherSurroundings` carries the latter
into each rank: the environment and the stdout/stderr descriptors (under pytest, the first launch's
descriptors belong to a test whose captured output has long been closed). The working directory,
`sys.path` and the main module are already re-applied by multiprocessing itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from multiprocessing import reduction
from typing import Any

import torch.multiprocessing as mp

PRELOADED_MODULES = ["entgan.engine.launch", "torch._dynamo"]
"""Imported by the fork server before it forks any rank: torch, the engine and everything a rank
needs up to its method's own module (imported by the rank from `algorithm_path` or the registry),
and torch._dynamo, which every rank's first optimizer step would otherwise import (with sympy:
over a second each)."""


def start_method() -> str:
    """`forkserver` where the platform has it (Linux, macOS), else `spawn`."""
    if "forkserver" in mp.get_all_start_methods():
        mp.get_context("forkserver").set_forkserver_preload(PRELOADED_MODULES)
        return "forkserver"
    return "spawn"


class LauncherSurroundings:
    """The launching process's environment and stdout/stderr, applied in a rank as it unpickles
    its arguments (pass one as an argument of the rank's function)."""

    def __init__(self) -> None:
        self.environment = dict(os.environ)

    def __reduce__(self) -> tuple[Callable[..., None], tuple[Any, ...]]:
        # Pickled while multiprocessing is starting the child: `DupFd` hands it these descriptors.
        return (_adopt, (self.environment, reduction.DupFd(1), reduction.DupFd(2)))


def _adopt(environment: dict[str, str], stdout: Any, stderr: Any) -> None:
    os.environ.clear()
    os.environ.update(environment)
    os.dup2(stdout.detach(), 1)
    os.dup2(stderr.detach(), 2)
