"""The process that runs one attempt at a stage: `python -m entgan.lifelong.stage_process WORKDIR`.

The controller starts it in a session of its own (so the attempt and the engine processes it
spawns form one process group that can be stopped together), with its output going to
`WORKDIR/stage.log`. Nothing imports this module (it is only ever run), so `python -m` runs it
cleanly. It reads `request.json` and leaves exactly one of:

- `result.json` (exit status 0): the stage's outputs, written atomically as the very last step, so
  its presence means the attempt finished;
- `error.json` (exit status 3): a problem the user can fix (bad data, bad config), with its reason
  and message;
- neither (any other status): a crash; the traceback is in `stage.log`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from entgan.config import ConfigError
from entgan.data.errors import DataError
from entgan.lifelong.stages import (
    ERROR_FILE,
    EXIT_USER_ERROR,
    REQUEST_FILE,
    RESULT_FILE,
    EvalRequest,
    StageRequest,
    TrainRequest,
    run_eval,
    run_measure,
    run_train,
    write_json,
)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if len(arguments) != 1:
        print("usage: python -m entgan.lifelong.stage_process WORKDIR", file=sys.stderr)
        return 2
    workdir = Path(arguments[0])
    request = StageRequest.model_validate_json((workdir / REQUEST_FILE).read_text()).request
    torch.set_num_threads(request.spec.training.engine.threads_per_process)
    print(f"{request.stage} stage of job '{request.job}', cycle {request.cycle}", flush=True)
    try:
        if isinstance(request, TrainRequest):
            result = run_train(request, workdir)
        elif isinstance(request, EvalRequest):
            result = run_eval(request, workdir)
        else:
            result = run_measure(request, workdir)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        write_json(workdir / ERROR_FILE, {"reason": type(error).__name__, "message": str(error)})
        return EXIT_USER_ERROR
    write_json(workdir / RESULT_FILE, result)
    print(f"{request.stage} stage done", flush=True)
    return 0


if __name__ == "__main__":  # the engine's spawned ranks re-import this module: run only as a script
    sys.exit(main())
