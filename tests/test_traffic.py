"""Every byte a worker moves lands in exactly one place: its setup, one round report, or the
remainder after its last upload (the engine's one traffic meter, for every method)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from entgan.engine.launch import launch_local
from entgan.engine.registry import METHOD_PATHS

from conftest import tiny_config, worker_digests


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHOD_PATHS))
def test_round_reports_add_up_to_each_workers_totals(method: str, tmp_path: Path, cache_dir: Path) -> None:
    config = tiny_config(algorithm=method, rounds=5, checkpoint={"every": 0})
    launch_local(config, tmp_path / "run", cache_dir=cache_dir, show_progress=False)

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    digests = worker_digests(tmp_path / "run")
    assert len(digests) == config.num_workers
    for digest in digests:
        rank = digest["rank"]
        for direction in ("sent", "received"):
            reported = sum(row.get(f"worker{rank}/bytes_{direction}", 0.0) for row in rows)
            booked = reported + digest[f"setup_bytes_{direction}"] + digest[f"unreported_bytes_{direction}"]
            assert booked == digest[f"bytes_{direction}"], (rank, direction)
        if method != "central":  # central's workers take part in no round
            assert any(f"worker{rank}/bytes_sent" in row for row in rows)
            assert digest["unreported_bytes_sent"] > 0  # the last upload is never in a report
