"""`entgan serve` end to end: a real server process (uvicorn) and a real HTTP client (urllib) against a
lifelong job whose versions are deployed by the real controller and jobs database while it runs."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from entgan.lifelong import Jobs
from entgan.lifelong.edge import count_samples
from entgan.lifelong.spec import TaskLocation
from entgan.rundir import RunDirectory

from test_export import untrained_run

# ------------------------------------------------------------------------------------- helpers


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Finished:
    """A stage process that has already exited with status 0."""

    pid = 2**22 + 4242  # no such process here: recovery finds nothing to stop
    started = 0.0

    def poll(self) -> int | None:
        return 0

    def kill(self) -> None:
        pass


class CheckpointLauncher:
    """Plays the train and eval stage processes (their result files, as a real one writes them):
    cycle k's "training" yields the k-th given checkpoint of a real run, and every candidate measures
    better than the deployed version, so the real controller deploys each one."""

    def __init__(self, run_dir: Path, checkpoints: list[Path]) -> None:
        self.run_dir, self.checkpoints = run_dir, list(checkpoints)

    def start(self, workdir: Path) -> Finished:
        request = json.loads((workdir / "request.json").read_text())["request"]
        if request["stage"] == "train":
            tasks = [{"name": t["name"], "folders": [], "labels": [], "samples": count_samples(TaskLocation(**t)),
                      "train": 8, "holdout": 2, "fingerprint": t["name"], "skipped": []} for t in request["tasks"]]
            result: dict[str, Any] = {
                "checkpoint": str(self.checkpoints[request["cycle"] - 1]), "run_dir": str(self.run_dir),
                "snapshot": {"root": str(workdir / "data"), "tasks": tasks},
                "summary": {"rounds": 4, "train_clock_s": 1.0, "wall_clock_s": 1.0, "first_eval": {}, "final_eval": {}},
            }
        else:
            names = [task["name"] for task in request["candidate"]["snapshot"]["tasks"]]
            result = {
                "candidate": {task: {"fid": 50.0, "fidelity": 0.9} for task in names},
                "deployed": None if request["deployed"] is None else {t: {"fid": 100.0, "fidelity": 0.5} for t in names},
                "deployed_tasks": None if request["deployed"] is None else names,
                "holdout": {task: 2 for task in names},
            }
        (workdir / "result.json").write_text(json.dumps(result))
        return Finished()


def write_images(folder: Path, count: int, start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for number in range(start, start + count):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f".{number}.part", format="PNG")
        (folder / f".{number}.part").rename(folder / f"{number:05d}.png")


def deploy_next_version(jobs: Jobs, launcher: CheckpointLauncher) -> int:
    """Tick the real controller (fake clock) until a new version is deployed; return its number."""
    before = jobs.status("digits").deployed
    controller = jobs.controller(launcher=launcher)
    for _ in range(30):
        controller.tick()
        jobs.clock.now += 1.0
        deployed = jobs.status("digits").deployed
        if deployed is not None and (before is None or deployed.version != before.version):
            return deployed.version
    raise AssertionError(f"nothing deployed; log: {[t.message for t in jobs.logs('digits')][-3:]}")


class Server:
    """`entgan serve` as a subprocess on a port the OS picks (printed on its first line)."""

    def __init__(self, *args: str) -> None:
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "entgan.cli", "serve", *args, "--port", "0", "--threads", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
        )
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"the server did not start: {self.process.wait(30)} {self.process.stderr.read()}")
        self.url = json.loads(line)["url"]

    def get(self, path: str) -> tuple[int, Any, bytes]:
        return self.request(urllib.request.Request(self.url + path))

    def post(self, path: str, body: Any) -> tuple[int, Any, bytes]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.request(urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}, method="POST"))

    @staticmethod
    def request(request: urllib.request.Request) -> tuple[int, Any, bytes]:
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read()

    def stop(self, how: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(how)
        self.process.wait(30)


def npy(body: bytes) -> np.ndarray:
    return np.load(io.BytesIO(body), allow_pickle=False)


def quantised(images: torch.Tensor) -> np.ndarray:
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# --------------------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_serve_follows_the_deployed_version_refuses_bad_requests_and_survives_sigkill(
    trained_tiny_run: Path, tmp_path: Path
) -> None:
    rounds = RunDirectory(trained_tiny_run).checkpoint_rounds(0)
    checkpoints = [RunDirectory(trained_tiny_run).checkpoint_path(r) for r in rounds[-2:]]  # rounds 2 and 4
    launcher = CheckpointLauncher(trained_tiny_run, checkpoints)
    edge = tmp_path / "edge"
    write_images(edge / "low" / "0", 6)
    write_images(edge / "high" / "0", 6)
    spec = {"name": "digits", "edge": {"root": str(edge)},
            "trigger": {"check_period_s": 1, "conditions": [{"kind": "samples", "at_least": 5}]}}
    (tmp_path / "job.yaml").write_text(json.dumps(spec))
    jobs = Jobs(tmp_path / "jobs", clock=FakeClock())
    jobs.create(tmp_path / "job.yaml")

    refused = subprocess.run([sys.executable, "-m", "entgan.cli", "serve", "digits", "--root", str(tmp_path / "jobs")],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "no deployed version yet" in refused.stderr

    assert deploy_next_version(jobs, launcher) == 1
    server = Server("digits", "--root", str(tmp_path / "jobs"), "--max-n", "64")
    try:
        status, _, body = server.get("/health")
        assert status == 200 and json.loads(body)["model"] == "digits v1" and json.loads(body)["status"] == "ok"
        status, _, body = server.get("/tasks")
        assert [t["name"] for t in json.loads(body)["tasks"]] == ["low", "high"]
        assert json.loads(body)["image_shape"] == [1, 28, 28]

        status, headers, body = server.post("/sample", {"task": "high", "n": 5, "seed": 3, "format": "npy"})
        assert status == 200 and headers["X-EntGAN-Model"] == "digits v1", body
        expected_v1 = quantise_of(checkpoints[0], "high", 5, 3)
        assert np.array_equal(npy(body), expected_v1)
        status, headers, body = server.post("/sample", {"task": "low", "n": 9, "seed": 1})
        assert status == 200 and headers["Content-Type"] == "image/png" and body[:4] == b"\x89PNG"

        # Bad requests: a 4xx with a message.
        for request, code, words in [
            ({"task": "nope", "n": 2}, 404, "unknown task 'nope'"),
            ({"task": "low", "n": 65}, 422, "at most 64"),
            ({"task": "low", "n": 0}, 422, "n:"),
            ({"n": 2}, 422, "task: "),
            ({"task": "low", "colour": "red"}, 422, "colour: unknown field"),
            ({"task": "low", "format": "gif"}, 422, "format:"),
            (b"{not json", 400, "not valid JSON"),
        ]:
            status, _, body = server.post("/sample", request)
            assert status == code and words in json.loads(body)["error"], (request, status, body)

        # v2 is deployed while the server runs: the next response is drawn by v2.
        write_images(edge / "low" / "0", 6, start=100)
        assert deploy_next_version(jobs, launcher) == 2
        status, headers, body = server.post("/sample", {"task": "high", "n": 5, "seed": 3, "format": "npy"})
        assert status == 200 and headers["X-EntGAN-Model"] == "digits v2"
        assert np.array_equal(npy(body), quantise_of(checkpoints[1], "high", 5, 3))
        assert not np.array_equal(npy(body), expected_v1)
        assert json.loads(server.get("/health")[2])["version"] == 2
    finally:
        server.stop(signal.SIGKILL)

    assert server.process.returncode == -signal.SIGKILL
    restarted = Server("digits", "--root", str(tmp_path / "jobs"))
    try:
        health = json.loads(restarted.get("/health")[2])
        assert health["model"] == "digits v2" and health["checkpoint"] == str(checkpoints[1])
        status, headers, _ = restarted.post("/sample", {"task": "low", "n": 3, "format": "zip"})
        assert status == 200 and headers["X-EntGAN-Model"] == "digits v2"
    finally:
        restarted.stop()
    jobs.close()


def quantise_of(checkpoint: Path, task: str, n: int, seed: int) -> np.ndarray:
    """What the server should return for a request, computed from the checkpoint file directly."""
    from entgan.deployed import ResolvedModel, load_resolved

    model = load_resolved(ResolvedModel(reference="test", checkpoint=checkpoint, label="test"))
    return quantised(model.sample(task, n, seed=seed))


def test_a_checkpoint_that_does_not_load_is_not_swapped_in(tmp_path: Path) -> None:
    from entgan.serve import ModelWatcher

    run = untrained_run(tmp_path / "run", seed=1, round_number=2)
    watcher = ModelWatcher(str(run))
    assert watcher.current.model.label == "run round 2"

    (run / "checkpoints" / "round-0004.pt").write_bytes(b"truncated")  # as a non-atomic writer would leave it
    model = asyncio.run(watcher.refresh())

    assert model.label == "run round 2" and watcher.health()["status"] == "stale"
    assert "round 4 did not load" in watcher.health()["error"]
    untrained_run(run, seed=2, round_number=6)  # a whole checkpoint arrives
    assert asyncio.run(watcher.refresh()).label == "run round 6" and watcher.health()["status"] == "ok"
