"""What a bench leaves behind: `bench.md` (tables a person reads), `bench.json` (every figure, for
scripts) and plots (FID against training wall-clock per method; server memory against workers).

The report is rewritten after every run, so an interrupted bench still shows what it measured.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from entgan.bench.config import OVERALL_FID, BenchConfig
from entgan.bench.network import NetworkStatus
from entgan.bench.profiles import DeviceProfile, EdgeProfile
from entgan.bench.results import RunResult
from entgan.bench.statistics import Observation, paired_ratio, spread
from entgan.plots import pyplot, save_figure
from entgan.rundir import atomic_write

MIB = 2**20
REPORT_MARKDOWN = "bench.md"
REPORT_JSON = "bench.json"
FID_PLOT = "plots/fid_vs_time.png"
ABLATION_FID_PLOT = "plots/ablations_fid_vs_time.png"
MEMORY_PLOT = "plots/server_memory_vs_workers.png"


@dataclass(frozen=True)
class BenchContext:
    """Circumstances of a bench: how it was started, on what, when."""

    command: str
    started: str
    machine: dict[str, Any]
    network: NetworkStatus
    quick: bool = False


def cpu_info_field(name: str) -> str | None:
    """The first value of field `name` in /proc/cpuinfo (`model name`, `vendor_id`); None where absent."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def machine_info() -> dict[str, Any]:
    """The machine the figures were measured on (they mean little without it)."""
    cpu = cpu_info_field("model name") or platform.processor() or platform.machine()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cpu_vendor": cpu_info_field("vendor_id"),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "entgan": _version("entgan"),
        "load_average_at_start": _load_average(),
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _load_average() -> list[float] | None:
    return [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


# --- comparisons ---------------------------------------------------------------------------------


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def reference_ratios(results: Sequence[RunResult], reference: str | None) -> list[dict[str, Any]]:
    """For every other row: the reference's time to target and server RSS increase divided by the
    row's (below 1: the reference needs less). Empty when the reference did not run."""
    by_label = {result.label: result for result in results if result.ok}
    ref = by_label.get(reference) if reference else None
    if ref is None:
        return []
    return [
        {
            "label": result.label,
            "time_to_target_ratio": _ratio(ref.target.train_clock_s if ref.target else None,
                                           result.target.train_clock_s if result.target else None),
            "rss_increase_ratio": _ratio(ref.server_rss_increase_bytes, result.server_rss_increase_bytes),
        }
        for result in results
        if result.ok and result.label != reference
    ]


# --- over seeds ----------------------------------------------------------------------------------

SeedFigure = Callable[[RunResult, BenchConfig], Observation | None]


def _time_to_target_figure(result: RunResult, bench: BenchConfig) -> Observation | None:
    """Training clock to the target; censored at the run's budget where it was not reached."""
    if result.target is not None:
        return Observation(result.target.train_clock_s)
    budget = result.train_clock_s if bench.stop_at_target else bench.time_budget_s
    return Observation(float(budget or bench.time_budget_s), censored=True)


def _bytes_to_target_figure(result: RunResult, bench: BenchConfig) -> Observation | None:
    """Bytes every rank sent until the target; censored at the whole run's bytes where it was not
    reached (a lower bound)."""
    if result.bytes_to_target is not None:
        return Observation(result.bytes_to_target)
    if result.target is None and result.server_bytes_sent is not None and result.workers_bytes_sent is not None:
        return Observation(result.server_bytes_sent + result.workers_bytes_sent, censored=True)
    return None


def _edge_time_to_target_figure(profile: str) -> SeedFigure:
    """A profile's edge clock to the target; censored at the run's last replayed round."""

    def figure(result: RunResult, bench: BenchConfig) -> Observation | None:
        edge = result.edge.get(profile)
        if edge is None:
            return None
        if edge.time_to_target_s is not None:
            return Observation(edge.time_to_target_s)
        if result.target is None and edge.clock_s is not None:
            return Observation(edge.clock_s, censored=True)
        return None

    return figure


def _plain(attribute: Callable[[RunResult], float | None]) -> SeedFigure:
    def figure(result: RunResult, bench: BenchConfig) -> Observation | None:
        value = attribute(result)
        return None if value is None or not math.isfinite(value) else Observation(float(value))

    return figure


def seed_figures(bench: BenchConfig) -> dict[str, SeedFigure]:
    """The figures summarised over seeds, by name (as in bench.json's `over_seeds`)."""
    return {
        "time_to_target_s": _time_to_target_figure,
        **{f"edge/{name}/time_to_target_s": _edge_time_to_target_figure(name) for name in bench.profiles},
        "fid_area": _plain(lambda r: r.fid_area),
        "final_fid": _plain(lambda r: r.final_fid),
        "server_hwm_increase_bytes": _plain(lambda r: r.server_hwm_increase_bytes),
        "workers_peak_increase_bytes": _plain(lambda r: r.workers_peak_increase_bytes),
        "bytes_sent_total": _plain(
            lambda r: None if r.server_bytes_sent is None or r.workers_bytes_sent is None
            else r.server_bytes_sent + r.workers_bytes_sent
        ),
        "bytes_to_target": _bytes_to_target_figure,
        "rounds": _plain(lambda r: r.rounds),
    }


def over_seeds(bench: BenchConfig, results: Sequence[RunResult]) -> dict[str, Any]:
    """Per row of the timed groups: each figure's per-seed values, median and IQR, and its paired
    ratio to the reference row (row / reference) with a bootstrap CI and a Wilcoxon p."""
    figures = seed_figures(bench)
    by_label: dict[str, dict[int, RunResult]] = {}
    for result in results:
        if result.ok and result.group in ("methods", "ablations"):
            by_label.setdefault(result.label, {})[result.seed] = result
    observed = {
        label: {
            name: {seed: obs for seed, run in runs.items() if (obs := figure(run, bench)) is not None}
            for name, figure in figures.items()
        }
        for label, runs in by_label.items()
    }
    reference = observed.get(bench.reference) if bench.reference else None
    table: dict[str, Any] = {}
    for label, by_figure in observed.items():
        rows: dict[str, Any] = {}
        for name, values in by_figure.items():
            summary = spread([values[seed] for seed in sorted(values)])
            ratio = paired_ratio(values, reference[name]) if reference is not None and label != bench.reference else None
            rows[name] = {
                "per_seed": {str(seed): {"value": obs.value, "censored": obs.censored} for seed, obs in sorted(values.items())},
                "spread": summary.to_dict() if summary else None,
                "ratio_to_reference": ratio.to_dict() if ratio else None,
            }
        table[label] = {"seeds": sorted(by_label[label]), "figures": rows}
    return table


def memory_sweep_table(results: Sequence[RunResult], reference: str | None) -> dict[str, Any]:
    """Server peak RSS and its increase per method and worker count (the median of the repeats,
    with every run's figures kept), and the reference's increase divided by each other method's
    at the same count. A cell with a failed repeat is failed: a median of the survivors would hide it."""
    swept = [result for result in results if result.group == "memory_sweep"]
    workers = sorted({result.workers for result in swept})
    repeats: dict[str, dict[str, list[RunResult]]] = {}
    for result in swept:
        repeats.setdefault(result.label, {}).setdefault(str(result.workers), []).append(result)
    by_method = {
        method: {count: _sweep_cell(runs) for count, runs in cells.items()} for method, cells in repeats.items()
    }
    ratios: dict[str, dict[str, float | None]] = {}
    if reference in by_method:
        for method, cells in by_method.items():
            if method == reference:
                continue
            ratios[method] = {
                count: _ratio(
                    by_method[reference].get(count, {}).get("server_rss_increase_bytes"),
                    cell.get("server_rss_increase_bytes"),
                )
                for count, cell in cells.items()
            }
    return {"workers": workers, "by_method": by_method, "reference": reference, "reference_ratios": ratios}


def _sweep_cell(runs: Sequence[RunResult]) -> dict[str, Any]:
    ok = all(run.ok for run in runs)
    return {
        "status": "ok" if ok else "failed",
        "server_peak_rss_bytes": _median([run.server_peak_rss_bytes for run in runs]) if ok else None,
        "server_rss_increase_bytes": _median([run.server_rss_increase_bytes for run in runs]) if ok else None,
        "server_hwm_increase_bytes": _median([run.server_hwm_increase_bytes for run in runs]) if ok else None,
        "workers_peak_increase_bytes": _median([run.workers_peak_increase_bytes for run in runs]) if ok else None,
        # Counted from the tensors, the same in every repeat (the first repeat's table).
        "server_live_tensors": runs[0].server_live_tensors if ok else None,
        "error": next((run.error for run in runs if not run.ok), None),
        "runs": [
            {
                "key": run.key,
                "status": run.status,
                "server_peak_rss_bytes": run.server_peak_rss_bytes,
                "server_rss_increase_bytes": run.server_rss_increase_bytes,
                "server_hwm_increase_bytes": run.server_hwm_increase_bytes,
                "workers_peak_increase_bytes": run.workers_peak_increase_bytes,
            }
            for run in runs
        ],
    }


def _median(values: Sequence[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if len(known) == len(values) and known else None


# --- bench.json ----------------------------------------------------------------------------------


def report_data(bench: BenchConfig, results: Sequence[RunResult], context: BenchContext) -> dict[str, Any]:
    groups = {group: [r for r in results if r.group == group] for group in ("methods", "ablations", "memory_sweep")}
    return {
        "name": bench.name,
        "started": context.started,
        "written": now_iso(),
        "command": context.command,
        "quick": context.quick,
        "machine": {**context.machine, "load_average_at_write": _load_average()},
        "network": {
            "requested": bench.network.model_dump(mode="json") if bench.network else None,
            "active": context.network.active,
            "description": context.network.describe(),
        },
        "target_fid": bench.target_fid,
        "fid_key": OVERALL_FID,
        "time_budget_s": bench.time_budget_s,
        "eval_every_s": bench.evaluation_interval_s,
        "target_confirmations": bench.target_confirmations,
        "stop_at_target": bench.stop_at_target,
        "reference": bench.reference,
        "base_config": bench.base.model_dump(mode="json"),
        "seeds": list(bench.seeds),
        "tuned": bench.tuned.model_dump(mode="json") if bench.tuned is not None else None,
        "runs": {group: [result.to_dict() for result in members] for group, members in groups.items()},
        "over_seeds": over_seeds(bench, [*groups["methods"], *groups["ablations"]]),
        "comparison": {
            "methods": reference_ratios(groups["methods"], bench.reference),
            "ablations": reference_ratios(groups["ablations"], bench.reference),
        },
        "memory_sweep": memory_sweep_table(groups["memory_sweep"], bench.reference),
        "failures": [{"key": r.key, "error": r.error} for r in results if not r.ok],
    }


# --- bench.md ------------------------------------------------------------------------------------


def _number(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _mib(value: float | None) -> str:
    return "–" if value is None else f"{value / MIB:.1f}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _time_to_target(result: RunResult) -> str:
    if result.target is not None:
        return f"{result.target.train_clock_s:.1f} (round {result.target.round})"
    return "not reached"


Column = tuple[str, Callable[[RunResult], str]]


def _edge_time_to_target(name: str) -> Callable[[RunResult], str]:
    def render(result: RunResult) -> str:
        figures = result.edge.get(name)
        if figures is None or figures.error is not None and figures.time_to_target_s is None:
            return "–"
        if figures.time_to_target_s is not None:
            return f"{figures.time_to_target_s:.1f}"
        return "not reached"

    return render


def main_columns(bench: BenchConfig) -> list[Column]:
    edge = [(f"on edge '{name}' (s)", _edge_time_to_target(name)) for name in bench.profiles]
    return [
        (f"time to FID ≤ {bench.target_fid:g} (s)", _time_to_target),
        *edge,
        ("FID at end" if bench.stop_at_target else "FID at budget", lambda r: _number(r.final_fid)),
        ("best FID", lambda r: _number(r.best_fid)),
        ("rounds", lambda r: str(r.rounds)),
        ("stopped by", lambda r: r.stopped_because or "–"),
        ("server peak RSS (MiB)", lambda r: _mib(r.server_peak_rss_bytes)),
        ("server RSS increase (MiB)", lambda r: _mib(r.server_rss_increase_bytes)),
        ("server sent (MiB)", lambda r: _mib(r.server_bytes_sent)),
        ("server received (MiB)", lambda r: _mib(r.server_bytes_received)),
        ("workers sent (MiB)", lambda r: _mib(r.workers_bytes_sent)),
        ("workers received (MiB)", lambda r: _mib(r.workers_bytes_received)),
        ("server comm wait", lambda r: _percent(r.server_comm_wait_share)),
    ]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _results_section(
    title: str, row_header: str, results: Sequence[RunResult], bench: BenchConfig, tasks: list[str]
) -> list[str]:
    if not results:
        return []
    columns = main_columns(bench)
    lines = [f"## {title}", ""]
    rows = []
    name = (lambda r: r.key) if bench.seeds else (lambda r: r.label)
    for result in results:
        if result.ok:
            rows.append([name(result), *(render(result) for _, render in columns)])
        else:
            rows.append([name(result), "**failed**", *("–" for _ in columns[1:])])
    lines += _table([row_header, *(header for header, _ in columns)], rows)
    lines += ["", "Per task, at the last evaluation:", ""]
    task_header = [row_header, *(f"FID {task}" for task in tasks), *(f"fidelity {task}" for task in tasks)]
    task_rows = [
        [
            name(r),
            *(_number(r.fid_by_task.get(task)) for task in tasks),
            *(_number(r.fidelity_by_task.get(task), 3) for task in tasks),
        ]
        for r in results
        if r.ok
    ]
    lines += _table(task_header, task_rows)
    ratios = reference_ratios(results, bench.reference) if not bench.seeds else []
    if ratios:
        ref = bench.reference
        lines += ["", f"Relative to `{ref}` (its figure divided by the row's; below 1: `{ref}` needs less):", ""]
        lines += _table(
            [row_header, f"time to target: {ref} ÷ row", f"server RSS increase: {ref} ÷ row"],
            [[row["label"], _number(row["time_to_target_ratio"], 2), _number(row["rss_increase_ratio"], 2)]
             for row in ratios],
        )
    shaped = [r for r in results if r.shaped_link is not None]
    if shaped:
        lines += ["", "Traffic through the shaped link (tbf counters at the end of each run):", ""]
        lines += _table(
            [row_header, "bytes", "packets", "dropped"],
            [[r.label, str(r.shaped_link["bytes"]), str(r.shaped_link["packets"]), str(r.shaped_link["dropped"])]
             for r in shaped if r.shaped_link],
        )
    return [*lines, ""]


def _spread_cell(row: dict[str, Any], scale: float = 1.0, digits: int = 1) -> str:
    summary = row["spread"]
    if summary is None:
        return "–"
    cell = f"{summary['median'] / scale:.{digits}f} [{summary['q1'] / scale:.{digits}f}–{summary['q3'] / scale:.{digits}f}]"
    return cell + (f" ({summary['censored']}×≥)" if summary["censored"] else "")


def _ratio_cell(row: dict[str, Any]) -> str:
    ratio = row["ratio_to_reference"]
    if ratio is None:
        return "–"
    p = "" if ratio["wilcoxon_p"] is None else f", p {ratio['wilcoxon_p']:.2f}"
    bound = " (bound)" if ratio["censored"] else ""
    return f"{ratio['geometric_mean']:.2f} [{ratio['ci_low']:.2f}–{ratio['ci_high']:.2f}{p}]{bound}"


def _over_seeds_section(bench: BenchConfig, table: dict[str, Any]) -> list[str]:
    if not table or not bench.seeds:
        return []
    ref = bench.reference
    clocks = ["time_to_target_s", *(f"edge/{name}/time_to_target_s" for name in bench.profiles)]
    clock_names = ["training clock", *(f"edge '{name}'" for name in bench.profiles)]
    lines = [
        "## Over seeds",
        "",
        f"Seeds {', '.join(map(str, bench.seeds))}. Median [interquartile range]; `(k×≥)`: k seeds never reached "
        f"FID ≤ {bench.target_fid:g}, counted at their budget (a lower bound). Ratios are row ÷ `{ref}`, the "
        "geometric mean over paired seeds [bootstrap 95% CI, Wilcoxon signed-rank p]; below 1 the row needs less.",
        "",
    ]
    header = ["row", "seeds"]
    for clock in clock_names:
        header += [f"time to target, {clock} (s)", f"÷ {ref}"]
    header += ["mean FID over budget", f"÷ {ref}", "FID at budget", "server HWM increase (MiB)", f"÷ {ref}",
               "worker peak increase (MiB)", "bytes sent, all ranks (MiB)", f"÷ {ref}",
               "bytes sent until the target (MiB)", f"÷ {ref}"]
    rows = []
    for label, entry in table.items():
        figures = entry["figures"]
        cells = [label, str(len(entry["seeds"]))]
        for clock in clocks:
            cells += [_spread_cell(figures[clock]), _ratio_cell(figures[clock])] if clock in figures else ["–", "–"]
        cells += [
            _spread_cell(figures["fid_area"]), _ratio_cell(figures["fid_area"]),
            _spread_cell(figures["final_fid"]),
            _spread_cell(figures["server_hwm_increase_bytes"], MIB), _ratio_cell(figures["server_hwm_increase_bytes"]),
            _spread_cell(figures["workers_peak_increase_bytes"], MIB),
            _spread_cell(figures["bytes_sent_total"], MIB, 0), _ratio_cell(figures["bytes_sent_total"]),
            _spread_cell(figures["bytes_to_target"], MIB, 0), _ratio_cell(figures["bytes_to_target"]),
        ]
        rows.append(cells)
    return [*lines, *_table(header, rows), ""]


def _tuned_lines(bench: BenchConfig) -> list[str]:
    if bench.tuned is None:
        return []
    lines = [f"- Tuned settings from `{bench.tuned.source}` (`entgan tune`):"]
    for method in bench.methods:
        overrides = bench.tuned.methods.get(method, {})
        described = ", ".join(f"`{path}: {value}`" for path, value in overrides.items()) or "the base as it is"
        lines.append(f"  - {method}: {described}")
    return lines


def _sweep_section(sweep: dict[str, Any]) -> list[str]:
    if not sweep["by_method"]:
        return []
    counts = [str(count) for count in sweep["workers"]]
    repeated = any(len(cell["runs"]) > 1 for cells in sweep["by_method"].values() for cell in cells.values())
    lines = ["## Server memory against the number of workers", "",
             "Server RSS increase over the idle runtime, MiB (peak RSS in brackets)"
             + (": the median of the repeats, and every repeat's increase in square brackets:" if repeated else ":"),
             ""]
    rows = []
    for method, cells in sweep["by_method"].items():
        row = [method]
        for count in counts:
            cell = cells.get(count)
            if cell is None:
                row.append("–")
            elif cell["status"] != "ok":
                row.append("**failed**")
            else:
                text = f"{_mib(cell['server_rss_increase_bytes'])} ({_mib(cell['server_peak_rss_bytes'])})"
                if repeated:
                    text += " [" + ", ".join(_mib(run["server_rss_increase_bytes"]) for run in cell["runs"]) + "]"
                row.append(text)
        rows.append(row)
    lines += _table(["method", *(f"K={count}" for count in counts)], rows)
    lines += _sweep_figure_table(
        sweep, counts, lambda cell: _mib(cell.get("server_hwm_increase_bytes")),
        "The kernel's high-water mark (VmHWM, reset after warm-up and after each evaluation) over the idle runtime, "
        "MiB: it cannot miss a peak shorter than the sampling interval:",
    )
    lines += _sweep_figure_table(
        sweep, counts, lambda cell: _mib(cell.get("workers_peak_increase_bytes")),
        "The largest worker's high-water mark over its runtime with its shard loaded, MiB:",
    )
    lines += _sweep_figure_table(
        sweep, counts, lambda cell: _live_cell(cell.get("server_live_tensors")),
        "What the server's tensors are (counted from them, `engine.live_tensors`), MiB: parameters + gradients + "
        "optimizer state + other held tensors (receive buffers, sums), then the peak of the activations autograd "
        "held for backward:",
    )
    if sweep["reference_ratios"]:
        ref = sweep["reference"]
        lines += ["", f"`{ref}`'s increase divided by the method's at the same K (below 1: `{ref}` needs less):", ""]
        lines += _table(
            ["method", *(f"K={count}" for count in counts)],
            [[method, *(_number(ratios.get(count), 2) for count in counts)]
             for method, ratios in sweep["reference_ratios"].items()],
        )
    return [*lines, ""]


def _sweep_figure_table(
    sweep: dict[str, Any], counts: list[str], render: Callable[[dict[str, Any]], str], caption: str
) -> list[str]:
    """One figure of the sweep's cells as a method x K table under `caption` (nothing if no cell has it)."""
    rows = [
        [method, *(render(cells[count]) if count in cells else "–" for count in counts)]
        for method, cells in sweep["by_method"].items()
    ]
    if all(cell == "–" for row in rows for cell in row[1:]):
        return []
    return ["", caption, "", *_table(["method", *(f"K={count}" for count in counts)], rows)]


def _live_cell(table: dict[str, int] | None) -> str:
    if not table:
        return "–"
    parts = [table.get(kind, 0) / MIB for kind in ("parameters", "gradients", "optimizer_state", "other_tensors")]
    return " + ".join(f"{part:.2f}" for part in parts) + f"; act. {table.get('peak_saved_activations', 0) / MIB:.2f}"


def _workload_lines(bench: BenchConfig) -> list[str]:
    base = bench.base
    tasks = "; ".join(
        f"{t.name}: labels {t.labels}, {t.workers} worker(s), {t.partition}"
        + (f" (alpha {t.dirichlet_alpha:g})" if t.partition == "dirichlet" else "")
        for t in base.tasks
    )
    stop = "stops at the target" if bench.stop_at_target else "runs the whole budget"
    streak = (
        f" that stays there for {bench.target_confirmations} evaluations in a row"
        if bench.target_confirmations > 1
        else ""
    )
    return [
        f"- Workload: {base.data.source}, {tasks}; model {base.model.family} (hidden {base.model.hidden_dim}, "
        f"latent {base.model.latent_dim}); batch {base.optimizer.batch_size}; seed {base.seed}.",
        f"- Target: `{OVERALL_FID}` ≤ {bench.target_fid:g}. Time budget: {bench.time_budget_s:g} s of training "
        f"clock per run (evaluation time excluded), evaluation every {bench.evaluation_interval_s:g} s; "
        f"each run {stop}.",
        f"- Time to target is the training clock at the first evaluation at or below the target{streak}. "
        "FID at budget is the last evaluation of the run. Server memory: peak RSS of the server process, and its "
        "increase over the idle runtime measured before set-up. Comm wait: the server's time blocked on "
        "transfers, as a share of its training clock after round 1 (set-up transfers excluded).",
        *_profile_lines(bench),
    ]


def _profile_lines(bench: BenchConfig) -> list[str]:
    if not bench.profiles:
        return []
    lines = [
        "- Edge clock (`entgan.bench.edge_clock`): each run's recorded compute and transfers replayed on a device "
        "profile (compute = recorded thread CPU time ÷ speed; links shared max-min fairly); time to target on it is "
        "the edge clock at the end of the round of the same evaluation. Profiles:"
    ]
    for name, profile in bench.profiles.items():
        lines.append(f"  - `{name}`: {describe_profile(profile)}")
    return lines


def describe_profile(profile: EdgeProfile) -> str:
    """A profile in words (for reports)."""

    def device(entry: DeviceProfile) -> str:
        up, down = entry.uplink_mbit, entry.downlink
        link = "unlimited" if up is None and down is None else f"{_rate(up)}/{_rate(down)} Mbit/s"
        latency = f" +{entry.latency_ms:g} ms" if entry.latency_ms else ""
        return f"speed {entry.speed:g}, {link}{latency}"

    workers = "; ".join(device(entry) for entry in profile.workers)
    cycled = " (cycled over the workers)" if len(profile.workers) > 1 else ""
    shared = f"; every transfer through one {profile.shared_link_mbit:g} Mbit/s link" if profile.shared_link_mbit else ""
    return f"server {device(profile.server)}; workers {workers}{cycled}{shared}"


def _rate(value: float | None) -> str:
    return "∞" if value is None else f"{value:g}"


def render_markdown(
    bench: BenchConfig, results: Sequence[RunResult], context: BenchContext, data: dict[str, Any] | None = None
) -> str:
    """bench.md; `data`: the `report_data` of the same results, where the caller already has it."""
    if data is None:
        data = report_data(bench, results, context)
    machine = context.machine
    tasks = [task.name for task in bench.base.tasks]
    lines = [f"# Bench `{bench.name}`", ""]
    if context.quick:
        lines += ["**Quick smoke run (--quick): budgets cut short, figures not meaningful.**", ""]
    lines += [
        f"- Command: `{context.command}` (started {context.started}).",
        f"- Machine: {machine['cpu']}, {machine['usable_cpus']} usable of {machine['logical_cpus']} logical CPUs, "
        f"{machine['memory_gib']} GiB; {machine['platform']}; Python {machine['python']}, torch {machine['torch']}. "
        f"Load average at start {machine['load_average_at_start']}, at this writing {_load_average()}.",
        f"- Network: {context.network.describe()}.",
        *_workload_lines(bench),
        *_tuned_lines(bench),
        "",
    ]
    lines += _over_seeds_section(bench, data["over_seeds"])
    lines += _results_section("Methods", "method", [r for r in results if r.group == "methods"], bench, tasks)
    lines += _results_section("Ablations", "variant", [r for r in results if r.group == "ablations"], bench, tasks)
    lines += _sweep_section(data["memory_sweep"])
    plots = [path for path in (FID_PLOT, ABLATION_FID_PLOT, MEMORY_PLOT) if path in context_plots(bench, results)]
    if plots:
        lines += ["## Plots", "", *(f"![{Path(path).stem}]({path})" for path in plots), ""]
    failures = data["failures"]
    if failures:
        lines += ["## Failed runs", ""]
        lines += [f"- `{failure['key']}`: {_one_line(failure['error'])}" for failure in failures]
        lines += [""]
    return "\n".join(lines)


def _one_line(text: str | None, limit: int = 400) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else "…" + flat[-limit:]


# --- plots ---------------------------------------------------------------------------------------


def context_plots(bench: BenchConfig, results: Sequence[RunResult]) -> list[str]:
    """Which plots this set of results has something to show in."""
    plots = []
    if any(r.ok and r.curve for r in results if r.group == "methods"):
        plots.append(FID_PLOT)
    if any(r.ok and r.curve for r in results if r.group == "ablations"):
        plots.append(ABLATION_FID_PLOT)
    if any(r.ok for r in results if r.group == "memory_sweep"):
        plots.append(MEMORY_PLOT)
    return plots


def plot_fid_against_time(results: Sequence[RunResult], bench: BenchConfig, path: Path, title: str) -> Path:
    figure, axis = pyplot().subplots(figsize=(8, 5))
    for result in results:
        if result.ok and result.curve:
            clocks, fids = zip(*result.curve)
            axis.plot(clocks, fids, marker="o", markersize=3, label=result.key)
    axis.axhline(bench.target_fid, color="black", linestyle="--", linewidth=1, label=f"target {bench.target_fid:g}")
    axis.axvline(bench.time_budget_s, color="grey", linestyle=":", linewidth=1, label="time budget")
    axis.set_xlabel("training wall-clock (s)")
    axis.set_ylabel("FID overall (domain-classifier features)")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, ncol=2)
    axis.set_title(title)
    return save_figure(figure, path)


def plot_memory_against_workers(sweep: dict[str, Any], path: Path, title: str) -> Path:
    """The sweep table's medians (`memory_sweep_table`) against the worker count, per method."""
    figure, (increase_axis, peak_axis) = pyplot().subplots(1, 2, figsize=(11, 4))
    for method, cells in sweep["by_method"].items():
        points = sorted((int(count), cell) for count, cell in cells.items() if cell["status"] == "ok")
        if not points:
            continue
        counts = [count for count, _ in points]
        for axis, figure_key in ((increase_axis, "server_rss_increase_bytes"), (peak_axis, "server_peak_rss_bytes")):
            axis.plot(counts, [cell[figure_key] / MIB for _, cell in points], marker="o", label=method)
    counts = sweep["workers"]
    for axis, label in ((increase_axis, "server RSS increase over idle (MiB)"), (peak_axis, "server peak RSS (MiB)")):
        axis.set_xticks(counts)
        axis.set_ylim(bottom=0)
        axis.set_xlabel("number of workers K")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title)
    return save_figure(figure, path)


# --- writing -------------------------------------------------------------------------------------


def write_report(out_dir: Path, bench: BenchConfig, results: Sequence[RunResult], context: BenchContext) -> Path:
    """Write bench.json, the plots and bench.md into `out_dir`; return the Markdown file's path."""
    data = report_data(bench, results, context)  # once: bench.json and bench.md carry the same figures and time
    plots = context_plots(bench, results)
    if FID_PLOT in plots:
        plot_fid_against_time([r for r in results if r.group == "methods"], bench, out_dir / FID_PLOT,
                              f"{bench.name}: FID against training wall-clock")
    if ABLATION_FID_PLOT in plots:
        plot_fid_against_time([r for r in results if r.group == "ablations"], bench, out_dir / ABLATION_FID_PLOT,
                              f"{bench.name}: ablations")
    if MEMORY_PLOT in plots:
        plot_memory_against_workers(data["memory_sweep"], out_dir / MEMORY_PLOT,
                                    f"{bench.name}: server memory against workers")
    atomic_write(out_dir / REPORT_JSON, lambda handle: handle.write(json.dumps(data, indent=2).encode()))
    markdown = render_markdown(bench, results, context, data)
    atomic_write(out_dir / REPORT_MARKDOWN, lambda handle: handle.write(markdown.encode()))
    return out_dir / REPORT_MARKDOWN
