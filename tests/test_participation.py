"""The engine's participation policy (`engine.participation`) for every method that can leave
workers out of a round: real runs, in which only the scheduled workers report."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import tiny_config, worker_digests

from entgan.config import ConfigError
from entgan.engine.launch import check_capabilities, launch_local
from entgan.engine.registry import method_class
from entgan.rundir import RunDirectory


def reporting_workers(run_dir: Path) -> list[list[int]]:
    """Per round, the ranks whose report reached the server (those that took part)."""
    rows = RunDirectory(run_dir).metrics()
    return [sorted(int(m[1]) for key in row if (m := re.fullmatch(r"worker(\d+)/bytes_sent", key))) for row in rows]


@pytest.mark.parametrize("algorithm", ["flgan", "mdgan", "ren-serial", "ren-parallel", "dgan-1", "dgan-3", "acgan-dance"])
def test_baselines_follow_the_engines_participation(algorithm: str, tmp_path: Path, cache_dir: Path) -> None:
    # Task "low" has workers 1-2 (one of them per round, in turn), task "high" worker 3 (always).
    # MD-GAN swaps every round: only a round's participants may swap (a swap with a worker that
    # sits the round out would wait for it forever).
    config = tiny_config(
        algorithm=algorithm,
        engine={"participation": 0.5, "start_timeout_s": 60, "round_timeout_s": 60},
        baselines={"mdgan": {"swap_every_epochs": 0.01}},
    )
    run_dir = tmp_path / algorithm

    launch_local(config, run_dir, cache_dir=cache_dir, show_progress=False)

    assert reporting_workers(run_dir) == [[1, 3], [2, 3], [1, 3], [2, 3]]
    digests = {digest["rank"]: digest for digest in worker_digests(run_dir)}
    # A worker that sits out half the rounds uploads half as much as one that never does.
    uploaded = {rank: sum(v for k, v in d.items() if k.startswith("bytes_sent/") and "gossip" not in k) for rank, d in digests.items()}
    assert uploaded[1] < uploaded[3] and uploaded[2] < uploaded[3]
    if algorithm == "mdgan":  # task "high" has one worker: no swaps; task "low" has one per round
        assert all(digest["swaps"] == 0 for digest in digests.values())


def test_a_method_that_needs_every_worker_refuses_partial_participation() -> None:
    config = tiny_config(algorithm="central", engine={"participation": 0.5})

    with pytest.raises(ConfigError, match="engine.participation: algorithm 'central' cannot leave workers out"):
        check_capabilities(config, method_class("central"))


def test_workers_wait_while_the_server_evaluates(tmp_path: Path, cache_dir: Path) -> None:
    # Evaluated every round: each round's G is evaluated before it goes down, so a worker's next
    # round cannot start training before the evaluation is over (it waits for that G).
    from entgan.engine.timeline import HARNESS, read_timeline

    config = tiny_config(algorithm="flgan", rounds=3, eval={"every": 1}, engine={"timeline": True})
    run_dir = tmp_path / "run"

    launch_local(config, run_dir, cache_dir=cache_dir, show_progress=False)

    _, server = read_timeline(run_dir / "timeline" / "rank-0.jsonl")
    phases = [(record[3], record[4], record[1]) for record in server if record[0] == "phase"]
    evaluations_end = {}
    for (name, round_index, _), (next_name, next_round, wall) in zip(phases, phases[1:]):
        if name == HARNESS and round_index >= 0 and next_name == "send_down":
            evaluations_end[round_index] = wall  # the evaluation ends where the send starts
    assert sorted(evaluations_end) == [0, 1, 2]
    order = [name for name, round_index, _ in phases if round_index == 1]
    assert order.index("train_global") < order.index(HARNESS) < order.index("send_down")
    for rank in (1, 2, 3):
        _, records = read_timeline(run_dir / "timeline" / f"rank-{rank}.jsonl")
        current = None
        for record in records:
            if record[0] == "phase":
                current = (record[3], record[4])
            elif record[0] == "wait" and current in (("local_round", 1), ("local_round", 2)):
                # The first wait of the round is for the server's G: it ends after the evaluation.
                assert record[4] >= evaluations_end[current[1] - 1], (rank, current)
                current = None
