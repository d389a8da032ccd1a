"""The `entgan` command, run as a user would: a subprocess, its exit status and its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from entgan.config import load_config

from conftest import due_ranks, tiny_config_data


def entgan(*args: str, cache_dir: Path | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ)
    if cache_dir is not None:
        environment["ENTGAN_CACHE_DIR"] = str(cache_dir)
    return subprocess.run(
        [sys.executable, "-m", "entgan.cli", *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=cwd,
        timeout=300,
    )


def write_config(path: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump(tiny_config_data(**overrides)))
    return path


def test_unknown_field_exits_2_naming_the_field(tmp_path: Path) -> None:
    config = write_config(tmp_path / "bad.yaml", tasks=[{"name": "a", "labels": [0], "wrkers": 2}])

    result = entgan("run", str(config), "--run-dir", str(tmp_path / "run"))

    assert result.returncode == 2
    assert "bad.yaml" in result.stderr and "tasks.0.wrkers: unknown field" in result.stderr
    assert not (tmp_path / "run").exists()  # stopped before anything was created or spawned


def test_missing_data_directory_exits_2_naming_it(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", data={"source": "image-folder", "path": str(tmp_path / "nowhere")})

    result = entgan("validate", str(config))

    assert result.returncode == 2
    assert "nowhere" in result.stderr


def test_task_labels_absent_from_data_exit_2(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tasks=[{"name": "ghost", "labels": [42], "workers": 1}])

    result = entgan("validate", str(config))

    assert result.returncode == 2
    assert "ghost" in result.stderr


def test_validate_accepts_a_good_config(tmp_path: Path) -> None:
    result = entgan("validate", str(write_config(tmp_path / "c.yaml")))

    assert result.returncode == 0, result.stderr
    assert '"world_size": 4' in result.stdout


def test_shipped_configs_validate() -> None:
    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "configs").glob("*.yaml")):
        result = entgan("validate", str(path))
        assert result.returncode == 0, f"{path}: {result.stderr}"


@pytest.mark.slow
def test_run_then_sample(tmp_path: Path, cache_dir: Path) -> None:
    config = write_config(tmp_path / "c.yaml", rounds=2)
    run_dir = tmp_path / "run"

    ran = entgan("run", str(config), "--run-dir", str(run_dir), "--no-progress", cache_dir=cache_dir)
    assert ran.returncode == 0, ran.stderr
    assert "fid/low" in ran.stdout

    rerun = entgan("run", str(config), "--run-dir", str(run_dir), "--no-progress", cache_dir=cache_dir)
    assert rerun.returncode == 2 and "already exists" in rerun.stderr

    grid = tmp_path / "grid.png"
    sampled = entgan("sample", str(run_dir), "--task", "high", "-n", "9", "-o", str(grid))
    assert sampled.returncode == 0, sampled.stderr
    assert grid.stat().st_size > 0

    unknown = entgan("sample", str(run_dir), "--task", "nope", "-o", str(grid))
    assert unknown.returncode == 2 and "unknown task 'nope'" in unknown.stderr

    not_a_run = entgan("sample", str(tmp_path), "--task", "high")
    assert not_a_run.returncode == 2 and "not an EntGAN run directory" in not_a_run.stderr


@pytest.mark.slow
def test_torchrun_launch_runs_the_same_engine(tmp_path: Path, cache_dir: Path) -> None:
    """The multi-machine entry point, on one machine: torchrun picks the port, 4 ranks join."""
    config = write_config(tmp_path / "c.yaml", rounds=2)
    run_dir = tmp_path / "run"
    environment = {
        **os.environ,
        "ENTGAN_CACHE_DIR": str(cache_dir),
        "GLOO_SOCKET_IFNAME": "lo",
        "ENTGAN_JOB_SECRET": "a-job-secret-for-this-test-only",  # every machine of a torchrun job needs it
    }
    torchrun = Path(sys.executable).with_name("torchrun")

    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node=4", "-m", "entgan.run", str(config),
         "--run-dir", str(run_dir)],
        capture_output=True, text=True, env=environment, timeout=300,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    for rank in due_ranks(load_config(config), 2):  # the workers due in the next round hold the final G
        digest = json.loads((run_dir / "workers" / f"rank-{rank}.json").read_text())
        assert digest["generator_sum"] == summary["generator_sum"]


def test_torchrun_entry_refuses_to_run_outside_torchrun(tmp_path: Path) -> None:
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    result = subprocess.run(
        [sys.executable, "-m", "entgan.run", str(write_config(tmp_path / "c.yaml")), "--run-dir", str(tmp_path / "r")],
        capture_output=True, text=True, env=environment, timeout=120,
    )

    assert result.returncode == 2 and "torchrun" in result.stderr


def test_torchrun_entry_needs_the_job_secret(tmp_path: Path) -> None:
    environment = {k: v for k, v in os.environ.items() if k != "ENTGAN_JOB_SECRET"}
    environment.update(RANK="1", WORLD_SIZE="4")
    result = subprocess.run(
        [sys.executable, "-m", "entgan.run", str(write_config(tmp_path / "c.yaml")), "--run-dir", str(tmp_path / "r")],
        capture_output=True, text=True, env=environment, timeout=120,
    )

    assert result.returncode == 2 and "ENTGAN_JOB_SECRET" in result.stderr
