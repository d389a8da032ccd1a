"""From a bench configuration to the list of runs it launches, each with its full run configuration.

Three groups of runs, in this order:
- `methods`: every listed method on the base configuration with its tuned settings (`tuned`),
  under the bench's time budget;
- `ablations`: every variant (the base with overrides), under the same budget;
  with reporting `seeds`, both groups once per seed, seed by seed (keys `<row>-s<seed>`);
- `memory_sweep`: each swept method at each worker count, for a fixed number of rounds; with
  `repeats`, the whole sweep again, so that every method's repeats are spread over the same span
  of the machine's time.

Tuning runs (`plan_tuning_runs`, for `entgan tune`) are each method's candidates on each tuning
seed, labelled `<method>-c<index>`.

Timed runs evaluate every `eval_every_s` of training clock and stop after the round that passes the
budget (or, with `stop_at_target`, at the first evaluation at or below the target FID).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

from entgan.bench.config import BenchConfig, VariantConfig, method_config_data, split_workers, variant_config_data
from entgan.config import ConfigError, RunConfig, parse_config

RunGroup = Literal["methods", "ablations", "memory_sweep"]


@dataclass(frozen=True)
class PlannedRun:
    """One run of the bench: where it goes, what row it fills, and its complete configuration."""

    key: str
    """Unique name: the run directory, the config file and the log are named after it."""
    group: RunGroup
    label: str
    """Row label: the method's name, or the ablation variant's."""
    config: RunConfig

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def algorithm(self) -> str:
        return self.config.algorithm

    @property
    def workers(self) -> int:
        return self.config.num_workers


def _timed(bench: BenchConfig, data: dict[str, Any], time_budget_s: float | None = None) -> dict[str, Any]:
    data = {**data, "rounds": bench.max_rounds}
    data["stop"] = {
        "time_budget_s": time_budget_s or bench.time_budget_s,
        "target_fid": bench.target_fid,
        "end_at_target": bench.stop_at_target,
    }
    data["eval"] = {**data["eval"], "every_seconds": bench.evaluation_interval_s}
    if bench.profiles:  # the edge clock replays the runs' timelines
        data["engine"] = {**data["engine"], "timeline": True}
    return data


def _validated(data: dict[str, Any], key: str) -> RunConfig:
    """The bench builds these itself, so a failure here means the bench and the engine disagree."""
    return parse_config(data, origin=f"run '{key}' built by the bench")


def plan_runs(bench: BenchConfig, only: Collection[str] | None = None, with_sweep: bool = True) -> list[PlannedRun]:
    """Every run of `bench`, optionally restricted to the rows named in `only` (methods or variants).

    Raises ConfigError if `only` names a row the bench does not have.
    """
    if only is not None:
        known = [*bench.labels, *(m for m in bench.swept_methods() if m not in bench.labels)]
        unknown = sorted(set(only) - set(known))
        if unknown:
            raise ConfigError(f"--methods: {unknown} not in this bench; it has {known}")
    wanted = (lambda label: label in only) if only is not None else (lambda label: True)
    base = bench.base.model_dump(mode="json")
    runs: list[PlannedRun] = []
    seeds: list[int | None] = list(bench.seeds) or [None]
    for seed in seeds:  # seed by seed: a slow drift of the machine spreads over every method alike
        for method in filter(wanted, bench.methods):
            runs.append(_seeded_run(bench, "methods", method, method_config_data(bench, method), seed))
        for variant in bench.ablations:
            if wanted(variant.name):
                runs.append(_seeded_run(bench, "ablations", variant.name, variant_config_data(bench.base, variant), seed))
    if with_sweep and bench.memory_sweep is not None:
        sweep = bench.memory_sweep
        tasks_at = {
            count: [
                {**task, "workers": workers}
                for task, workers in zip(base["tasks"], split_workers(count, len(base["tasks"])), strict=True)
            ]
            for count in sweep.workers
        }
        variants = {variant.name: variant_config_data(bench.base, variant) for variant in sweep.variants}
        for repeat in range(sweep.repeats):
            for label in filter(wanted, bench.swept_methods()):
                row_base = variants.get(label) or method_config_data(bench, label)
                for count, tasks in tasks_at.items():
                    key = f"sweep-{label}-k{count}" + (f"-r{repeat + 1}" if sweep.repeats > 1 else "")
                    data = {**row_base, "name": f"{bench.name}-{key}", "rounds": sweep.rounds, "tasks": tasks}
                    data["engine"] = {**data["engine"], "live_tensors": True}  # what the memory is made of
                    runs.append(PlannedRun(key, "memory_sweep", label, _validated(data, key)))
    return runs


def _seeded_run(
    bench: BenchConfig,
    group: RunGroup,
    label: str,
    data: dict[str, Any],
    seed: int | None,
    time_budget_s: float | None = None,
    key: str | None = None,
) -> PlannedRun:
    """A timed run of `data` (the base's seed when `seed` is None); its key names the seed."""
    key = key or (label if seed is None else f"{label}-s{seed}")
    data = {**data, "name": f"{bench.name}-{key}"}
    if seed is not None:
        data["seed"] = seed
    return PlannedRun(key, group, label, _validated(_timed(bench, data, time_budget_s), key))


def candidate_label(method: str, index: int) -> str:
    """Row label of a method's `index`-th tuning candidate."""
    return f"{method}-c{index}"


def plan_tuning_runs(bench: BenchConfig, only: Collection[str] | None = None) -> list[PlannedRun]:
    """Every tuning run: each method's candidates on each tuning seed, seed by seed."""
    if bench.tuning is None:
        raise ConfigError(f"bench '{bench.name}' has no `tuning:` section (seeds and a grid per method)")
    unknown = sorted(set(only or ()) - set(bench.tuning.grid))
    if unknown:
        raise ConfigError(f"--methods: {unknown} have no tuning candidates; the grid has {sorted(bench.tuning.grid)}")
    runs = []
    for seed in bench.tuning.seeds:
        for method, candidates in bench.tuning.grid.items():
            if only is not None and method not in only:
                continue
            for index, overrides in enumerate(candidates):
                label = candidate_label(method, index)
                data = variant_config_data(bench.base, VariantConfig(name=label, algorithm=method, overrides=overrides))
                runs.append(_seeded_run(bench, "methods", label, data, seed, bench.tuning.time_budget_s))
    return runs
