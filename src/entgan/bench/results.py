"""Figures of one finished run, read back from its run directory.

Everything comes from what the engine wrote: `metrics.jsonl` (one row per round; FID and task
fidelity on evaluation rounds; cumulative server traffic, wait and memory), `summary.json` (final
memory and traffic) and `workers/rank-K.json` (each worker's cumulative traffic). The bench never
measures anything itself, so its figures are the ones a single `entgan run` reports; the edge
clock's figures are computed from the run's own timelines (`timeline/`, `entgan.bench.edge_clock`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from entgan.bench.config import OVERALL_FID
from entgan.bench.edge_clock import EdgeClock, load_programs, replay
from entgan.bench.plan import PlannedRun, RunGroup
from entgan.bench.profiles import EdgeProfile
from entgan.rundir import SUMMARY_FILE, RunDirectory

RunStatus = Literal["ok", "failed"]


@dataclass(frozen=True)
class TargetHit:
    """The first evaluation at or below the target FID."""

    train_clock_s: float
    round: int
    fid: float


def time_to_target(
    rows: Iterable[Mapping[str, Any]], target_fid: float, confirmations: int = 1, key: str = OVERALL_FID
) -> TargetHit | None:
    """Training clock at the first evaluation whose `key` is at or below `target_fid` and stays
    there for `confirmations` evaluations in a row (itself included), or None.

    Only evaluated points count: the clock between two evaluations is not interpolated, so the
    figure is an upper bound whose resolution is the evaluation interval (the same for all runs).
    A missing or non-finite FID counts as not reached.
    """
    if confirmations < 1:
        raise ValueError(f"confirmations must be at least 1, found {confirmations}")
    evaluations = [row for row in rows if key in row]
    streak_start: Mapping[str, Any] | None = None
    streak = 0
    for row in evaluations:
        value = row[key]
        if value is not None and math.isfinite(value) and value <= target_fid:
            streak_start = row if streak == 0 else streak_start
            streak += 1
            if streak == confirmations and streak_start is not None:
                return TargetHit(
                    train_clock_s=float(streak_start["train_clock_s"]),
                    round=int(streak_start["round"]),
                    fid=float(streak_start[key]),
                )
        else:
            streak = 0
    return None


def training_comm_wait_share(rows: list[Mapping[str, Any]]) -> float | None:
    """The server's time blocked on transfers as a share of its training clock, from the end of
    round 1 to the last round: the cumulative counter in round 1 also holds the set-up exchange
    (handshake, first models sent), which happens before the training clock starts."""
    if len(rows) < 2:
        return None
    first, last = rows[0], rows[-1]
    elapsed = float(last["train_clock_s"]) - float(first["train_clock_s"])
    if elapsed <= 0 or "server/comm_wait_s" not in first or "server/comm_wait_s" not in last:
        return None
    return (float(last["server/comm_wait_s"]) - float(first["server/comm_wait_s"])) / elapsed


def fid_area(curve: Sequence[tuple[float, float]], until_s: float) -> float | None:
    """Mean FID over the training clock from the first evaluation to `until_s` (the budget): the
    area under the FID-against-time curve, each evaluation's FID held until the next, divided by
    the span. Unlike time to target it rewards every part of the curve and is never censored; a
    run that stopped early keeps its last FID to the end. None without an evaluation before
    `until_s`."""
    points = [(clock, fid) for clock, fid in curve if clock < until_s and math.isfinite(fid)]
    if not points:
        return None
    area = 0.0
    for (clock, fid), (next_clock, _) in zip(points, [*points[1:], (until_s, 0.0)]):
        area += fid * (next_clock - clock)
    span = until_s - points[0][0]
    return area / span if span > 0 else points[0][1]


def fid_curve(rows: Iterable[Mapping[str, Any]], key: str = OVERALL_FID) -> list[tuple[float, float]]:
    """(training clock, FID) at every evaluation, in order."""
    return [(float(row["train_clock_s"]), float(row[key])) for row in rows if key in row]


@dataclass(frozen=True)
class EdgeFigures:
    """A run's speed on one profile's edge clock (`entgan.bench.edge_clock`)."""

    clock_s: float | None = None
    """Edge clock at the end of the run's last replayed round."""
    time_to_target_s: float | None = None
    """Edge clock at the evaluation where the target counted as reached (the same evaluation as
    on the training clock: its round's end on the edge)."""
    rounds: int = 0
    """Rounds replayed (fewer than the run's when its timelines were cut short)."""
    curve: list[tuple[float, float]] = field(default_factory=list)
    """(edge clock, FID) at every evaluation of a replayed round."""
    error: str | None = None
    """Why the run has no edge clock (no timelines, a replay that failed)."""


def edge_figures(
    clock: EdgeClock, evaluations: Sequence[Mapping[str, Any]], target: TargetHit | None, key: str = OVERALL_FID
) -> EdgeFigures:
    """The run's target and FID curve read on `clock` instead of the training clock."""
    ends = {entry.round: entry.end_s for entry in clock.rounds}
    curve = [(ends[int(row["round"])], float(row[key])) for row in evaluations if int(row["round"]) in ends]
    return EdgeFigures(
        clock_s=clock.total_s if clock.rounds else None,
        time_to_target_s=ends.get(target.round) if target is not None else None,
        rounds=len(clock.rounds),
        curve=curve,
        error=None if clock.complete else "timelines cut short: the replay stopped before the run's end",
    )


def read_edge_figures(
    run_dir: Path, profiles: Mapping[str, EdgeProfile], evaluations: Sequence[Mapping[str, Any]], target: TargetHit | None
) -> dict[str, EdgeFigures]:
    """Each profile's `EdgeFigures` for a finished run (an error per profile where there are none)."""
    try:
        programs = load_programs(run_dir)
    except (OSError, ValueError) as error:
        return {name: EdgeFigures(error=str(error)) for name in profiles}
    figures = {}
    for name, profile in profiles.items():
        try:
            figures[name] = edge_figures(replay(programs, profile), evaluations, target)
        except (KeyError, ValueError) as error:  # timelines that do not fit together
            figures[name] = EdgeFigures(error=f"replay failed: {error!r}")
    return figures


@dataclass
class RunResult:
    """One row of the bench: a run's speed, quality and cost, or why it has none."""

    key: str
    group: RunGroup
    label: str
    algorithm: str
    workers: int
    status: RunStatus
    seed: int = 0
    error: str | None = None
    process_wall_s: float | None = None
    """Wall-clock of the whole run process: start-up, classifier loading, evaluations included."""
    rounds: int | None = None
    train_clock_s: float | None = None
    """Training clock at the end (evaluation and checkpoint time excluded, as in the engine)."""
    stopped_because: str | None = None
    target: TargetHit | None = None
    final_fid: float | None = None
    """`fid/overall` at the run's last evaluation (for a timed run: where the budget ran out)."""
    final_eval_clock_s: float | None = None
    best_fid: float | None = None
    fid_area: float | None = None
    """Mean FID over the time budget (area under the FID-against-time curve, `fid_area`)."""
    fid_by_task: dict[str, float] = field(default_factory=dict)
    fidelity_by_task: dict[str, float] = field(default_factory=dict)
    server_peak_rss_bytes: int | None = None
    server_baseline_rss_bytes: int | None = None
    server_rss_increase_bytes: int | None = None
    server_hwm_increase_bytes: int | None = None
    """The server's kernel high-water mark over the idle runtime (never misses a short peak)."""
    workers_peak_increase_bytes: int | None = None
    """The largest worker high-water mark over that worker's runtime with its shard loaded."""
    server_live_tensors: dict[str, int] | None = None
    """What the server's tensors are, per kind (`metrics.live_tensors`; runs with `engine.live_tensors`)."""
    server_bytes_sent: float | None = None
    server_bytes_received: float | None = None
    workers_bytes_sent: float | None = None
    workers_bytes_received: float | None = None
    bytes_to_target: float | None = None
    """Bytes every rank sent until the round the target was reached (None: not reached)."""
    server_comm_wait_s: float | None = None
    """Server's time blocked on transfers over the whole run, set-up included."""
    server_comm_wait_share: float | None = None
    """Server's time blocked on transfers as a share of its training clock (rounds 2..N)."""
    shaped_link: dict[str, int] | None = None
    """Traffic through the rate-limited loopback (constrained-network runs only)."""
    curve: list[tuple[float, float]] = field(default_factory=list)
    edge: dict[str, EdgeFigures] = field(default_factory=dict)
    """The run on each of the bench's edge-clock profiles, by name (none without profiles)."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["curve"] = [list(point) for point in self.curve]
        for figures in data["edge"].values():
            figures["curve"] = [list(point) for point in figures["curve"]]
        return data


def failed_result(run: PlannedRun, error: str, process_wall_s: float | None = None) -> RunResult:
    return RunResult(
        key=run.key,
        group=run.group,
        label=run.label,
        algorithm=run.algorithm,
        workers=run.workers,
        status="failed",
        seed=run.seed,
        error=error,
        process_wall_s=process_wall_s,
    )


def read_run(
    run: PlannedRun,
    run_dir: Path,
    target_fid: float,
    confirmations: int = 1,
    process_wall_s: float | None = None,
    profiles: Mapping[str, EdgeProfile] | None = None,
) -> RunResult:
    """The figures of a finished run; a run without a summary is reported as failed. With
    `profiles`, also its figures on each profile's edge clock (from its timelines)."""
    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.is_file():
        return failed_result(run, f"no {SUMMARY_FILE} in {run_dir}: the run did not finish", process_wall_s)
    summary = json.loads(summary_path.read_text())
    rows = RunDirectory(run_dir).metrics()
    if not rows:
        return failed_result(run, f"{run_dir}: no metrics rows", process_wall_s)
    evaluations = [row for row in rows if OVERALL_FID in row]
    final = evaluations[-1] if evaluations else {}
    workers_sent, workers_received = _worker_traffic(run_dir, rows)
    train_clock = float(summary.get("train_clock_s", rows[-1]["train_clock_s"]))
    curve = fid_curve(evaluations)
    target = time_to_target(evaluations, target_fid, confirmations)
    edge = read_edge_figures(run_dir, profiles, evaluations, target) if profiles and run.group != "memory_sweep" else {}
    return RunResult(
        key=run.key,
        group=run.group,
        label=run.label,
        algorithm=run.algorithm,
        workers=run.workers,
        status="ok",
        seed=run.seed,
        process_wall_s=process_wall_s,
        rounds=int(rows[-1]["round"]),
        train_clock_s=train_clock,
        stopped_because=summary.get("stopped_because"),
        target=target,
        final_fid=final.get(OVERALL_FID),
        final_eval_clock_s=final.get("train_clock_s"),
        best_fid=min((fid for _, fid in curve), default=None),
        fid_area=fid_area(curve, run.config.stop.time_budget_s or train_clock),
        fid_by_task={k.removeprefix("fid/"): v for k, v in final.items() if k.startswith("fid/") and k != OVERALL_FID},
        fidelity_by_task={k.removeprefix("fidelity/"): v for k, v in final.items() if k.startswith("fidelity/")},
        server_peak_rss_bytes=summary.get("server_peak_rss_bytes"),
        server_baseline_rss_bytes=summary.get("server_baseline_rss_bytes"),
        server_rss_increase_bytes=summary.get("server_rss_increase_bytes"),
        server_hwm_increase_bytes=summary.get("server_hwm_increase_bytes"),
        workers_peak_increase_bytes=_workers_peak(run_dir),
        server_live_tensors=summary.get("server_live_tensors"),
        server_bytes_sent=summary.get("server/bytes_sent"),
        server_bytes_received=summary.get("server/bytes_received"),
        workers_bytes_sent=workers_sent,
        workers_bytes_received=workers_received,
        bytes_to_target=bytes_sent_until(rows, target.round) if target is not None else None,
        server_comm_wait_s=summary.get("server/comm_wait_s", rows[-1].get("server/comm_wait_s")),
        server_comm_wait_share=training_comm_wait_share(rows),
        curve=curve,
        edge=edge,
    )


def bytes_sent_until(rows: Sequence[Mapping[str, Any]], round_number: int) -> float | None:
    """Bytes every rank sent up to round `round_number`'s row: the server's running count (set-up
    included) plus the workers' per-round reports. A worker's report rides on its upload and books
    its traffic since its previous upload, so each worker's last upload before the row is left out,
    as it is for every method (about one round's uploads)."""
    upto = [row for row in rows if int(row["round"]) <= round_number]
    if not upto or "server/bytes_sent" not in upto[-1]:
        return None
    return float(upto[-1]["server/bytes_sent"]) + float(sum(row.get("workers/bytes_sent", 0.0) for row in upto))


def _workers_peak(run_dir: Path) -> int | None:
    """The largest `memory_increase_bytes` among the workers' digests (None where none has one)."""
    peaks = [
        json.loads(path.read_text()).get("memory_increase_bytes")
        for path in sorted(RunDirectory(run_dir).workers.glob("rank-*.json"))
    ]
    known = [int(peak) for peak in peaks if peak is not None]
    return max(known) if known else None


def _worker_traffic(run_dir: Path, rows: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """All workers' bytes sent and received over the whole run (set-up included).

    From the workers' end-of-run digests; if those are missing, the per-round reports summed
    (which leave out the set-up exchange)."""
    digests = [json.loads(path.read_text()) for path in sorted(RunDirectory(run_dir).workers.glob("rank-*.json"))]
    if digests:
        return (
            float(sum(digest.get("bytes_sent", 0.0) for digest in digests)),
            float(sum(digest.get("bytes_received", 0.0) for digest in digests)),
        )
    if any("workers/bytes_sent" in row for row in rows):
        return (
            float(sum(row.get("workers/bytes_sent", 0.0) for row in rows)),
            float(sum(row.get("workers/bytes_received", 0.0) for row in rows)),
        )
    return None, None
