"""Golden runs: every method's 30-round bench-workload run gives the recorded metrics rows.

The golden files were recorded before the round-loop redesign (`tests/golden/record.py`); a
refactor that changes what a method computes, sends or measures shows up here as the first round
and field that moved. Time and memory fields are not compared (they measure the machine)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from entgan.bench.report import cpu_info_field

GOLDEN_DIR = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN_DIR))
import record  # noqa: E402  (the recorder lives beside its golden files)

RELATIVE_TOLERANCE = 1e-5
"""Float rounding only: the runs are bit-for-bit reproducible on one machine, but a different
BLAS or CPU may round sums differently."""

GOLDEN_CPU_VENDOR = "GenuineIntel"
"""The CPU vendor of the machines the golden files were recorded and pass on (this project's CI
class, an Intel Xeon). On another vendor's CPU, MKL and ATen take other kernels whose sums round
differently, and training amplifies the last bits within a round or two (on an AMD EPYC, round 1's
FID came out about 1% off for every method), so there only what rounding cannot move is compared:
the rows, their fields and every rank's traffic."""


def traffic_only(rows: list[dict]) -> list[dict]:
    """Each row's round and byte counts, with every other field kept as a name (its value set aside)."""
    return [{key: (value if key == "round" or record.TRAFFIC_FIELDS.search(key) else 0.0) for key, value in row.items()} for row in rows]


def first_difference(expected: list[dict], found: list[dict]) -> str | None:
    if len(expected) != len(found):
        return f"{len(found)} rows, golden has {len(expected)}"
    for golden_row, row in zip(expected, found, strict=True):
        for key in sorted(golden_row.keys() | row.keys()):
            if key not in row or key not in golden_row:
                return f"round {golden_row['round']}: field {key!r} only in {'golden' if key in golden_row else 'the run'}"
            a, b = golden_row[key], row[key]
            both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
            if not both_nan and not math.isclose(a, b, rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-9):
                return f"round {golden_row['round']}: {key} = {b!r}, golden {a!r}"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("method", record.METHODS)
def test_golden_run_matches(method: str, tmp_path: Path, cache_dir: Path) -> None:
    expected = [json.loads(line) for line in record.golden_path(method).read_text().splitlines()]
    # The session's classifier cache: the first golden run trains the workload's classifier (one
    # thread, as recorded) and the other nine load it.
    found = record.run_golden(method, tmp_path, cache_dir=cache_dir)
    if cpu_info_field("vendor_id") != GOLDEN_CPU_VENDOR:
        expected, found = traffic_only(expected), traffic_only(found)
    assert first_difference(expected, found) is None, first_difference(expected, found)


def test_traffic_only_keeps_bytes_and_names() -> None:
    rows = [{"round": 1, "g_loss": 0.5, "server/bytes_sent": 10.0}]
    moved = [{"round": 1, "g_loss": 0.6, "server/bytes_sent": 10.0}]
    assert first_difference(traffic_only(rows), traffic_only(moved)) is None
    assert first_difference(traffic_only(rows), traffic_only([{"round": 1, "g_loss": 0.5, "server/bytes_sent": 11.0}]))
    assert "only in" in (first_difference(traffic_only(rows), traffic_only([{"round": 1, "server/bytes_sent": 10.0}])) or "")


def test_golden_comparison_sees_a_moved_loss() -> None:
    rows = [{"round": 1, "g_loss": 0.5, "fid/overall": float("nan")}]
    moved = [{"round": 1, "g_loss": 0.5001, "fid/overall": float("nan")}]
    assert first_difference(rows, rows) is None
    assert "g_loss" in (first_difference(rows, moved) or "")
    assert "only in" in (first_difference(rows, [{"round": 1, "g_loss": 0.5}]) or "")
