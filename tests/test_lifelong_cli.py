"""`entgan job ...` and `entgan kb ...`: bad specs refused at create (exit 2, field named), and the
read-only views over a database filled by a controller with faked stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from entgan.cli import main
from entgan.lifelong import Jobs, load_job_spec

from test_lifelong_units import FakeClock, FakeLauncher, job_data, write_images


def _spec(tmp_path: Path, data: dict[str, Any], name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _edge(tmp_path: Path) -> Path:
    edge = tmp_path / "edge"
    for task in ("A", "B"):
        write_images(edge / task / "0", 6)
    return edge


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


BAD_SPECS = {
    "unknown trigger metric": (
        {"trigger": {"conditions": [{"kind": "metric", "metric": "precision", "operator": ">", "threshold": 1}]}},
        "trigger.conditions.0.metric: Input should be 'fid' or 'fidelity' (found 'precision')",
    ),
    "bad operator": (
        {"trigger": {"conditions": [{"kind": "samples", "at_least": 5},
                                    {"kind": "metric", "metric": "fid", "operator": "=>", "threshold": 1}]}},
        "trigger.conditions.1.operator: Input should be '>', '>=', '<', '<=', '==' or '!=' (found '=>')",
    ),
    "missing data location": (
        {"edge": {"tasks": [{"name": "A", "path": "nowhere"}]}},
        "edge.tasks.0.path: {tmp}/nowhere: does not exist, expected a folder",
    ),
    "duplicate task names": (
        {"edge": {"tasks": [{"name": "A", "path": "edge/A"}, {"name": "A", "path": "edge/B"}]}},
        "edge.tasks: Value error, task names must be unique, duplicated: ['A']",
    ),
    "metric max age not positive": (
        {"trigger": {"conditions": [{"kind": "metric", "metric": "fid", "operator": ">", "threshold": 1,
                                     "max_age_s": 0}]}},
        "trigger.conditions.0.max_age_s: Input should be greater than 0 (found 0)",
    ),
    "retry delay cap not positive": (
        {"trigger": {"max_retry_delay_s": -5, "conditions": [{"kind": "samples", "at_least": 5}]}},
        "trigger.max_retry_delay_s: Input should be greater than 0 (found -5)",
    ),
    "unknown field": (
        {"trigger": {"check_period": 5, "conditions": [{"kind": "samples", "at_least": 5}]}},
        "trigger.check_period: unknown field",
    ),
}


@pytest.mark.parametrize("problem", list(BAD_SPECS))
def test_bad_spec_is_refused_at_create_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], problem: str
) -> None:
    _edge(tmp_path)
    change, expected = BAD_SPECS[problem]
    spec = _spec(tmp_path, job_data(Path("edge"), **change))

    status, _, err = _run(capsys, "job", "create", str(spec), "--root", str(tmp_path / "jobs"))

    assert status == 2
    assert f"{spec}:" in err and expected.format(tmp=tmp_path.resolve()) in err
    assert not (tmp_path / "jobs").exists()  # nothing stored, not even an empty database


def test_bad_spec_exit_status_of_the_real_command(tmp_path: Path) -> None:
    _edge(tmp_path)
    spec = _spec(tmp_path, job_data(Path("edge"), edge={"tasks": [{"name": "A", "path": "edge/A"},
                                                                  {"name": "A", "path": "edge/B"}]}))

    result = subprocess.run(
        [sys.executable, "-m", "entgan.cli", "job", "create", str(spec), "--root", str(tmp_path / "jobs")],
        capture_output=True, text=True, timeout=300, env={**os.environ},
    )

    assert result.returncode == 2
    assert "edge.tasks: Value error, task names must be unique, duplicated: ['A']" in result.stderr


def test_shipped_job_specs_are_valid() -> None:
    root = Path(__file__).resolve().parents[1]
    specs = sorted((root / "configs" / "jobs").glob("*.yaml"))
    assert specs
    for path in specs:
        load_job_spec(path)


def test_views_of_jobs_and_knowledge_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _edge(tmp_path)
    spec = _spec(tmp_path, job_data(Path("edge")))
    root = ["--root", str(tmp_path / "jobs")]
    assert _run(capsys, "job", "create", str(spec), *root)[0] == 0
    assert "already exists" in _run(capsys, "job", "create", str(spec), *root)[2]
    clock = FakeClock()
    with Jobs(tmp_path / "jobs", clock=clock) as jobs:  # one cycle, with stages faked
        controller = jobs.controller(launcher=FakeLauncher([{"A": 55.5, "B": 66.6}]))
        for _ in range(12):
            controller.tick()
            clock.now += 1

    status, out, _ = _run(capsys, "job", "list", *root)
    assert status == 0 and "digits" in out and "v1" in out and "ModelDeployed" in out
    status, out, _ = _run(capsys, "job", "status", "digits", *root)
    assert "train/Waiting" in out and "deployed: version 1 (tasks A, B)" in out
    assert "new samples per task >= 5: A +0, B +0" in out
    status, out, _ = _run(capsys, "job", "status", "digits", "--json", *root)
    assert json.loads(out)["deployed"] == 1
    status, out, _ = _run(capsys, "job", "logs", "digits", *root)
    assert out.count("cycle 1") == 15 and "CandidateAccepted" in out and "A +6, B +6" in out
    status, out, _ = _run(capsys, "kb", "tasks", *root)
    assert "digits  A" in out and "fA" in out
    status, out, _ = _run(capsys, "kb", "models", *root)
    assert "v1" in out and "A 55.5/0.50, B 66.6/0.50" in out
    [classifier] = Jobs(tmp_path / "jobs").classifiers("digits")
    assert "CLASSIFIER" in out and f"c1 ({classifier.sha256[:12]})" in out
    status, out, _ = _run(capsys, "kb", "classifiers", *root)
    assert status == 0 and f"c1          {classifier.sha256[:12]}" in out and classifier.file in out
    status, out, _ = _run(capsys, "kb", "show", "digits:v1", *root)
    assert "decision in cycle 1" in out and "nothing is deployed yet" in out and "55.5" in out
    assert "trained with the job's classifier c1 (" in out and "CLASSIFIER" in out
    status, out, _ = _run(capsys, "job", "watch", "--count", "1", *root)
    assert status == 0 and "latest transitions" in out
    status, _, err = _run(capsys, "kb", "show", "v7", *root)
    assert status == 2 and "has no model version 7" in err
    status, _, err = _run(capsys, "job", "status", "nope", *root)
    assert status == 2 and "no job named 'nope'" in err
    status, out, _ = _run(capsys, "job", "delete", "digits", *root)
    assert status == 0 and _run(capsys, "job", "list", *root)[1].startswith("no jobs")
    status, _, err = _run(capsys, "kb", "tasks", "--root", str(tmp_path / "typo"))
    assert status == 2 and "no jobs database here" in err and not (tmp_path / "typo").exists()


def test_status_shows_the_back_off_after_failures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _edge(tmp_path)
    spec = _spec(tmp_path, job_data(Path("edge")))
    root = ["--root", str(tmp_path / "jobs")]
    assert _run(capsys, "job", "create", str(spec), *root)[0] == 0
    clock = FakeClock()
    with Jobs(tmp_path / "jobs", clock=clock) as jobs:
        launcher = FakeLauncher([])
        launcher.fail_always = {"reason": "DataError", "message": "no images"}
        controller = jobs.controller(launcher=launcher)
        for _ in range(30):  # fails at ~2 s, backs off 20 s, fails again at ~24 s: 40 s now
            controller.tick()
            clock.now += 1
        job = jobs.job("digits")

    status, out, _ = _run(capsys, "job", "status", "digits", "--json", *root)
    data = json.loads(out)
    assert (data["failures"], data["retry_at"]) == (2, job.retry_at) and data["next_check_at"] == job.retry_at
    status, out, _ = _run(capsys, "job", "status", "digits", *root)
    assert "failures: 2 in a row; next attempt (trigger check) not before" in out
    assert "next trigger check:" in out
