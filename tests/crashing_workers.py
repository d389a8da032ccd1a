"""Every registered method with a worker that dies mid-run, for the resume tests.

Loaded by the engine through `launch_local(..., algorithm_path="crashing_workers:<class>")`; the
spawned processes import this module from the tests folder (it is on their `sys.path`). Each class
is the registered method itself, unchanged, except that worker `CRASH_RANK` exits abruptly (no
clean-up, like a killed process) when the engine first asks about round index `CRASH_ROUND_INDEX`
of a run that did not resume; the restarted group therefore runs through.
"""

from __future__ import annotations

import os

from entgan.engine.method import Method, WorkerRole
from entgan.engine.registry import METHOD_PATHS, method_class

CRASH_RANK = 2
CRASH_ROUND_INDEX = 3
"""0-based: the worker dies before its 4th round, after its round-2 checkpoint and before its
round-4 one, so the group restarts from round 2 whatever the other ranks have done by then."""
EXIT_CODE = 17


def crashing_class_name(method: str) -> str:
    return "Crashing_" + method.replace("-", "_")


def _crashing(method: str) -> type[Method]:
    """The method with a worker that dies as round CRASH_ROUND_INDEX starts. The engine asks every
    worker whether it takes part in round r twice, whether it does or not: at the end of round r-1
    (to post the receives of what comes down for r) and as round r starts, after the stop decision
    about round r-2 was read and the checkpoint of round r-1 written; the crash is on the second."""
    base = method_class(method)

    def participates(self: WorkerRole, round_index: int) -> bool:
        if self.context.resume is None and self.context.rank == CRASH_RANK and round_index == CRASH_ROUND_INDEX:
            asked = getattr(self, "_asked_about_crash_round", 0) + 1
            self._asked_about_crash_round = asked  # type: ignore[attr-defined]
            if asked == 2:
                os._exit(EXIT_CODE)
        return base.worker.participates(self, round_index)

    name = crashing_class_name(method)
    worker = type(f"{name}_worker", (base.worker,), {"participates": participates, "__module__": __name__})
    return type(name, (base,), {"worker": worker, "__module__": __name__, "__qualname__": name})


for _method in METHOD_PATHS:
    globals()[crashing_class_name(_method)] = _crashing(_method)
