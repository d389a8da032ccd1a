"""Equal tuning: the same budget of candidate settings for every method, chosen on tuning seeds.

`entgan tune CONFIG` runs each method's candidates (`tuning.grid`, the same number per method) on
each tuning seed under the bench's time budget, picks per method the candidate with the lowest
median mean FID over the budget (`results.fid_area`: the whole curve counts, and it is defined
even where the target is never reached), or, with `tuning.clock` naming an edge profile, the lowest
median time to the target on that edge clock (what an edge bench claims), and writes the choices
with every tuning run's figures to a tuned file. The bench config's `tuned:` names that file;
`entgan bench` applies the choices to the methods' runs on the reporting seeds, which the tuning
seeds never include.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from entgan.bench.config import BenchConfig
from entgan.bench.plan import candidate_label
from entgan.bench.results import RunResult
from entgan.rundir import atomic_write

SELECTION = "lowest median of the mean FID over the time budget (area under FID against time), over the tuning seeds"


def selection(clock: str | None) -> str:
    """How `choose` ranks candidates, in words (written to the tuned file)."""
    if clock is None:
        return SELECTION
    return (f"lowest median time to the target on the '{clock}' edge clock over the tuning seeds (a miss counts "
            "as never reaching it); ties go to the lower median mean FID over the time budget")


def candidate_score(runs: Sequence[RunResult], clock: str | None = None) -> tuple[float, float]:
    """(median edge time to the target on `clock`, median mean-FID-over-budget) of a candidate's
    runs; without a clock the first is 0 for every candidate, so the mean FID alone decides. A
    failed run, one without an evaluation, or one that misses the target counts as infinitely bad
    in the figure it lacks, so a candidate that crashes is never chosen."""
    if not runs:
        return math.inf, math.inf
    areas = [run.fid_area if run.ok and run.fid_area is not None else math.inf for run in runs]
    if clock is None:
        return 0.0, statistics.median(areas)
    return statistics.median(_edge_time_to_target(run, clock) for run in runs), statistics.median(areas)


def _edge_time_to_target(run: RunResult, clock: str) -> float:
    figures = run.edge.get(clock)
    if not run.ok or figures is None or figures.time_to_target_s is None:
        return math.inf
    return figures.time_to_target_s


def choose(bench: BenchConfig, results: Sequence[RunResult]) -> dict[str, Any]:
    """The tuned file's content: per method the chosen overrides, and every candidate's runs."""
    assert bench.tuning is not None
    clock = bench.tuning.clock
    chosen: dict[str, dict[str, Any]] = {}
    candidates: dict[str, list[dict[str, Any]]] = {}
    for method, grid in bench.tuning.grid.items():
        entries, scores = [], []
        for index, overrides in enumerate(grid):
            runs = [result for result in results if result.label == candidate_label(method, index)]
            edge_time, area = candidate_score(runs, clock)
            scores.append((edge_time, area))
            entry: dict[str, Any] = {"overrides": overrides, "score": area}
            if clock is not None:
                entry["edge_time_to_target_s"] = edge_time
            entry["runs"] = [_run_figures(run, clock) for run in sorted(runs, key=lambda run: run.seed)]
            entries.append(entry)
        if not any(entry["runs"] for entry in entries):
            continue  # not run in this invocation (--methods)
        best = min(range(len(entries)), key=lambda index: (scores[index], index))
        for index, entry in enumerate(entries):
            entry["chosen"] = index == best
        chosen[method] = dict(grid[best])
        candidates[method] = entries
    return {
        "bench": bench.name,
        "methods": chosen,
        "tuning": {
            "selection": selection(clock),
            "seeds": list(bench.tuning.seeds),
            "time_budget_s": bench.tuning.time_budget_s or bench.time_budget_s,
            "target_fid": bench.target_fid,
            "candidates_per_method": len(next(iter(bench.tuning.grid.values()))),
            "candidates": candidates,
        },
    }


def _run_figures(run: RunResult, clock: str | None) -> dict[str, Any]:
    figures = {
        "seed": run.seed,
        "status": run.status,
        "fid_area": run.fid_area,
        "final_fid": run.final_fid,
        "time_to_target_s": run.target.train_clock_s if run.target else None,
        "rounds": run.rounds,
        "error": run.error,
    }
    if clock is not None:
        figures["edge_time_to_target_s"] = _edge_time_to_target(run, clock)
    return figures


def write_tuned(path: Path, tuned: dict[str, Any], command: str) -> Path:
    """Write the tuned file atomically, with a header saying how it was made."""
    header = f"# Written by `{command}`: every method's chosen settings, then the tuning runs behind them.\n"
    body = yaml.safe_dump(_finite(tuned), sort_keys=False, width=120)
    atomic_write(path, lambda handle: handle.write((header + body).encode()))
    return path


def _finite(value: Any) -> Any:
    """YAML has no portable infinity for a score: an unusable candidate's becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value
