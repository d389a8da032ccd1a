"""Shared fixtures: tiny configs that run the real multi-process engine in seconds."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from entgan.config import RunConfig, parse_config
from entgan.engine.transport import Transport

torch.set_num_threads(1)


def tiny_config_data(**overrides: Any) -> dict[str, Any]:
    """Two tasks, three workers, small MLPs, a handful of rounds: a real run in a few seconds."""
    data: dict[str, Any] = {
        "name": "tiny",
        "seed": 3,
        "rounds": 4,
        "data": {"source": "mnist-subset", "max_per_class": 40},
        "tasks": [
            {"name": "low", "labels": [0, 1], "workers": 2},
            {"name": "high", "labels": [7, 8], "workers": 1},
        ],
        "model": {"family": "mlp", "latent_dim": 8, "hidden_dim": 16, "task_embedding_dim": 4},
        "optimizer": {"batch_size": 16},
        "eval": {"every": 2, "samples_per_task": 40, "classifier_epochs": 1, "grid_size": 16},
        "engine": {"start_timeout_s": 60, "round_timeout_s": 60},
        "checkpoint": {"every": 2},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def tiny_config(**overrides: Any) -> RunConfig:
    return parse_config(tiny_config_data(**overrides), origin="test")


def due_ranks(config: RunConfig, round_index: int) -> list[int]:
    """Ranks of the workers that take part in round `round_index` (0-based) under the config's
    partial participation; those due in round `config.rounds` received the run's final G."""
    from entgan.engine.registry import method_class

    participation = method_class(config.algorithm).round_participation(config)
    return [index + 1 for index in participation.workers(round_index)]


def worker_digests(run_dir: Path) -> list[dict[str, Any]]:
    """What each worker wrote about itself at the end of a run (rank, G's checksum, traffic), by rank."""
    return [json.loads(path.read_text()) for path in sorted((run_dir / "workers").glob("rank-*.json"))]


@pytest.fixture
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One classifier cache per test session (the classifier for the tiny data trains in ~1 s)."""
    return tmp_path_factory.getbasetemp() / "classifier-cache"


@pytest.fixture(scope="session")
def trained_tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (tasks low and high, server checkpoints after rounds 2 and 4), trained once
    per test session for the tests that read a real run directory (~10 s)."""
    from entgan.engine.launch import launch_local

    run_dir = tmp_path_factory.mktemp("trained-tiny") / "run"
    cache = tmp_path_factory.getbasetemp() / "classifier-cache"
    launch_local(tiny_config(), run_dir, cache_dir=cache, show_progress=False)
    return run_dir


@contextmanager
def gloo_transport(rank: int, store_dir: str, world_size: int) -> Iterator[Transport]:
    """In a process spawned by a test: join a gloo group of `world_size` on a file store in
    `store_dir` and yield this rank's transport; on leaving, wait for every rank and leave the group."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", store=dist.FileStore(f"{store_dir}/store", world_size), rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    yield Transport(rank, world_size, torch.device("cpu"))
    dist.barrier()
    dist.destroy_process_group()

