"""Record (or re-run) the golden runs that pin the behaviour of every method.

Each golden run is a 30-round run of the bench workload (`benchmarks/workloads/mnist-2tasks-4workers.yaml`)
with a fixed seed, one thread per process and an evaluation every 10 rounds. Its `metrics.jsonl`
rows, less the fields that measure time or memory, are the golden file `tests/golden/<method>.jsonl`.
`tests/test_golden.py` re-runs them and compares.

    python tests/golden/record.py                # every method, writes tests/golden/*.jsonl
    python tests/golden/record.py entgan mdgan   # some of them
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

GOLDEN_DIR = Path(__file__).resolve().parent
WORKLOAD = GOLDEN_DIR.parents[1] / "benchmarks" / "workloads" / "mnist-2tasks-4workers.yaml"
METHODS = [
    "entgan", "mdgan", "flgan", "ren-serial", "ren-parallel",
    "acgan-dance", "dgan-1", "dgan-2", "dgan-3", "central",
]
ROUNDS = 30
EVAL_EVERY = 10

# Fields that measure the machine, not the method: wall time, waiting, resident memory.
_MACHINE_FIELDS = re.compile(r"(_s|_bytes)$|(^|/)(rss|peak_rss|rss_increase)")
TRAFFIC_FIELDS = re.compile(r"bytes_(sent|received)$")


def golden_config_data(method: str) -> dict[str, Any]:
    data = yaml.safe_load(WORKLOAD.read_text())
    data.update(name=f"golden-{method}", algorithm=method, rounds=ROUNDS)
    data["eval"] = {**data["eval"], "every": EVAL_EVERY}
    data["engine"] = {**data.get("engine", {}), "threads_per_process": 1}
    data["checkpoint"] = {"every": 0}
    return data


def comparable(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row without the fields that measure time or memory (traffic counts are kept)."""
    return {
        key: value
        for key, value in row.items()
        if TRAFFIC_FIELDS.search(key) or not _MACHINE_FIELDS.search(key)
    }


def run_golden(method: str, run_root: Path, cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """Run one method's golden configuration into `run_root/<method>`; return its comparable rows."""
    import torch

    from entgan.config import parse_config
    from entgan.engine.launch import launch_local

    # The domain classifier is trained in this process: one thread, and a cache of the golden
    # runs' own, so FIDs do not depend on the caller's thread count or on an older cached classifier.
    torch.set_num_threads(1)
    config = parse_config(golden_config_data(method), origin=f"golden:{method}")
    run_dir = run_root / method
    cache_dir = cache_dir if cache_dir is not None else run_root / "classifier-cache"
    launch_local(config, run_dir, overwrite=True, cache_dir=cache_dir, show_progress=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [comparable(row) for row in rows]


def golden_path(method: str) -> Path:
    return GOLDEN_DIR / f"{method}.jsonl"


def main(methods: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="entgan-golden-") as scratch:
        for method in methods or METHODS:
            rows = run_golden(method, Path(scratch))
            golden_path(method).write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
            print(f"{method}: {len(rows)} rows -> {golden_path(method)}")


if __name__ == "__main__":
    main(sys.argv[1:])
