"""Starting a run: checks before any process exists, then K+1 processes on torch.distributed.

Two ways in, one code path per rank (`run_rank`):
- embedded (`entgan run CONFIG`): `launch_local` spawns the server and the K workers on this
  machine; they meet through a `FileStore` in a temporary directory, so no port is guessed;
- several machines (`torchrun ... -m entgan.run CONFIG`): torchrun starts one process per rank
  and provides the rendezvous through its environment variables.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from entgan.algorithms import algorithm_class
from entgan.config import ConfigError, RunConfig
from entgan.data import build_tasks, load_source, worker_shards
from entgan.engine.context import RunContext
from entgan.engine.roles import serve, work
from entgan.engine.transport import Transport
from entgan.metrics.classifier import DomainClassifier, train_domain_classifier
from entgan.models import check_model_supports
from entgan.rundir import SUMMARY_FILE, RunDirectory


def default_cache_dir() -> Path:
    """Trained domain classifiers are cached here (override with ENTGAN_CACHE_DIR)."""
    return Path(os.environ.get("ENTGAN_CACHE_DIR", Path.home() / ".cache" / "entgan"))


def preflight(config: RunConfig) -> None:
    """Everything that can be checked before spawning: data readable, tasks present, shards
    non-empty, model family fits the image shape. Raises ConfigError / DataError."""
    try:
        check_model_supports(config.model, config.image_shape, len(config.tasks))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    source = load_source(config.data)
    tasks = build_tasks(config, source)
    worker_shards(config, tasks)


def domain_classifier(config: RunConfig, cache_dir: Path | None = None) -> DomainClassifier:
    """The classifier whose feature space FID is measured in, trained on all tasks' real data."""
    tasks = build_tasks(config, load_source(config.data))
    images = torch.cat([task.dataset.images for task in tasks])
    labels = torch.cat([task.dataset.labels for task in tasks])
    return train_domain_classifier(
        images,
        labels,
        num_classes=int(labels.max()) + 1,
        epochs=config.eval.classifier_epochs,
        seed=config.seed,
        cache_dir=cache_dir or default_cache_dir(),
    )


def select_backend(config: RunConfig, local_world_size: int) -> str:
    """`auto`: NCCL only when every process on this machine gets a GPU of its own (NCCL refuses
    two ranks on one device), otherwise gloo on the CPU."""
    if config.engine.backend == "auto":
        return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local_world_size else "gloo"
    if config.engine.backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("engine.backend: 'nccl' needs CUDA, and no CUDA device is available (use 'gloo' or 'auto')")
    return config.engine.backend


def run_rank(
    config: RunConfig, rank: int, world_size: int, run_dir: Path, cache_dir: Path | None, show_progress: bool
) -> None:
    """One rank's whole life inside an initialised process group of `config.world_size` ranks
    (both launchers check the world size before they initialise the group)."""
    torch.set_num_threads(config.engine.threads_per_process)
    _shorten_timeout(config.engine.round_timeout_s)
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    context = RunContext(
        config=config,
        rank=rank,
        world_size=world_size,
        device=device,
        transport=Transport(rank, world_size, device),
        run_dir=run_dir,
    )
    algorithm = algorithm_class(config.algorithm)(context)
    if context.is_server:
        serve(context, algorithm, domain_classifier(config, cache_dir), show_progress=show_progress)
    else:
        work(context, algorithm)
    dist.barrier()


def _shorten_timeout(seconds: float) -> None:
    """After start-up, a stuck peer should surface within the per-round timeout, not the start one."""
    dist.barrier()
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if set_timeout is not None:
        set_timeout(datetime.timedelta(seconds=seconds))


def _spawned_rank(
    rank: int,
    world_size: int,
    config_data: dict[str, Any],
    run_dir: str,
    store_path: str,
    cache_dir: str | None,
    show_progress: bool,
) -> None:
    config = RunConfig.model_validate(config_data)
    if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # embedded runs stay on loopback
    dist.init_process_group(
        backend=select_backend(config, local_world_size=world_size),
        store=dist.FileStore(store_path, world_size),
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=config.engine.start_timeout_s),
    )
    try:
        run_rank(
            config, rank, world_size, Path(run_dir), Path(cache_dir) if cache_dir else None, show_progress and rank == 0
        )
    finally:
        dist.destroy_process_group()


def launch_local(
    config: RunConfig,
    run_dir: Path,
    *,
    overwrite: bool = False,
    cache_dir: Path | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Check, create the run directory, spawn 1 server + K workers here, wait; return the summary."""
    preflight(config)
    RunDirectory.check_available(run_dir, overwrite=overwrite)  # before minutes of classifier training
    domain_classifier(config, cache_dir)  # trained (or loaded) once, before the clock starts
    run = RunDirectory.create(run_dir, config, overwrite=overwrite)
    with tempfile.TemporaryDirectory(prefix="entgan-rendezvous-") as rendezvous:
        mp.start_processes(
            _spawned_rank,
            args=(
                config.world_size,
                config.model_dump(mode="json"),
                str(run.root),
                os.path.join(rendezvous, "store"),
                str(cache_dir) if cache_dir else None,
                show_progress,
            ),
            nprocs=config.world_size,
            join=True,
            start_method="spawn",
        )
    return json.loads((run.root / SUMMARY_FILE).read_text())

