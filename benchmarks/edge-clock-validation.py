#!/usr/bin/env python3
"""Does the edge clock tell the time? Two checks against the training (wall) clock, on a quiet machine.

(a) `edge-clock-1worker.yaml`: a server and one worker on loopback, each with a core of its own,
    replayed with unlimited links and speed 1;
(b) `edge-clock-20mbit.yaml`: the headline workload behind a real tc-shaped 20 Mbit/s link shared
    by every rank, replayed on the matching shared-link profile.

In both the replay models the machine the run had, so its time per round should be the measured
one: the table gives both and their ratio (the issue's bar: within 15%).

    python benchmarks/edge-clock-validation.py OUT        # runs both benches (~6 min), then the table
    python benchmarks/edge-clock-validation.py OUT --table  # the table of benches already run
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = {"edge-clock-1worker": "unlimited", "edge-clock-20mbit": "tc-20mbit"}


def run_benches(out: Path) -> None:
    for name in CASES:
        command = [sys.executable, "-m", "entgan.cli", "bench", str(HERE / f"{name}.yaml"), "--out", str(out / name), "--overwrite"]
        subprocess.run(command, check=True)


def table(out: Path) -> list[str]:
    lines = [
        "| case | method | rounds | training clock per round (ms) | edge clock per round (ms) | edge ÷ training |",
        "|---|---|---|---|---|---|",
    ]
    for name, profile in CASES.items():
        report = json.loads((out / name / "bench.json").read_text())
        for run in report["runs"]["methods"]:
            edge = run["edge"].get(profile, {})
            if run["status"] != "ok" or edge.get("clock_s") is None:
                lines.append(f"| {name} | {run['label']} | – | – | – | failed: {run.get('error') or edge.get('error')} |")
                continue
            rounds = edge["rounds"]
            training = run["train_clock_s"] / run["rounds"]
            replayed = edge["clock_s"] / rounds
            lines.append(
                f"| {name} | {run['label']} | {rounds} | {1000 * training:.1f} | {1000 * replayed:.1f} | {replayed / training:.2f} |"
            )
    return lines


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    if "--table" not in sys.argv[2:]:
        run_benches(out)
    print("\n".join(table(out)))


if __name__ == "__main__":
    main()
