"""Crashes survived, bad updates refused, strangers kept out: the real engine, real processes."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.multiprocessing import ProcessRaisedException

from entgan.api import load_generator
from entgan.config import ConfigError, SecurityConfig
from entgan.engine.launch import LaunchOptions, _spawned_rank, launch_local, resume_local
from entgan.engine.security import load_secret, message_mac
from entgan.engine.updates import HEADER_SIZE, MAGIC, VERSION, UpdateLayout, refusal_reason, update_problem
from entgan.rundir import RunDirectory

from conftest import due_ranks, tiny_config, tiny_config_data, worker_digests

TIMING_KEYS = (
    "round_s", "train_clock_s", "wall_clock_s", "server/rss", "server/peak", "server/hwm", "server/bytes", "server/comm",
)


def _comparable(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row without what legitimately differs between two runs: time, memory, and the
    server's cumulative traffic (a resumed run re-sends the models once)."""
    return {
        key: value
        for key, value in row.items()
        if not key.startswith(TIMING_KEYS) and not key.endswith(("compute_s", "comm_wait_s", "bytes_received"))
    }


# --------------------------------------------------------------------------------------- unit
def _update(key: bytes, values: torch.Tensor, layout: UpdateLayout, rank: int = 1, round_index: int = 0) -> tuple:
    header = torch.tensor([MAGIC, VERSION, round_index, rank, layout.fingerprint, values.numel(), 0], dtype=torch.int64)
    extras = torch.zeros(3)
    return header, extras, values, message_mac(key, header, extras, values)


def test_refusal_reasons_name_the_problem() -> None:
    key = b"k" * 32
    layout = UpdateLayout.of([("trunk.0.weight", torch.zeros(2, 3)), ("heads.0.bias", torch.zeros(1))])
    good = torch.ones(7)

    assert refusal_reason(key, *_update(key, good, layout), 1, 0, layout, 100.0) is None
    nan = good.clone()
    nan[3] = float("nan")
    assert "non-finite" in refusal_reason(key, *_update(key, nan, layout), 1, 0, layout, 100.0)
    assert "norm" in refusal_reason(key, *_update(key, good * 1000, layout), 1, 0, layout, 100.0)
    short = UpdateLayout.of([("trunk.0.weight", torch.zeros(1, 3)), ("heads.0.bias", torch.zeros(1))])
    assert "shapes differ" in refusal_reason(key, *_update(key, torch.ones(4), short), 1, 0, layout, None)
    renamed = UpdateLayout.of([("trunk.9.weight", torch.zeros(2, 3)), ("heads.0.bias", torch.zeros(1))])
    assert "names" in refusal_reason(key, *_update(key, good, renamed), 1, 0, layout, None)
    assert "HMAC" in refusal_reason(b"x" * 32, *_update(key, good, layout), 1, 0, layout, None)
    assert "replayed" in refusal_reason(key, *_update(key, good, layout, round_index=0), 1, 5, layout, None)
    assert "replayed" in refusal_reason(key, *_update(key, good, layout, rank=2), 1, 0, layout, None)


def test_message_mac_is_hmac_sha256_of_the_raw_bytes_in_order() -> None:
    # The MAC reads tensors in place; it must equal the textbook HMAC over their bytes, whatever the
    # dtype or memory layout, or a worker and the server could disagree about the same update.
    key = b"m" * 32
    header = torch.arange(7, dtype=torch.int64)
    transposed = torch.randn(3, 5).t()  # not contiguous
    half = torch.randn(11).half()
    expected = hmac.new(
        key,
        header.numpy().tobytes() + transposed.contiguous().numpy().tobytes() + half.numpy().tobytes(),
        hashlib.sha256,
    ).digest()
    assert bytes(message_mac(key, header, transposed, half).tolist()) == expected
    assert bytes(message_mac(key, torch.zeros(0)).tolist()) == hmac.new(key, b"", hashlib.sha256).digest()


def test_update_problem_tells_huge_finite_values_from_non_finite_ones() -> None:
    # Squares of 1e30 overflow float32, so the one-pass norm is infinite although every value is finite.
    huge = torch.full((7,), 1e30)
    assert update_problem(huge, None) is None
    assert "L2 norm of 2.646e+30, which exceeds" in update_problem(huge, 1e6)
    huge[2] = float("inf")
    assert "holds 1 non-finite" in update_problem(huge, None)
    assert "holds 2 non-finite" in update_problem(torch.tensor([float("nan"), 1.0, float("-inf")]).half(), 1e6)
    assert update_problem(torch.ones(4).half(), 2.0) is None
    assert "exceeds" in update_problem(torch.ones(4).half(), 1.9)


_FUZZ_LAYOUT = UpdateLayout.of([("trunk.0.weight", torch.zeros(2, 3)), ("heads.0.bias", torch.zeros(1))])
_FUZZ_HEADER = [MAGIC, VERSION, 0, 1, _FUZZ_LAYOUT.fingerprint, 7, 0]


@settings(max_examples=150, deadline=None)
@given(
    header=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=HEADER_SIZE, max_size=HEADER_SIZE),
    values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=12),
    mac=st.binary(min_size=32, max_size=32),
    forge=st.booleans(),
)
# Random headers seldom pass the first checks, so every later check gets an example of its own.
@example(header=_FUZZ_HEADER, values=[0.5] * 7, mac=bytes(32), forge=True)
@example(header=_FUZZ_HEADER, values=[0.5] * 7, mac=bytes(32), forge=False)
@example(header=_FUZZ_HEADER[:2] + [3] + _FUZZ_HEADER[3:], values=[0.5] * 7, mac=bytes(32), forge=True)
@example(header=_FUZZ_HEADER[:5] + [6, 0], values=[0.5] * 6, mac=bytes(32), forge=True)
@example(header=_FUZZ_HEADER[:4] + [12345, 7, 0], values=[0.5] * 7, mac=bytes(32), forge=True)
@example(header=_FUZZ_HEADER, values=[0.5] * 6 + [float("nan")], mac=bytes(32), forge=True)
@example(header=_FUZZ_HEADER, values=[1e30] * 7, mac=bytes(32), forge=True)
def test_malformed_updates_are_refused_never_crash(header: list[int], values: list[float], mac: bytes, forge: bool) -> None:
    key = b"s" * 32
    layout = _FUZZ_LAYOUT
    header_tensor = torch.tensor(header, dtype=torch.int64)
    values_tensor = torch.tensor(values, dtype=torch.float32)
    extras = torch.zeros(3)
    mac_tensor = (
        message_mac(key, header_tensor, extras, values_tensor) if forge else torch.tensor(list(mac), dtype=torch.uint8)
    )
    reason = refusal_reason(key, header_tensor, extras, values_tensor, mac_tensor, 1, 0, layout, 1e4)
    # The first check an update fails is the one its refusal names (None: accepted).
    expected = (
        "HMAC" if not forge
        else "replayed" if header[2:4] != [0, 1]
        else "shapes differ" if header[5] != 7 or len(values) != 7
        else "names, shapes or dtypes differ" if header[4] != layout.fingerprint
        else "non-finite" if not bool(torch.isfinite(values_tensor).all())
        else "exceeds security.max_update_norm" if float(values_tensor.double().norm()) > 1e4
        else None
    )
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason, (expected, reason)


def test_secret_comes_from_file_or_environment_never_too_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENTGAN_JOB_SECRET", raising=False)
    with pytest.raises(ConfigError, match="ENTGAN_JOB_SECRET"):
        load_secret(SecurityConfig())
    assert len(load_secret(SecurityConfig(), allow_generated=True)) >= 32
    monkeypatch.setenv("ENTGAN_JOB_SECRET", "short")
    with pytest.raises(ConfigError, match="at least 16"):
        load_secret(SecurityConfig())
    secret_file = tmp_path / "secret"
    secret_file.write_text("0123456789abcdef0123\n")
    assert load_secret(SecurityConfig(secret_file=secret_file)) == b"0123456789abcdef0123"
    with pytest.raises(ConfigError, match="secret_file"):
        load_secret(SecurityConfig(secret_file=tmp_path / "missing"))


# ------------------------------------------------------------------------- real processes


@pytest.mark.slow
@pytest.mark.parametrize(
    "control",
    [{}, {"compression": {"enabled": True}}, {"compression": {"enabled": True}, "edge_generator": {"enabled": True}}],
    ids=["float32", "int8-changes", "edge-generator"],
)
def test_resume_produces_the_same_metrics_stream(tmp_path: Path, cache_dir: Path, control: dict[str, Any]) -> None:
    # Coded: the workers' error feedback is in their checkpoints, and the resumed start sends the
    # models coded, as the round before would have. With G_k steps at the edge, G_k's Adam state
    # and its unsent change are in the checkpoints too.
    config = tiny_config(rounds=8, checkpoint={"every": 2}, eval={"every": 2}, control=control)
    straight = launch_local(config, tmp_path / "straight", cache_dir=cache_dir, show_progress=False)
    interrupted = tmp_path / "interrupted"
    launch_local(config, interrupted, cache_dir=cache_dir, show_progress=False)
    # As if the run had died during round 7: its round-8 and round-6 checkpoints never got written.
    for path in (interrupted / "checkpoints").glob("round-000[68]*.pt"):
        path.unlink()

    resumed = resume_local(interrupted, cache_dir=cache_dir, show_progress=False)

    assert resumed["resumed_from_round"] == 4
    rows_straight = RunDirectory(tmp_path / "straight").metrics()
    rows_resumed = RunDirectory(interrupted).metrics()
    assert [row["round"] for row in rows_resumed] == list(range(1, 9))
    for a, b in zip(rows_straight, rows_resumed, strict=True):
        assert _comparable(a) == pytest.approx(_comparable(b), rel=1e-5, abs=1e-6), f"round {a['round']}"
    assert resumed["generator_sum"] == pytest.approx(straight["generator_sum"], rel=1e-6)
    tolerance = 2e-2 if control else 1e-9  # coded, G_k is G up to int8 rounding
    for digest in worker_digests(interrupted):  # the workers due in the next round hold the final G
        if digest["rank"] in due_ranks(config, config.rounds):
            assert digest["generator_sum"] == pytest.approx(resumed["generator_sum"], rel=tolerance, abs=tolerance)


def _kill_when(run_dir: Path, rank: int, rounds_done: int, killed: dict[str, int]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rows = RunDirectory(run_dir).metrics() if (run_dir / "metrics.jsonl").exists() else []
        if len(rows) >= rounds_done:
            killed["round"] = len(rows)
            os.kill(RunDirectory(run_dir).pid(rank), signal.SIGKILL)
            return
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_every", [3, 0], ids=["from-a-checkpoint", "from-the-start"])
def test_sigkilled_worker_restarts_the_group_from_the_last_checkpoint(
    tmp_path: Path, cache_dir: Path, checkpoint_every: int
) -> None:
    # every: 0 writes no checkpoint before the last round: the group starts again from round 0,
    # and the rows of the attempt that died must not stay in the metrics stream.
    config = tiny_config(rounds=24, checkpoint={"every": checkpoint_every}, eval={"every": 6}, faults={"max_restarts": 1})
    run_dir = tmp_path / "run"
    killed: dict[str, int] = {}
    killer = threading.Thread(target=_kill_when, args=(run_dir, 2, 10, killed), daemon=True)
    killer.start()

    summary = launch_local(config, run_dir, cache_dir=cache_dir, show_progress=False)

    killer.join()
    assert killed, "the worker was never killed"
    restarts = [event for event in RunDirectory(run_dir).events() if event["event"] == "restart"]
    assert len(restarts) == 1
    # Nothing completed is lost beyond the checkpoint interval (the round in flight may be lost too).
    if checkpoint_every:
        assert restarts[0]["resume_round"] >= killed["round"] - checkpoint_every - 1
    else:
        assert restarts[0]["resume_round"] == 0
    rows = RunDirectory(run_dir).metrics()
    assert [row["round"] for row in rows] == list(range(1, 25))
    assert summary["rounds"] == 24 and summary["resumed_from_round"] == restarts[0]["resume_round"]
    for digest in worker_digests(run_dir):  # the workers due in the next round hold the final G
        if digest["rank"] in due_ranks(config, summary["rounds"]):
            assert digest["generator_sum"] == pytest.approx(summary["generator_sum"], rel=1e-9, abs=1e-9)


@pytest.mark.slow
def test_server_killed_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path: Path, cache_dir: Path) -> None:
    # Big enough models that a checkpoint takes a while to write, so the kill lands mid-write.
    data = tiny_config_data(
        rounds=400, checkpoint={"every": 1}, eval={"every": 1000},
        model={"family": "mlp", "latent_dim": 8, "hidden_dim": 768, "task_embedding_dim": 4},
    )
    config_path = tmp_path / "run.yaml"
    config_path.write_text(json.dumps(data))
    run_dir = tmp_path / "run"
    env = {**os.environ, "ENTGAN_CACHE_DIR": str(cache_dir)}
    process = subprocess.Popen(
        [sys.executable, "-m", "entgan.cli", "run", str(config_path), "--run-dir", str(run_dir), "--no-progress"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        checkpoints = run_dir / "checkpoints"
        deadline = time.monotonic() + 180
        killed_mid_write = False
        while time.monotonic() < deadline and process.poll() is None:
            if any(checkpoints.glob(".round-*.tmp")) and RunDirectory(run_dir).checkpoint_rounds(0):
                os.kill(RunDirectory(run_dir).pid(0), signal.SIGKILL)
                killed_mid_write = True
                break
            time.sleep(0.001)
        assert killed_mid_write, "never caught the server writing a checkpoint"
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    # Every checkpoint that has its final name is whole; the interrupted one never got its name.
    for path in checkpoints.glob("round-*.pt"):
        torch.load(path, map_location="cpu", weights_only=False)
    _, generator = load_generator(run_dir)
    assert sum(p.numel() for p in generator.parameters()) > 0


@pytest.mark.slow
def test_nan_and_wrongly_shaped_updates_are_refused_and_training_goes_on(tmp_path: Path, cache_dir: Path) -> None:
    data = tiny_config_data(
        rounds=40, eval={"every": 40, "samples_per_task": 200},
        data={"source": "mnist-subset", "max_per_class": 60},
        tasks=[{"name": "low", "labels": [0, 1], "workers": 3}, {"name": "high", "labels": [7, 8], "workers": 3}],
    )
    config = tiny_config(**data)
    clean = launch_local(config, tmp_path / "clean", cache_dir=cache_dir, show_progress=False)

    attacked = launch_local(
        config, tmp_path / "attacked", cache_dir=cache_dir, show_progress=False,
        algorithm_path="adversaries:BrokenUploadsEntGAN",
    )

    events = [e for e in RunDirectory(tmp_path / "attacked").events() if e["event"] == "update_refused"]
    assert {e["rank"] for e in events} == {1, 4}
    # One refusal per round each adversary takes part in (partial participation: 2 of 3 per task).
    expected = sum(len({1, 4} & set(due_ranks(config, round_index))) for round_index in range(40))
    assert 40 < expected < 80
    assert len(events) == expected and attacked["refused_updates"] == expected
    assert any("non-finite" in e["reason"] for e in events if e["rank"] == 1)
    assert all("shapes differ" in e["reason"] for e in events if e["rank"] == 4)
    assert clean["refused_updates"] == 0
    clean_fid = clean["final_eval"]["fid/overall"]
    attacked_fid = attacked["final_eval"]["fid/overall"]
    print(f"final overall FID: clean run {clean_fid:.2f}, with NaN and wrongly shaped uploads {attacked_fid:.2f}")
    assert abs(attacked_fid - clean_fid) <= 0.10 * clean_fid, (clean_fid, attacked_fid)


def _rank_with_secret(rank: int, world_size: int, config_data: dict, run_dir: str, store: str, intruder: int) -> None:
    secret = b"the-real-job-secret-0123456789" if rank != intruder else b"a-guessed-secret-000000000000"
    _spawned_rank(rank, world_size, config_data, run_dir, store, LaunchOptions(resume=True, show_progress=False), secret, None)


@pytest.mark.slow
def test_a_process_without_the_secret_is_refused_before_any_parameter_moves(tmp_path: Path, cache_dir: Path) -> None:
    config = tiny_config(rounds=2)
    run_dir = tmp_path / "run"
    launch_local(config, run_dir, cache_dir=cache_dir, show_progress=False)
    before = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in (run_dir / "checkpoints").iterdir()}
    metrics_before = (run_dir / "metrics.jsonl").read_text()

    with tempfile.TemporaryDirectory() as rendezvous, pytest.raises(ProcessRaisedException, match="secret"):
        mp.start_processes(
            _rank_with_secret,
            args=(config.world_size, config.model_dump(mode="json"), str(run_dir), os.path.join(rendezvous, "s"), 2),
            nprocs=config.world_size,
            start_method="spawn",
        )

    after = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in (run_dir / "checkpoints").iterdir()}
    assert after == before  # the server's model is unchanged
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before
    assert not any(event["event"] == "resumed" for event in RunDirectory(run_dir).events())


def _stop_when(run_dir: Path, rank: int, rounds_done: int, stopped: dict[str, int]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rows = RunDirectory(run_dir).metrics() if (run_dir / "metrics.jsonl").exists() else []
        if len(rows) >= rounds_done:
            stopped["pid"] = RunDirectory(run_dir).pid(rank)
            os.kill(stopped["pid"], signal.SIGSTOP)  # alive but stuck: only a timeout can tell
            return
        time.sleep(0.02)


@pytest.mark.slow
def test_hung_worker_is_detected_by_the_round_timeout_and_the_group_restarts(tmp_path: Path, cache_dir: Path) -> None:
    config = tiny_config(
        rounds=16, checkpoint={"every": 2}, eval={"every": 8}, faults={"max_restarts": 1},
        engine={"start_timeout_s": 60, "round_timeout_s": 4},
    )
    run_dir = tmp_path / "run"
    stopped: dict[str, int] = {}
    hanger = threading.Thread(target=_stop_when, args=(run_dir, 3, 6, stopped), daemon=True)
    hanger.start()
    try:
        summary = launch_local(config, run_dir, cache_dir=cache_dir, show_progress=False)
    finally:
        if "pid" in stopped:
            try:
                os.kill(stopped["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert stopped, "the worker was never stopped"
    restarts = [event for event in RunDirectory(run_dir).events() if event["event"] == "restart"]
    assert len(restarts) == 1
    assert summary["rounds"] == 16
    assert [row["round"] for row in RunDirectory(run_dir).metrics()] == list(range(1, 17))
