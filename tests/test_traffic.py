"""Every byte a worker moves lands in exactly one place: its setup, one round report, or the
remainder after its last upload (the engine's one traffic meter, for every method).

The check runs on the uninterrupted run of every method's resume test
(`test_resume_every_method.py`), so the ten multi-process runs serve both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import worker_digests


def assert_reports_add_up(run_dir: Path, method: str) -> None:
    """Each worker's per-round reports, plus its setup traffic and what it moved after its last
    upload, equal its end-of-run totals, both ways."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    digests = worker_digests(run_dir)
    assert digests, "no worker wrote its digest"
    for digest in digests:
        rank = digest["rank"]
        for direction in ("sent", "received"):
            reported = sum(row.get(f"worker{rank}/bytes_{direction}", 0.0) for row in rows)
            booked = reported + digest[f"setup_bytes_{direction}"] + digest[f"unreported_bytes_{direction}"]
            assert booked == digest[f"bytes_{direction}"], (method, rank, direction)
        if method != "central":  # central's workers take part in no round
            assert any(f"worker{rank}/bytes_sent" in row for row in rows), (method, rank)
            assert digest["unreported_bytes_sent"] > 0, (method, rank)  # the last upload is never in a report


def test_the_check_sees_a_byte_booked_twice(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "workers").mkdir(parents=True)
    digest = {
        "rank": 1, "bytes_sent": 30.0, "bytes_received": 12.0,
        "setup_bytes_sent": 4.0, "setup_bytes_received": 2.0,
        "unreported_bytes_sent": 6.0, "unreported_bytes_received": 0.0,
    }
    (run_dir / "workers" / "rank-1.json").write_text(json.dumps(digest))
    rows = [{"round": 1, "worker1/bytes_sent": 10.0, "worker1/bytes_received": 5.0},
            {"round": 2, "worker1/bytes_sent": 10.0, "worker1/bytes_received": 5.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert_reports_add_up(run_dir, "entgan")

    rows[1]["worker1/bytes_sent"] = 11.0  # one byte in two places
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(AssertionError):
        assert_reports_add_up(run_dir, "entgan")
