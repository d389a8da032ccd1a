"""The real multi-process engine: 1 server + 3 workers on loopback (gloo), a few rounds."""

from __future__ import annotations

import math

import re
from pathlib import Path

import pytest
import torch

from entgan.algorithms.aggregation import DiscriminatorLayout
from entgan.api import load_generator
from entgan.engine.launch import launch_local
from entgan.models import build_discriminator, build_generator
from entgan.rundir import RunDirectory

from conftest import due_ranks, tiny_config, worker_digests

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "sequential"])
def test_run_synchronises_generator_and_completes_run_directory(tmp_path: Path, cache_dir: Path, overlap: bool) -> None:
    # Every worker in every round (participation 1), so every worker ends with the final G.
    config = tiny_config(control={"overlap": {"enabled": overlap}}, engine={"participation": 1.0, "start_timeout_s": 60, "round_timeout_s": 60})
    run_dir = tmp_path / "run"

    summary = launch_local(config, run_dir, cache_dir=cache_dir, show_progress=False)

    # Every worker ends with exactly the server's final G (layer-by-layer broadcast arrived whole).
    digests = worker_digests(run_dir)
    assert [d["rank"] for d in digests] == [1, 2, 3]
    for digest in digests:
        assert digest["generator_sum"] == pytest.approx(summary["generator_sum"], rel=1e-9, abs=1e-9)
    rows = RunDirectory(run_dir).metrics()
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    assert all(row["g_steps"] >= 1 for row in rows)
    # Training happened: G moved away from the initial weights the server built from the seed...
    torch.manual_seed(config.seed)
    initial = build_generator(config.model, config.image_shape, len(config.tasks)).state_dict()
    _, trained = load_generator(run_dir)
    for name, tensor in trained.state_dict().items():
        moved = (tensor - initial[name]).abs()
        # A few Adam steps of lr 2e-4 move a weight by thousandths; another initialisation by tenths.
        assert 0 < float(moved.max()) < 0.02, name
    # ...and every worker uploaded its D_k each round: trunk + its task's head in float32, at least
    # (a count by kind: the gossip of the whole D_k alone would pass a bound on the total).
    assert all(f"worker{rank}/d_loss" in row for row in rows for rank in (1, 2, 3))
    discriminator = build_discriminator(config.model, config.image_shape, len(config.tasks))
    upload_bytes = 4 * DiscriminatorLayout(discriminator).update_size
    for digest in digests:
        assert digest["bytes_sent/discriminator-update"] >= len(rows) * upload_bytes
    assert summary["server/bytes_received/discriminator-update"] >= 3 * len(rows) * upload_bytes
    # Evaluation rounds: 1, every 2, and the last.
    evaluated = [row["round"] for row in rows if "fid/low" in row]
    assert evaluated == [1, 2, 4]
    for row in rows:
        if "fid/low" in row:
            assert row["fid/low"] > 0 and 0 <= row["fidelity/high"] <= 1
    # The run directory is complete.
    for task in ("low", "high"):
        assert sorted(p.name for p in (run_dir / "samples" / task).iterdir()) == [
            "round-0001.png", "round-0002.png", "round-0004.png"]
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "plots" / "training.png").stat().st_size > 0
    assert (run_dir / "checkpoints" / "round-0002.pt").is_file()
    assert (run_dir / "checkpoints" / "latest.pt").is_file()
    _, generator = load_generator(run_dir)
    assert float(sum(t.double().sum() for t in generator.state_dict().values())) == pytest.approx(
        summary["generator_sum"])


def test_discriminator_sync_makes_workers_agree_and_gossip_moves_bytes(tmp_path: Path, cache_dir: Path) -> None:
    config = tiny_config(rounds=3, aggregation={"sync_every": 1}, engine={"participation": 1.0, "start_timeout_s": 60, "round_timeout_s": 60})
    run_dir = tmp_path / "run"

    launch_local(config, run_dir, cache_dir=cache_dir, show_progress=False)

    digests = worker_digests(run_dir)
    for digest in digests:
        assert digest["bytes_sent/gossip"] > 0  # the non-IID optimizer exchanged D_k with a peer
        assert digest["bytes_received/discriminator"] > 0  # initial sync + per-round syncs
    # per-round traffic: every worker received G each round
    assert len({d["bytes_received/generator"] for d in digests}) == 1


def test_same_seed_same_result(tmp_path: Path, cache_dir: Path) -> None:
    config = tiny_config(rounds=2, control={"overlap": {"enabled": False}})

    first = launch_local(config, tmp_path / "a", cache_dir=cache_dir, show_progress=False)
    second = launch_local(config, tmp_path / "b", cache_dir=cache_dir, show_progress=False)

    assert first["generator_sum"] == second["generator_sum"]
    assert first["final_eval"] == second["final_eval"]


def test_existing_run_directory_is_not_touched(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "precious.txt").write_text("keep me")

    from entgan.config import ConfigError

    with pytest.raises(ConfigError, match="already exists"):
        launch_local(tiny_config(), run_dir, cache_dir=cache_dir, show_progress=False)
    with pytest.raises(ConfigError, match="not an EntGAN run directory"):
        launch_local(tiny_config(), run_dir, overwrite=True, cache_dir=cache_dir, show_progress=False)
    assert (run_dir / "precious.txt").read_text() == "keep me"


def test_sampling_api_gives_task_conditioned_images(tmp_path: Path, cache_dir: Path) -> None:
    from entgan.api import sample_run

    launch_local(tiny_config(rounds=2), tmp_path / "run", cache_dir=cache_dir, show_progress=False)

    low = sample_run(tmp_path / "run", "low", 8, seed=0)
    high = sample_run(tmp_path / "run", "high", 8, seed=0)
    assert low.shape == (8, 1, 28, 28)
    assert low.min() >= -1 and low.max() <= 1
    assert not torch.equal(low, high)
    with pytest.raises(KeyError, match="unknown task"):
        sample_run(tmp_path / "run", "nope", 8)


def test_time_budget_ends_every_rank_after_the_same_round(tmp_path: Path, cache_dir: Path) -> None:
    config = tiny_config(
        rounds=500,
        stop={"time_budget_s": 3.0},
        eval={"every": 1000, "every_seconds": 0.5},
        engine={"participation": 1.0, "start_timeout_s": 60, "round_timeout_s": 60},  # every worker ends with the final G
    )
    run_dir = tmp_path / "run"

    summary = launch_local(config, run_dir, cache_dir=cache_dir, show_progress=False)

    assert summary["stopped_because"] == "time_budget"
    rows = RunDirectory(run_dir).metrics()
    assert 2 <= summary["rounds"] == len(rows) < 500
    # The stop is decided after the round that crossed the budget; one more round runs everywhere.
    crossed = next(row["round"] for row in rows if row["train_clock_s"] >= 3.0)
    assert rows[-1]["round"] == crossed + 1
    # Evaluated by time as well as at the first and the last round.
    evaluated = [row for row in rows if "fid/overall" in row]
    assert evaluated[0]["round"] == 1 and evaluated[-1]["round"] == rows[-1]["round"]
    # Between the first and the last, an evaluation whenever 0.5 s of training clock has passed.
    # The engine decides during a round (before G goes down), the rows record each round's end, so
    # a round without one ends less than 0.5 s plus its own length after the last evaluated one.
    for before, after in zip(rows, rows[1:]):
        since = after["train_clock_s"] - max(r["train_clock_s"] for r in evaluated if r["round"] <= before["round"])
        if "fid/overall" not in after:
            assert since < 0.5 + after["round_s"], after["round"]
    for digest in worker_digests(run_dir):  # the workers ran exactly as many rounds: same final G
        assert digest["generator_sum"] == pytest.approx(summary["generator_sum"], rel=1e-9, abs=1e-9)


def test_compression_halves_the_traffic_and_keeps_workers_in_step(tmp_path: Path, cache_dir: Path) -> None:
    every_worker = {"participation": 1.0, "start_timeout_s": 60, "round_timeout_s": 60}  # so every worker ends with the final G
    plain = launch_local(tiny_config(engine=every_worker), tmp_path / "plain", cache_dir=cache_dir, show_progress=False)
    config = tiny_config(engine=every_worker, control={"compression": {"enabled": True, "wire_dtype": "float16"}})

    compressed = launch_local(config, tmp_path / "half", cache_dir=cache_dir, show_progress=False)

    for kind in ("generator", "discriminator-update"):
        key = f"server/bytes_sent/{kind}" if kind == "generator" else f"server/bytes_received/{kind}"
        # The start-up sync is exact (float32); every round after it travels in half precision.
        assert compressed[key] < 0.75 * plain[key], kind
    for digest in worker_digests(tmp_path / "half"):  # G_k is G up to float16 rounding
        assert digest["generator_sum"] == pytest.approx(compressed["generator_sum"], rel=1e-2, abs=1e-2)
        assert digest["generator_abs_sum"] > 0


def test_int8_models_and_int8_changes_cut_the_traffic_to_a_quarter_and_still_train(
    tmp_path: Path, cache_dir: Path
) -> None:
    every_worker = {"participation": 1.0, "start_timeout_s": 60, "round_timeout_s": 60}
    plain = launch_local(tiny_config(engine=every_worker), tmp_path / "plain", cache_dir=cache_dir, show_progress=False)
    config = tiny_config(engine=every_worker, control={"compression": {"enabled": True}})  # int8, changes
    assert (config.control.compression.codec, config.control.compression.uploads) == ("int8", "changes")

    compressed = launch_local(config, tmp_path / "int8", cache_dir=cache_dir, show_progress=False)

    rounds = config.rounds
    for key in ("server/bytes_sent/generator", "server/bytes_sent/discriminator", "server/bytes_received/discriminator-update"):
        # After the exact start-up sync (a round's worth of float32 for G and D), each round moves
        # about a quarter of float32's bytes (int8 codes plus a float32 scale per 1,024 values).
        start = plain[key] / rounds if "update" not in key else 0.0
        per_round = (compressed[key] - start) / rounds
        assert per_round < 0.27 * (plain[key] - start) / rounds, key
    assert math.isfinite(compressed["final_eval"]["fid/overall"])
    rows = RunDirectory(tmp_path / "int8").metrics()
    assert all(row["refused_updates"] == 0 for row in rows if "refused_updates" in row)
    for digest in worker_digests(tmp_path / "int8"):  # G_k is G up to int8 rounding
        assert digest["generator_sum"] == pytest.approx(compressed["generator_sum"], rel=2e-2, abs=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("compression", "family"), [(False, "mlp"), (True, "mlp"), (True, "dcgan")], ids=["float32", "int8", "int8-dcgan"]
)
def test_edge_generator_sends_each_participants_g_change_up_and_still_trains(
    tmp_path: Path, cache_dir: Path, compression: bool, family: str
) -> None:
    # DCGAN: G's BatchNorm buffers travel in its change too, its step counter (an integer) among
    # them; with many steps a round that counter once set its int8 chunk's scale and sent a
    # BatchNorm variance below 0 (`parameters.change_since`).
    steps = {"worker_scheduler": {"d_steps": 40}} if family == "dcgan" else {}
    config = tiny_config(
        control={"edge_generator": {"enabled": True}, "compression": {"enabled": compression}, **steps},
        model={"family": family, "hidden_dim": 16 if family == "mlp" else 8},
    )
    generator_values = sum(p.numel() for p in build_generator(config.model, config.image_shape, 2).state_dict().values())

    summary = launch_local(config, tmp_path / "run", cache_dir=cache_dir, show_progress=False)

    uploads = sum(len(due_ranks(config, r)) for r in range(config.rounds))
    per_upload = summary["server/bytes_received/generator"] / uploads
    full = 4 * generator_values  # float32, plus the envelope's header and MAC
    assert full <= per_upload < 1.05 * full if not compression else 0.25 * full < per_upload < 0.27 * full
    assert math.isfinite(summary["final_eval"]["fid/overall"])
    rows = RunDirectory(tmp_path / "run").metrics()
    assert all(row["refused_updates"] == 0 for row in rows if "refused_updates" in row)
    tolerance = 2e-2 if compression else 1e-6  # the workers due next hold G as it was sent
    for digest in worker_digests(tmp_path / "run"):
        if digest["rank"] in due_ranks(config, config.rounds):
            assert digest["generator_sum"] == pytest.approx(summary["generator_sum"], rel=tolerance, abs=tolerance)


def test_edge_generator_without_server_g_steps_makes_g_the_mean_of_the_edge_steps(
    tmp_path: Path, cache_dir: Path
) -> None:
    """`control.edge_generator.server_g_steps: false`: the server only averages. It holds no G
    optimizer state and saves no activations, every round reports no G step, and G still
    reaches the workers due next exactly; the server's G steps, on, give a different G."""
    summaries = {}
    for server_g_steps in (True, False):
        edge = {"enabled": True, "server_g_steps": server_g_steps}
        config = tiny_config(control={"edge_generator": edge}, engine={"live_tensors": True})
        run_dir = tmp_path / f"server-g-steps-{server_g_steps}"
        summaries[server_g_steps] = launch_local(config, run_dir, cache_dir=cache_dir, show_progress=False)

    averaging_only = summaries[False]
    assert averaging_only["server_live_tensors"]["optimizer_state"] == 0
    assert averaging_only["server_live_tensors"]["peak_saved_activations"] == 0
    assert summaries[True]["server_live_tensors"]["optimizer_state"] > 0
    assert all(row["g_steps"] == 0 for row in RunDirectory(run_dir).metrics() if "g_steps" in row)
    assert averaging_only["generator_sum"] != summaries[True]["generator_sum"]
    assert math.isfinite(averaging_only["final_eval"]["fid/overall"])
    for digest in worker_digests(run_dir):
        if digest["rank"] in due_ranks(config, config.rounds):
            assert digest["generator_sum"] == pytest.approx(averaging_only["generator_sum"], rel=1e-6, abs=1e-6)


def test_straggler_aware_participation_leaves_the_slow_worker_out_but_not_for_long(
    tmp_path: Path, cache_dir: Path
) -> None:
    # Task "low" has workers 1-2, worker 1 declared 5x slower; task "high" worker 3 (always).
    config = tiny_config(engine={"straggler_aware": {"round_s": [5.0, 1.0, 1.0], "max_rounds_out": 2}})
    run_dir = tmp_path / "run"

    launch_local(config, run_dir, cache_dir=cache_dir, show_progress=False)

    rows = RunDirectory(run_dir).metrics()
    reporting = [sorted(int(m[1]) for key in row if (m := re.fullmatch(r"worker(\d+)/bytes_sent", key))) for row in rows]
    assert reporting == [[2, 3], [2, 3], [1, 3], [2, 3]]  # worker 1 only once it has sat out 2 rounds
    assert reporting == [due_ranks(config, r) for r in range(config.rounds)]


@pytest.mark.parametrize("algorithm", ["entgan", "flgan", "ren-parallel", "dgan-3"])
def test_declared_speeds_change_the_local_work_and_equal_speeds_change_nothing(
    algorithm: str, tmp_path: Path, cache_dir: Path
) -> None:
    """`engine.straggler_aware.speed` scales each worker's local steps (EntGAN's, Ren's and
    Distributed-GAN's D steps, FL-GAN's E): with every speed equal the run trains the same G to the
    bit as without speeds; with worker 1 at half speed it takes fewer steps, and G differs."""
    sums = {}
    for name, speed in (("none", None), ("equal", [2.0]), ("uneven", [0.5, 1.0, 1.0])):
        aware = {"round_s": [1.0], "max_rounds_out": 2, **({"speed": speed} if speed else {})}
        config = tiny_config(
            algorithm=algorithm,
            rounds=3,
            control={"worker_scheduler": {"d_steps": 4}},
            baselines={"flgan": {"local_steps": 4}},
            engine={"straggler_aware": aware},
        )
        sums[name] = launch_local(config, tmp_path / name, cache_dir=cache_dir, show_progress=False)["generator_sum"]
    assert sums["equal"] == sums["none"]
    assert sums["uneven"] != sums["none"]


def test_partial_participation_trains_the_scheduled_workers_and_keeps_them_in_step(
    tmp_path: Path, cache_dir: Path
) -> None:
    # Task "low" has workers 1-2 (one of them per round, in turn), task "high" worker 3 (always).
    config = tiny_config()  # participation 0.5 by default
    run_dir = tmp_path / "run"

    summary = launch_local(config, run_dir, cache_dir=cache_dir, show_progress=False)

    rows = RunDirectory(run_dir).metrics()
    reporting = [sorted(int(m[1]) for key in row if (m := re.fullmatch(r"worker(\d+)/bytes_sent", key))) for row in rows]
    assert reporting == [[1, 3], [2, 3], [1, 3], [2, 3]]
    digests = {d["rank"]: d for d in worker_digests(run_dir)}
    # The final G went to the workers due in the (never run) next round: 1 and 3. Worker 2 last
    # received G before its round 3 turn, so it holds an older one.
    for rank in (1, 3):
        assert digests[rank]["generator_sum"] == pytest.approx(summary["generator_sum"], rel=1e-9, abs=1e-9)
    assert digests[2]["generator_sum"] != pytest.approx(summary["generator_sum"], rel=1e-9, abs=1e-9)
    # A worker that sits out rounds uploads less than one that never does.
    assert digests[1]["bytes_sent/discriminator-update"] < digests[3]["bytes_sent/discriminator-update"]
