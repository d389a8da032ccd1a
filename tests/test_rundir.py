"""Run directory safety: refuse to clobber, tolerate a torn last metrics line, atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from entgan.config import ConfigError
from entgan.rundir import RunDirectory, atomic_write

from conftest import tiny_config


def test_torn_last_metrics_line_is_ignored_but_a_torn_middle_line_is_an_error(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path / "run", tiny_config())
    run.append_metrics({"round": 1})
    run.append_metrics({"round": 2})
    with run.metrics_path.open("a") as handle:
        handle.write('{"round": 3, "g_lo')  # a crash mid-append

    assert [row["round"] for row in run.metrics()] == [1, 2]

    run.metrics_path.write_text('{"round": 1}\n{"rou\n{"round": 3}\n')
    with pytest.raises(ValueError):
        run.metrics()


def test_run_directory_path_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")

    with pytest.raises(ConfigError, match="is a file"):
        RunDirectory.create(target, tiny_config(), overwrite=True)
    assert target.read_text() == "x"


def test_overwrite_replaces_only_a_run_directory(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path / "run", tiny_config())
    run.append_metrics({"round": 1})

    again = RunDirectory.create(tmp_path / "run", tiny_config(), overwrite=True)

    assert again.metrics() == []
    assert again.config() == tiny_config()


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")

    def fail_halfway(handle) -> None:
        handle.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail_halfway)
    assert path.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind


def test_latest_checkpoint_is_the_newest_round_even_before_latest_pt_is_written(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path / "run", tiny_config())
    with pytest.raises(FileNotFoundError, match="no checkpoint yet"):
        run.latest_checkpoint()
    run.save_checkpoint({"round": 1}, 1)
    run.save_checkpoint({"round": 2}, 2, rank=1)  # a worker's part does not count
    # A server killed after renaming round 2 into place but before writing latest.pt:
    atomic_write(run.checkpoint_path(2), lambda handle: handle.write(b"round 2"))

    assert run.latest_checkpoint() == run.checkpoint_path(2)
    (run.checkpoints / "round-0001.pt").unlink()
    (run.checkpoints / "round-0002.pt").unlink()
    assert run.latest_checkpoint() == run.checkpoints / "latest.pt"  # a deployed copy has only this
