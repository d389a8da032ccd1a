"""`entgan generate` and `entgan evaluate`: the streaming image-folder writer, its reproducibility
and round trip through EntGAN's own image-folder source, the resolver of run directories and jobs,
and the train-on-synthetic / test-on-real score."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from entgan import cli
from entgan.config import DataConfig, RunConfig
from entgan.data import load_source
from entgan.deployed import LoadedModel, load_model, resolve
from entgan.export import MANIFEST, export_images, read_manifest, task_latents
from entgan.lifelong import Jobs
from entgan.models import build_generator
from entgan.rundir import RunDirectory

from conftest import tiny_config

# ------------------------------------------------------------------------------------- helpers


def untrained_run(root: Path, config: RunConfig | None = None, seed: int = 0, round_number: int = 1) -> Path:
    """A run directory in the engine's own format whose checkpoint holds a freshly initialised G
    (no training: these tests are about what is done with a checkpoint, not how it was made)."""
    config = config or tiny_config()
    torch.manual_seed(seed)
    generator = build_generator(config.model, config.image_shape, len(config.tasks))
    run = RunDirectory(root) if (root / "config.yaml").is_file() else RunDirectory.create(root, config)
    state = {"format": 2, "round": round_number, "config": config.model_dump(mode="json"),
             "server": {"generator": generator.state_dict()}}
    run.save_checkpoint(state, round_number)
    return root


@pytest.fixture
def model(tmp_path: Path) -> LoadedModel:
    return load_model(untrained_run(tmp_path / "run"))


def files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# ------------------------------------------------------------------------------- the writer


def test_writer_asks_for_at_most_one_batch_at_a_time(model: LoadedModel, tmp_path: Path) -> None:
    requested: list[int] = []
    forward = model.generator.forward
    model.generator.forward = lambda z, task: requested.append(z.shape[0]) or forward(z, task)  # type: ignore[method-assign]
    written: list[int] = []

    report = export_images(model, tmp_path / "out", 50, seed=1, batch_size=8, progress=written.append)

    assert max(requested) == 8 and sum(requested) == 100  # 2 tasks x 50, never more than a batch
    assert sum(written) == 100
    assert report.complete and report.tasks == ["low", "high"] and report.labels == {"high": 0, "low": 1}
    for task in ("low", "high"):
        names = files(tmp_path / "out" / task)
        assert names == [f"{i:06d}.png" for i in range(50)]  # no temporary names left
        with Image.open(tmp_path / "out" / task / names[0]) as image:
            assert image.size == (28, 28) and image.mode == "L"
    assert read_manifest(tmp_path / "out")["complete"] is True


def test_same_seed_same_bytes_whatever_the_batch_size_or_task_selection(model: LoadedModel, tmp_path: Path) -> None:
    export_images(model, tmp_path / "a", 20, seed=7, batch_size=6)
    export_images(model, tmp_path / "b", 20, seed=7, batch_size=20, tasks=["high"])
    export_images(model, tmp_path / "c", 20, seed=8, batch_size=6)

    for name in files(tmp_path / "a" / "high"):
        assert (tmp_path / "a" / "high" / name).read_bytes() == (tmp_path / "b" / "high" / name).read_bytes()
    differ = [(tmp_path / "a" / "high" / n).read_bytes() != (tmp_path / "c" / "high" / n).read_bytes()
              for n in files(tmp_path / "a" / "high")]
    assert all(differ)
    # Latent codes across a block boundary equal those drawn in one piece.
    whole = task_latents(8, "low", 3, 1000, 50)
    assert torch.equal(whole, torch.cat([task_latents(8, "low", 3, 1000, 24), task_latents(8, "low", 3, 1024, 26)]))


def test_round_trip_through_the_image_folder_source(model: LoadedModel, tmp_path: Path) -> None:
    export_images(model, tmp_path / "out", 12, seed=5, batch_size=5)

    data = load_source(DataConfig(source="image-folder", path=tmp_path / "out", image_size=28, channels=1))

    assert len(data) == 24 and data.classes() == [0, 1]  # sorted folders: high = 0, low = 1
    expected = torch.cat([model.sample("high", 12, seed=5), model.sample("low", 12, seed=5)])
    quantised = ((expected + 1) * 127.5).round().clamp(0, 255) / 255.0 * 2 - 1
    assert torch.allclose(data.images, quantised, atol=1e-6)
    assert data.labels.tolist() == [0] * 12 + [1] * 12


def test_output_folder_is_refused_unless_an_earlier_export_and_overwrite(model: LoadedModel, tmp_path: Path) -> None:
    from entgan.config import ConfigError

    export_images(model, tmp_path / "out", 3)
    with pytest.raises(ConfigError, match="not empty"):
        export_images(model, tmp_path / "out", 3)
    export_images(model, tmp_path / "out", 2, overwrite=True, tasks=["low"])
    assert files(tmp_path / "out") == [MANIFEST, "low"] and len(files(tmp_path / "out" / "low")) == 2

    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an EntGAN export"):
        export_images(model, other, 3, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"


def test_an_interrupted_export_leaves_only_whole_images(
    model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import entgan.export as export

    encode, calls = export.png_bytes, []

    def interrupted(pixels: np.ndarray) -> bytes:
        calls.append(1)
        if len(calls) == 15:
            raise KeyboardInterrupt
        return encode(pixels)

    monkeypatch.setattr(export, "png_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_images(model, tmp_path / "out", 20, batch_size=4)

    names = files(tmp_path / "out" / "low")
    assert len(names) == 14 and not [n for n in names if n.startswith(".")]
    for name in names:
        with Image.open(tmp_path / "out" / "low" / name) as image:
            image.load()
    assert read_manifest(tmp_path / "out")["complete"] is False


def test_cli_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = untrained_run(tmp_path / "run")

    def refused(*args: str) -> str:
        assert cli.main(list(args)) == 2
        return capsys.readouterr().err

    assert "unknown task 'nope'" in refused("generate", str(run), "--task", "nope", "-n", "3", "--out", str(tmp_path / "o"))
    assert "-n must be at least 1" in refused("generate", str(run), "-n", "0", "--out", str(tmp_path / "o"))
    assert "no such run directory" in refused(
        "generate", str(tmp_path / "missing"), "-n", "3", "--out", str(tmp_path / "o"), "--root", str(tmp_path / "jobs"))
    assert "not an EntGAN run directory" in refused("evaluate", str(tmp_path))
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------- resolution


def test_a_job_name_means_its_deployed_version(tmp_path: Path) -> None:
    first = untrained_run(tmp_path / "v1", seed=1)
    second = untrained_run(tmp_path / "v2", seed=2)
    edge = tmp_path / "edge"
    (edge / "low").mkdir(parents=True)
    spec = {"name": "digits", "edge": {"root": str(edge)},
            "trigger": {"conditions": [{"kind": "samples", "at_least": 5}]}}
    (tmp_path / "job.yaml").write_text(json.dumps(spec))
    with Jobs(tmp_path / "jobs") as jobs:
        jobs.create(tmp_path / "job.yaml")
        with pytest.raises(Exception, match="no deployed version yet"):
            resolve("digits", jobs_root=tmp_path / "jobs")
        store, job = jobs.store, jobs.job("digits")
        with store.transaction() as db:  # what the controller records for a trained, deployed version
            for run in (first, second):
                store.add_version(db, job, None, str(RunDirectory(run).latest_checkpoint()), str(run), [], {}, 1.0)
            store.mark_deployed(db, "digits", 2, 2.0)

    model = load_model("digits", jobs_root=tmp_path / "jobs")

    assert model.label == "digits v2" and model.resolved.job_version == 2
    assert torch.equal(model.sample("low", 4, seed=0), load_model(second).sample("low", 4, seed=0))
    with pytest.raises(Exception, match="no job named 'other'"):
        resolve("other", jobs_root=tmp_path / "jobs")


def test_a_run_directory_means_its_newest_complete_checkpoint(tmp_path: Path) -> None:
    run = untrained_run(tmp_path / "run", seed=1, round_number=2)
    untrained_run(run, seed=2, round_number=4)
    (run / "checkpoints" / ".round-0006.pt.abc.tmp").write_bytes(b"half a checkpoint")

    resolved = resolve(run)

    assert resolved.label == "run round 4" and resolved.checkpoint.name == "round-0004.pt"
    (run / "checkpoints" / "round-0006.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="not a readable EntGAN checkpoint"):
        load_model(run)


# ------------------------------------------------------------------------------- a real run


def entgan(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "entgan.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.slow
def test_generate_2000_images_of_a_trained_run_read_back_as_a_data_source(
    trained_tiny_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "synthetic"

    done = entgan("generate", str(trained_tiny_run), "--task", "high", "-n", "2000", "--out", str(out),
                  "--no-progress", "--threads", "1")

    assert done.returncode == 0, done.stderr
    assert "wrote 2000 images of task 'high'" in done.stdout and "run round 4" in done.stdout
    assert len(list((out / "high").glob("*.png"))) == 2000
    data = load_source(DataConfig(source="image-folder", path=out, image_size=28, channels=1))
    assert len(data) == 2000 and data.images.shape == (2000, 1, 28, 28)


@pytest.mark.slow
def test_utility_score_of_a_trained_run_is_deterministic_and_on_unseen_images(trained_tiny_run: Path) -> None:
    from entgan.utility import evaluate_utility

    model = load_model(trained_tiny_run)
    settings = {"samples_per_task": 30, "epochs": 1, "seed": 2, "max_test_per_task": 100, "min_steps": 10}

    first = evaluate_utility(model, **settings)
    second = evaluate_utility(model, **settings)

    assert first.as_dict() == second.as_dict()
    assert first.test_disjoint and "beyond data.max_per_class=40" in first.test_data
    assert first.tasks == ["low", "high"] and first.test_per_task == {"low": 100, "high": 100}
    assert first.train_per_task == 30
    assert 0.0 <= first.synthetic <= 1.0 and first.real is not None and 0.0 <= first.real <= 1.0


def test_score_needs_two_tasks_and_falls_back_to_seen_images_when_nothing_is_held_out(tmp_path: Path) -> None:
    from entgan.data.errors import DataError
    from entgan.utility import evaluate_utility, held_out_reals

    single = load_model(untrained_run(tmp_path / "one", tiny_config(tasks=[{"name": "low", "labels": [0, 1]}])))
    with pytest.raises(DataError, match="has one task"):
        evaluate_utility(single)
    config = tiny_config(data={"source": "sklearn-digits", "max_per_class": None})
    reals = held_out_reals(config, seed=0)
    assert not reals.disjoint and "seen" in reals.description
    assert reals.test["low"].shape[0] + reals.train["low"].shape[0] == 360  # 178 zeros + 182 ones
