"""`entgan bench`: several methods on the same workload in one invocation, measured side by side.

- `config`: the bench configuration (base run, methods, ablations, target, budget, sweep, network);
- `plan`: the runs a bench launches, each with its complete run configuration;
- `runner`: each run in a fresh process (optionally behind a rate-limited link, `network`);
- `results`: a run's figures, read back from its run directory;
- `report`: `bench.md`, `bench.json` and the plots.
"""

from entgan.bench.config import BenchConfig, load_bench_config, parse_bench_config
from entgan.bench.plan import PlannedRun, plan_runs
from entgan.bench.results import RunResult, TargetHit, time_to_target
from entgan.bench.runner import BenchRunner, prepare_output

__all__ = [
    "BenchConfig",
    "BenchRunner",
    "PlannedRun",
    "RunResult",
    "TargetHit",
    "load_bench_config",
    "parse_bench_config",
    "plan_runs",
    "prepare_output",
    "time_to_target",
]
