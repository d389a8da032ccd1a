"""Configuration errors name the field and what was wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from entgan.config import ConfigError, load_config, parse_config
from entgan.engine.launch import select_backend

from conftest import tiny_config, tiny_config_data


def test_defaults_are_spelled_out_and_round_trip(tmp_path: Path) -> None:
    config = parse_config(tiny_config_data())
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml())

    assert load_config(path) == config
    assert config.world_size == 4
    assert config.worker_tasks() == [0, 0, 1]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"bogus": 1}, "bogus: unknown field"),
        ({"rounds": "many"}, "rounds"),
        ({"rounds": 0}, "rounds"),
        ({"model": {"family": "transformer"}}, "model.family"),
        ({"tasks": []}, "tasks"),
        ({"tasks": [{"name": "a", "labels": [0], "workers": 0}]}, "tasks.0.workers"),
        ({"tasks": [{"name": "a", "labels": [0]}, {"name": "a", "labels": [1]}]}, "duplicated: ['a']"),
        ({"tasks": [{"name": "a", "labels": [1, 1]}]}, "tasks.0.labels"),
        ({"data": {"source": "idx"}}, "data.path is required"),
        ({"data": {"image_size": 30}}, "data.image_size"),
        ({"control": {"server_scheduler": {"min_g_steps": 5, "g_steps": 2}}}, "min_g_steps"),
        ({"control": {"compression": {"codec": "zip"}}}, "control.compression.codec"),
        (
            {"control": {"compression": {"enabled": True}}, "aggregation": {"sync_every": 2}},
            "uploads: changes needs aggregation.sync_every: 1",
        ),
        (
            {"control": {"edge_generator": {"enabled": True}}, "privacy": {"enabled": True}},
            "control.edge_generator needs privacy.enabled: false",
        ),
        ({"control": {"edge_generator": {"server_g_steps": False}}}, "server_g_steps: false needs enabled: true"),
        (
            {
                "control": {"edge_generator": {"enabled": True, "server_g_steps": False}},
                "warm_start": {"checkpoint": "parent.pt"},
            },
            "warm_start needs control.edge_generator.server_g_steps: true",
        ),
    ],
)
def test_bad_config_is_rejected_with_the_field_named(change: dict, expected: str) -> None:
    data = {**tiny_config_data(), **change}

    with pytest.raises(ConfigError) as error:
        parse_config(data, origin="bad.yaml")

    assert "bad.yaml" in str(error.value)
    assert expected in str(error.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("tasks: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(scalar)


@pytest.mark.parametrize(
    ("backend", "processes", "gpus", "expected"),
    [("auto", 3, 0, "gloo"), ("auto", 3, 1, "gloo"), ("auto", 3, 4, "nccl"), ("gloo", 3, 4, "gloo"), ("nccl", 3, 3, "nccl")],
)
def test_backend_follows_the_gpus_each_process_can_have(backend: str, processes: int, gpus: int, expected: str) -> None:
    config = tiny_config(engine={"backend": backend})
    assert select_backend(config, local_world_size=processes, cuda_devices=gpus) == expected


@pytest.mark.parametrize(
    ("gpus", "message"),
    [(0, "needs CUDA, and no CUDA device is available"),
     (1, "needs a GPU for each of the 3 processes on this machine, and 1 GPU\\(s\\) are visible")],
)
def test_nccl_without_a_gpu_per_process_is_refused_before_anything_starts(gpus: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        select_backend(tiny_config(engine={"backend": "nccl"}), local_world_size=3, cuda_devices=gpus)


@pytest.mark.parametrize(("wire_dtype", "codec"), [("float16", "fp16"), ("bfloat16", "bf16")])
def test_a_config_written_with_a_wire_dtype_keeps_running_as_it_did(wire_dtype: str, codec: str) -> None:
    # Run directories and knowledge bases hold configs from before codecs: half precision for
    # everything, D_k uploaded whole.
    data = {**tiny_config_data(), "control": {"compression": {"enabled": True, "wire_dtype": wire_dtype}}}

    compression = parse_config(data).control.compression

    assert (compression.codec, compression.uploads) == (codec, "models")
