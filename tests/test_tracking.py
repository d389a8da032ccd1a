"""TensorBoard event files of a run (`entgan.tracking`), read back the way TensorBoard reads them.

Fast tests drive the tracker with hand-made rows; the slow one reads the files of a real run and
of its resumption.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from entgan.config import ConfigError, parse_config
from entgan.engine.launch import launch_local, resume_local
from entgan.rundir import RunDirectory
from entgan.tracking import TENSORBOARD_DIR, RunTracker, check_tracking, tensorboard_run_name

from conftest import tiny_config, tiny_config_data


def read_events(log_dir: Path) -> EventAccumulator:
    """Everything in a TensorBoard run folder, with TensorBoard's own reader (nothing sampled away)."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def steps(events: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in events.Scalars(tag)]


def row(round_number: int, **figures: float) -> dict[str, Any]:
    return {"round": round_number, "g_loss": 0.5 + round_number, "server/bytes_sent": 1000 * round_number, **figures}


def grids(count: int = 4) -> dict[str, torch.Tensor]:
    return {"low": torch.rand(count, 1, 8, 8) * 2 - 1, "high": torch.rand(count, 1, 8, 8) * 2 - 1}


def test_rounds_become_scalars_and_grids_become_images(tmp_path: Path) -> None:
    config = tiny_config()
    tracker = RunTracker.open(config, tmp_path, "entgan")

    tracker.log_round(row(1, **{"fid/overall": 300.0, "fid/low": 310.0, "fidelity/low": 0.25}), grids())
    tracker.log_round(row(2, disagreement=float("nan")) | {"note": "not a number", "flag": True})
    tracker.log_round(row(3, **{"fid/overall": 200.0, "fid/low": 190.0, "fidelity/low": 0.75}), grids())
    tracker.close()

    log_dir = tmp_path / TENSORBOARD_DIR / tensorboard_run_name("entgan", config.seed)
    assert tracker.log_dir is None and log_dir == tmp_path / "tb" / "entgan-seed3"
    events = read_events(log_dir)
    tags = events.Tags()
    assert {"g_loss", "server/bytes_sent", "fid/overall", "fid/low", "fidelity/low", "disagreement"} <= set(
        tags["scalars"]
    )
    assert "round" not in tags["scalars"] and "note" not in tags["scalars"] and "flag" not in tags["scalars"]
    assert steps(events, "g_loss") == [1, 2, 3]
    assert steps(events, "fid/overall") == [1, 3]
    assert [event.value for event in events.Scalars("fid/low")] == [310.0, 190.0]
    assert set(tags["images"]) == {"samples/low", "samples/high"}
    images = events.Images("samples/low")
    assert [image.step for image in images] == [1, 3]
    # 4 images of 8x8 in a 2x2 grid, 2 pixels around each (2 + 8 + 2 + 8 + 2), PNG-encoded.
    assert (images[0].width, images[0].height) == (22, 22) and images[0].encoded_image_string.startswith(b"\x89PNG")
    assert "config/text_summary" in tags["tensors"]  # the resolved config, once


def test_a_resumed_tracker_hides_the_rounds_written_after_the_checkpoint(tmp_path: Path) -> None:
    config = tiny_config()
    first = RunTracker.open(config, tmp_path, "entgan")
    for number in range(1, 6):  # the first attempt got to round 5; its last checkpoint is round 2
        first.log_round(row(number, **{"fid/overall": 100.0 * number}))
    first.close()

    resumed = RunTracker.open(config, tmp_path, "entgan", resume_round=2)
    for number in range(3, 7):
        resumed.log_round(row(number, **{"fid/overall": -1.0 * number}))
    resumed.close()

    events = read_events(tmp_path / "tb" / "entgan-seed3")
    assert steps(events, "fid/overall") == [1, 2, 3, 4, 5, 6]
    assert [event.value for event in events.Scalars("fid/overall")] == [100.0, 200.0, -3.0, -4.0, -5.0, -6.0]
    assert len(events.Tensors("config/text_summary")) == 1  # written by the fresh start only


def test_tracking_off_writes_nothing_and_never_imports_tensorboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it now raises
    config = tiny_config(tracking={"tensorboard": False})

    tracker = RunTracker.open(config, tmp_path, "entgan")
    tracker.log_round(row(1, **{"fid/overall": 1.0}), grids())
    tracker.close()

    assert not tracker.enabled and not (tmp_path / "tb").exists()


def test_tracking_config_is_typed_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tiny_config().tracking.tensorboard is True  # on by default
    with pytest.raises(ConfigError, match="tracking.tensorbord: unknown field"):
        parse_config(tiny_config_data(tracking={"tensorbord": False}))
    with pytest.raises(ConfigError, match="tracking.tensorboard"):
        parse_config(tiny_config_data(tracking={"tensorboard": "sometimes"}))

    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # as if it were not installed
    with pytest.raises(ConfigError, match="'tensorboard' package is not installed"):
        check_tracking(tiny_config().tracking)
    check_tracking(tiny_config(tracking={"tensorboard": False}).tracking)


@pytest.mark.slow
def test_a_run_and_its_resumption_write_one_tensorboard_run(tmp_path: Path, cache_dir: Path) -> None:
    config = tiny_config(rounds=6, checkpoint={"every": 2}, eval={"every": 2})
    run_dir = tmp_path / "run"
    launch_local(config, run_dir, cache_dir=cache_dir, show_progress=False)
    log_dir = run_dir / "tb" / "entgan-seed3"
    written = read_events(log_dir)
    fid_tags = {"fid/overall", "fid/low", "fid/high", "fidelity/low", "fidelity/high"}
    assert fid_tags <= set(written.Tags()["scalars"])
    assert steps(written, "fid/overall") == [1, 2, 4, 6]
    assert steps(written, "g_loss") == [1, 2, 3, 4, 5, 6]
    assert [image.step for image in written.Images("samples/high")] == [1, 2, 4, 6]
    assert written.Images("samples/low")[-1].encoded_image_string.startswith(b"\x89PNG")

    # As if the run had died during round 6: resume from round 4 and write rounds 5 and 6 again.
    for path in (run_dir / "checkpoints").glob("round-0006*.pt"):
        path.unlink()
    resumed = resume_local(run_dir, cache_dir=cache_dir, show_progress=False)

    assert resumed["resumed_from_round"] == 4
    events = read_events(log_dir)
    assert steps(events, "g_loss") == [1, 2, 3, 4, 5, 6]  # not 1..6, 5, 6
    assert steps(events, "fid/overall") == [1, 2, 4, 6]
    assert [image.step for image in events.Images("samples/low")] == [1, 2, 4, 6]
    rows = RunDirectory(run_dir).metrics()
    assert [event.value for event in events.Scalars("fid/overall")] == pytest.approx(
        [r["fid/overall"] for r in rows if "fid/overall" in r]
    )
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2  # one file per attempt, one run
