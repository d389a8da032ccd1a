#!/usr/bin/env python3
"""Issue 16's goals, read off an edge bench's bench.json (and, optionally, its straggler-aware twin).

    python benchmarks/edge-goals.py runs/bench/edge-mnist-2tasks-8workers [runs/bench/edge-every-lever]

For each edge profile: every row's median time to the target, EntGAN's ratio to the best
distributed baseline (the paired geometric mean and its bootstrap 95% interval, as the bench
computes them, inverted to EntGAN ÷ baseline); bytes until the target against FL-GAN; the
slow-device figure (time on `edge-uneven` over time on `edge-uneven-equal-speed`, per seed);
per-task FID at the end of the budget; and overall FID at one edge-clock time for every row. Figures come from bench.json only: nothing is re-measured.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from entgan.bench.statistics import Observation, paired_ratio

BASELINES = ("flgan", "mdgan", "dgan-3")
MIB = 2**20


def _figure(report: dict, label: str, name: str) -> dict | None:
    return report["over_seeds"].get(label, {}).get("figures", {}).get(name)


def _median(figure: dict | None, scale: float = 1.0) -> str:
    if not figure or not figure["spread"]:
        return "–"
    spread = figure["spread"]
    censored = f" ({spread['censored']}×≥)" if spread.get("censored") else ""
    return f"{spread['median'] / scale:.0f}{censored}"


def _inverse_ratio(figure: dict | None) -> str:
    """EntGAN ÷ row, from the bench's row ÷ EntGAN paired ratio."""
    ratio = figure and figure.get("ratio_to_reference")
    if not ratio:
        return "–"
    low, high = ratio["ci_low"], ratio["ci_high"]
    bound = " (bound)" if ratio.get("censored") else ""
    return f"{1 / ratio['geometric_mean']:.2f} [{1 / high:.2f}–{1 / low:.2f}]{bound}"


def _against_entgan(report: dict, title: str, name: str, scale: float = 1.0) -> list[str]:
    """Every row's median of figure `name` and EntGAN's ratio to it."""
    lines = [f"### {title}", "", "| row | median | EntGAN ÷ row [95% CI] |", "|---|---|---|"]
    for label in report["over_seeds"]:
        figure = _figure(report, label, name)
        lines.append(f"| {label} | {_median(figure, scale)} | {_inverse_ratio(figure) if label != 'entgan' else '–'} |")
    return [*lines, ""]


def goals(report: dict) -> list[str]:
    labels = list(report["over_seeds"])
    every_run = report["runs"]["methods"] + report["runs"].get("ablations", [])
    profiles = sorted({profile for run in every_run for profile in run.get("edge", {})})
    lines = []
    for profile in profiles:
        lines += _against_entgan(
            report, f"{profile}: time to the target on the edge clock (s)", f"edge/{profile}/time_to_target_s"
        )
    lines += _against_entgan(report, "bytes every rank sent until the target (MiB)", "bytes_to_target", MIB)
    lines.append("### slow devices: time on edge-uneven ÷ time on edge-uneven-equal-speed, per seed")
    lines.append("")
    lines.append("| row | median | per seed |")
    lines.append("|---|---|---|")
    for label in labels:
        slow = _figure(report, label, "edge/edge-uneven/time_to_target_s")
        even = _figure(report, label, "edge/edge-uneven-equal-speed/time_to_target_s")
        if not slow or not even:
            continue
        ratios = [
            slow["per_seed"][seed]["value"] / even["per_seed"][seed]["value"]
            for seed in slow["per_seed"]
            if seed in even["per_seed"] and not slow["per_seed"][seed]["censored"] and not even["per_seed"][seed]["censored"]
        ]
        if ratios:
            lines.append(f"| {label} | {statistics.median(ratios):.2f} | {', '.join(f'{r:.2f}' for r in ratios)} |")
    lines.append("")
    lines.append("### per-task FID at the end of the budget (median over seeds)")
    lines.append("")
    runs = [run for run in report["runs"]["methods"] + report["runs"].get("ablations", []) if run["status"] == "ok"]
    tasks = sorted({task for run in runs for task in run["fid_by_task"]})
    lines.append("| row | " + " | ".join(tasks) + " | overall |")
    lines.append("|---|" + "---|" * (len(tasks) + 1))
    for label in labels:
        mine = [run for run in runs if run["label"] == label]
        cells = [f"{statistics.median(run['fid_by_task'][task] for run in mine):.1f}" for task in tasks]
        cells.append(f"{statistics.median(run['final_fid'] for run in mine):.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for profile in profiles:
        lines += _fid_at_common_edge_time(runs, labels, profile)
    return lines


def _fid_at_common_edge_time(runs: list[dict], labels: list[str], profile: str) -> list[str]:
    """Overall FID where every run has got to on `profile`'s edge clock: at the edge time of the
    earliest run end there, the last evaluation of each run at or before it (median over seeds).
    The budget is training-clock time, which buys different edge time per row; this reads quality
    at the end of one edge budget for all."""
    ends = [run["edge"][profile]["clock_s"] for run in runs if run.get("edge", {}).get(profile, {}).get("clock_s")]
    if not ends:
        return []
    horizon = min(ends)
    lines = [f"### {profile}: overall FID at {horizon:.0f} s of edge clock (the earliest run end there; median over seeds)", ""]
    lines += ["| row | FID | seeds |", "|---|---|---|"]
    for label in labels:
        values = []
        for run in runs:
            curve = run.get("edge", {}).get(profile, {}).get("curve") or []
            before = [fid for time, fid in curve if time <= horizon]
            if run["label"] == label and before:
                values.append(before[-1])
        if values:
            lines.append(f"| {label} | {statistics.median(values):.1f} | {len(values)} |")
    return [*lines, ""]


def _observations(figure: dict) -> dict[int, Observation]:
    return {int(seed): Observation(entry["value"], entry["censored"]) for seed, entry in figure["per_seed"].items()}


def twin_comparison(main: dict, twin: dict) -> list[str]:
    """Each row of the twin bench against the same row of the main one, seed by seed (twin ÷ main)."""
    names = [name for name in next(iter(twin["over_seeds"].values()))["figures"] if name.endswith("time_to_target_s")]
    names.append("bytes_to_target")
    lines = ["### the twin bench's rows ÷ the same rows of the main bench (paired by seed) [95% CI]", ""]
    lines.append("| row | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for label, entry in twin["over_seeds"].items():
        cells = []
        for name in names:
            mine, theirs = _figure(twin, label, name), _figure(main, label, name)
            ratio = paired_ratio(_observations(mine), _observations(theirs)) if mine and theirs else None
            cells.append(
                "–" if ratio is None
                else f"{ratio.geometric_mean:.2f} [{ratio.ci_low:.2f}–{ratio.ci_high:.2f}]" + (" (bound)" if ratio.censored else "")
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    reports = [json.loads((Path(folder) / "bench.json").read_text()) for folder in sys.argv[1:]]
    for folder, report in zip(sys.argv[1:], reports):
        print(f"## {folder}\n")
        print("\n".join(goals(report)))
    if len(reports) == 2:
        print("\n".join(twin_comparison(*reports)))


if __name__ == "__main__":
    main()
