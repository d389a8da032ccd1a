"""Every method resumes (issue 14): a worker that dies mid-run restarts the whole group from the last
complete checkpoint, and the run's metrics stream is the one an uninterrupted run writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from entgan.config import ConfigError
from entgan.engine.launch import check_capabilities, launch_local
from entgan.engine.method import Capabilities
from entgan.engine.registry import METHOD_PATHS, method_class
from entgan.rundir import RunDirectory

from conftest import tiny_config, worker_digests
from test_traffic import assert_reports_add_up
from crashing_workers import CRASH_RANK, crashing_class_name

METHODS = sorted(METHOD_PATHS)
MEMORY_KEYS = (
    "server/rss_bytes", "server/peak_rss_bytes", "server/rss_increase_bytes", "server/hwm_bytes", "server/hwm_increase_bytes",
)
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    # DANCE's default codec (`auto`) picks each link's compression from its measured wall-clock
    # bandwidth, so two runs of one seed need not agree; a forced lossy codec makes them agree, and
    # makes the links' error-feedback state (replica estimates) count when the run resumes.
    "acgan-dance": {"baselines": {"dance": {"codec": "topk"}}},
    # Swaps every 2 rounds (shards 40, 40, 80 at batch 16): the D_n swapped in a checkpointed round
    # are still in flight when the checkpoint is taken.
    "mdgan": {"baselines": {"mdgan": {"swap_every_epochs": 0.6}}},
}
TOLERANCE: dict[str, dict[str, float]] = {
    # MD-GAN's server adds each worker's feedback into G's float32 gradients in arrival order, so
    # the order the workers answer in moves G in its last bits: two uninterrupted runs of one seed
    # already differ by a few parts in 1e9 in G's checksum. Every other method must match exactly.
    "mdgan": {"rel": 1e-6, "abs": 1e-9},
}


def _same(actual: dict[str, Any], expected: dict[str, Any], method: str) -> bool:
    if method not in TOLERANCE or actual.keys() != expected.keys():
        return actual == expected
    return all(
        actual[key] == (pytest.approx(value, **TOLERANCE[method]) if isinstance(value, float) else value)
        for key, value in expected.items()
    )


def _comparable(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row without what differs between any two runs of the same seed: durations and
    clocks (keys ending in `_s`) and the server's memory. Traffic stays: the engine restores every
    rank's byte counters, and the methods the traffic figures each report counts from."""
    return {key: value for key, value in row.items() if not key.endswith("_s") and key not in MEMORY_KEYS}


def test_every_method_supports_resume() -> None:
    assert [method for method in METHODS if not method_class(method).capabilities.resume] == []


def test_restarts_are_refused_at_launch_for_a_method_that_cannot_resume() -> None:
    class NoResume(method_class("ren-serial")):  # type: ignore[misc, valid-type]
        capabilities = Capabilities()

    with pytest.raises(ConfigError, match="restart"):
        check_capabilities(tiny_config(faults={"max_restarts": 1}), NoResume)
    with pytest.raises(ConfigError, match="cannot resume"):
        check_capabilities(tiny_config(), NoResume, resuming=True)
    check_capabilities(tiny_config(), NoResume)  # no restarts, no resume: nothing to refuse
    check_capabilities(tiny_config(faults={"max_restarts": 1}), method_class("ren-serial"))


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_a_worker_killed_mid_run_resumes_to_the_uninterrupted_metrics(
    tmp_path: Path, cache_dir: Path, method: str
) -> None:
    config = tiny_config(
        algorithm=method,
        rounds=6,
        checkpoint={"every": 2},
        eval={"every": 2},
        faults={"max_restarts": 1},
        **METHOD_SETTINGS.get(method, {}),
    )
    straight = launch_local(config, tmp_path / "straight", cache_dir=cache_dir, show_progress=False)
    assert_reports_add_up(tmp_path / "straight", method)
    crashed_dir = tmp_path / "crashed"
    crashed = launch_local(
        config, crashed_dir, cache_dir=cache_dir, show_progress=False,
        algorithm_path=f"crashing_workers:{crashing_class_name(method)}",
    )

    restarts = [event for event in RunDirectory(crashed_dir).events() if event["event"] == "restart"]
    assert len(restarts) == 1 and restarts[0]["resume_round"] == 2, restarts
    assert crashed["resumed_from_round"] == 2 and crashed["rounds"] == 6
    rows_straight = RunDirectory(tmp_path / "straight").metrics()
    rows_crashed = RunDirectory(crashed_dir).metrics()
    assert [row["round"] for row in rows_crashed] == list(range(1, 7))
    for a, b in zip(rows_straight, rows_crashed, strict=True):
        assert _same(_comparable(b), _comparable(a), method), f"{method}, round {a['round']}"
    assert _same({"g": crashed["generator_sum"]}, {"g": straight["generator_sum"]}, method)
    # The workers end where they would have: same models (where they hold any), traffic and figures.
    for a, b in zip(worker_digests(tmp_path / "straight"), worker_digests(crashed_dir), strict=True):
        assert _same(_digest(b), _digest(a), method), f"{method}, rank {a['rank']}"
    assert CRASH_RANK in {digest["rank"] for digest in worker_digests(crashed_dir)}


def _digest(digest: dict[str, Any]) -> dict[str, Any]:
    """A worker's end-of-run digest without its timing (and bandwidth, which is measured time) and
    memory."""
    return {
        key: value
        for key, value in digest.items()
        if not key.endswith("_s") and not key.startswith("memory_") and "bandwidth" not in key
    }
