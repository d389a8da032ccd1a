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
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from entgan.config import ConfigError, RunConfig
from entgan.data import build_tasks, load_source, worker_shards
from entgan.engine.context import SERVER_RANK, RunContext
from entgan.engine.method import Method
from entgan.engine.processes import LauncherSurroundings, start_method
from entgan.engine.registry import load_method, method_class
from entgan.engine.roles import serve, work
from entgan.engine.security import load_secret, server_handshake, worker_handshake
from entgan.engine.timeline import Timeline, timeline_path
from entgan.engine.transport import Transport
from entgan.metrics.classifier import DomainClassifier, load_domain_classifier, train_domain_classifier
from entgan.models import check_model_supports
from entgan.rundir import SUMMARY_FILE, RunDirectory
from entgan.tracking import check_tracking


def default_cache_dir() -> Path:
    """Trained domain classifiers are cached here (override with ENTGAN_CACHE_DIR)."""
    return Path(os.environ.get("ENTGAN_CACHE_DIR", Path.home() / ".cache" / "entgan"))


def preflight(config: RunConfig, algorithm_path: str | None = None, *, resuming: bool = False) -> None:
    """Everything that can be checked before spawning: the method exists and supports what the
    config asks of it, data readable, tasks present, shards non-empty, model family fits the
    image shape, the tracker's package installed. Raises ConfigError / DataError."""
    check_capabilities(config, load_algorithm(config, algorithm_path), resuming=resuming)
    try:
        check_model_supports(config.model, config.image_shape, len(config.tasks))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    check_tracking(config.tracking)
    source = load_source(config.data)
    tasks = build_tasks(config, source)
    worker_shards(config, tasks)


def domain_classifier(
    config: RunConfig, cache_dir: Path | None = None, classifier_file: Path | None = None
) -> DomainClassifier:
    """The classifier whose feature space FID is measured in: the one stored at `classifier_file`
    when given (so that runs are measured on one scale, e.g. a lifelong job's), else one trained on
    all tasks' real data (cached in `cache_dir`)."""
    tasks = build_tasks(config, load_source(config.data))
    labels = torch.cat([task.dataset.labels for task in tasks])
    if classifier_file is not None:
        return _stored_classifier(classifier_file, config, int(labels.max()) + 1)
    images = torch.cat([task.dataset.images for task in tasks])
    return train_domain_classifier(
        images,
        labels,
        num_classes=int(labels.max()) + 1,
        epochs=config.eval.classifier_epochs,
        seed=config.eval.classifier_seed,
        cache_dir=cache_dir or default_cache_dir(),
    )


def _stored_classifier(path: Path, config: RunConfig, num_labels: int) -> DomainClassifier:
    try:
        classifier = load_domain_classifier(path)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if classifier.image_shape != config.image_shape or classifier.num_classes < num_labels:
        raise ConfigError(
            f"{path}: classifier for images {classifier.image_shape} and {classifier.num_classes} classes; "
            f"the run has images {config.image_shape} and labels up to {num_labels - 1}"
        )
    return classifier


def select_backend(config: RunConfig, local_world_size: int, cuda_devices: int | None = None) -> str:
    """The process group's backend for `local_world_size` processes on this machine, which has
    `cuda_devices` GPUs (default: those torch sees). `auto`: NCCL only when every process gets a GPU
    of its own, otherwise gloo on the CPU. `nccl` where that does not hold is refused: NCCL stops
    two ranks on one device ("Duplicate GPU detected")."""
    if cuda_devices is None:
        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if config.engine.backend == "auto":
        return "nccl" if cuda_devices >= local_world_size else "gloo"
    if config.engine.backend == "nccl":
        if cuda_devices == 0:
            raise ConfigError("engine.backend: 'nccl' needs CUDA, and no CUDA device is available (use 'gloo' or 'auto')")
        if cuda_devices < local_world_size:
            raise ConfigError(
                f"engine.backend: 'nccl' needs a GPU for each of the {local_world_size} processes on this machine, "
                f"and {cuda_devices} GPU(s) are visible; NCCL refuses two ranks on one GPU. Use 'auto' or 'gloo' "
                "here, or torchrun across machines with at most one process per GPU"
            )
    return config.engine.backend


@dataclass(frozen=True)
class LaunchOptions:
    """How the processes of a run are started (the same for every rank)."""

    cache_dir: Path | None = None
    show_progress: bool = True
    resume: bool = False
    """Continue from the run directory's last complete checkpoint (fresh start if there is none)."""
    algorithm_path: str | None = None
    """`module:Class` of a `Method` subclass to run instead of `config.algorithm`: bring your
    own method (experiments, tests); the module must be importable by every process."""
    classifier_file: Path | None = None
    """A stored domain classifier to measure FID with, instead of one trained on the run's data."""


def run_rank(config: RunConfig, rank: int, world_size: int, run_dir: Path, options: LaunchOptions, secret: bytes) -> None:
    """One rank's whole life inside an initialised process group of `config.world_size` ranks
    (both launchers check the world size before they initialise the group).

    Before any parameter moves, every worker proves to the server that it holds the job secret,
    and the server proves it to the worker (`engine.security`). Then the ranks agree on the round
    to resume from (0: a fresh start) and each loads its own part of that checkpoint."""
    torch.set_num_threads(config.engine.threads_per_process)
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    run = RunDirectory(run_dir)
    run.record_pid(rank)
    transport = Transport(rank, world_size, device)
    workers = list(range(1, world_size))
    if rank == SERVER_RANK:
        session_keys = server_handshake(transport, workers, secret, config.name)
    else:
        session_keys = {SERVER_RANK: worker_handshake(transport, rank, secret, config.name)}
    resume_round = _agree_on_resume_round(transport, run, workers, options.resume)
    if config.engine.timeline:
        transport.timeline = Timeline(
            rank,
            world_size,
            timeline_path(run_dir, rank, resume_round),
            first_round=resume_round,
            bytes_sent_before=transport.counters.bytes_sent,
            bytes_received_before=transport.counters.bytes_received,
        )
    _shorten_timeout(config.engine.round_timeout_s)
    method = load_algorithm(config, options.algorithm_path)
    context = RunContext(
        config=config,
        rank=rank,
        world_size=world_size,
        device=device,
        transport=transport,
        run_dir=run_dir,
        participation=method.round_participation(config),
        session_keys=session_keys,
        resume=run.load_checkpoint(resume_round, rank) if resume_round else None,
    )
    if context.is_server:
        if options.resume:  # rows past the checkpoint resumed from (all of them, if there is none) go
            run.truncate_metrics(resume_round)
        if resume_round:
            context.log_event({"event": "resumed", "round": resume_round})
        classifier = domain_classifier(config, options.cache_dir, options.classifier_file)
        serve(context, method, classifier, show_progress=options.show_progress)
    else:
        work(context, method)
    dist.barrier()


def load_algorithm(config: RunConfig, algorithm_path: str | None = None) -> type[Method]:
    """The run's method: `config.algorithm` from the registry, or the class at `algorithm_path`."""
    try:
        return method_class(config.algorithm) if algorithm_path is None else load_method(algorithm_path)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_capabilities(config: RunConfig, method: type[Method], *, resuming: bool = False) -> None:
    """Refuse, before any process exists, a run that asks a method for what it does not declare
    (`Method.capabilities`). Both launchers and the torchrun entry call this."""
    capabilities = method.capabilities
    problems = []
    if (resuming or config.faults.max_restarts > 0) and not capabilities.resume:
        what = "resume from a checkpoint" if resuming else f"restart after a failure (faults.max_restarts = {config.faults.max_restarts})"
        problems.append(f"algorithm '{method.name}' cannot {what}: it does not support resuming")
    if config.privacy.enabled and not capabilities.privacy:
        problems.append(f"privacy.enabled: algorithm '{method.name}' does not support differential privacy")
    share = method.participation(config)
    if share < 1 and not capabilities.partial_participation:
        problems.append(
            f"engine.participation: algorithm '{method.name}' cannot leave workers out of a round "
            f"(participation {share:g}; it needs 1)"
        )
    if config.warm_start is not None and not capabilities.warm_start:
        problems.append(f"warm_start: algorithm '{method.name}' cannot start from a parent run")
    if problems:
        raise ConfigError("; ".join(problems))


def _agree_on_resume_round(transport: Transport, run: RunDirectory, workers: list[int], resume: bool) -> int:
    """The server picks the last checkpoint that every rank has (it sees the workers' files when
    they share its disk; across machines, its own, and each worker checks it has that round)."""
    decision = torch.zeros(1, dtype=torch.int64, device=transport.device)
    if transport.rank == SERVER_RANK:
        if resume:
            visible = [rank for rank in workers if run.checkpoint_rounds(rank)]
            decision.fill_(run.latest_complete_round(visible if visible else []))
        transport.send_to_many([decision], workers, "control").wait()
    else:
        transport.receive([decision], SERVER_RANK, "control").wait()
    return int(decision.item())


def _shorten_timeout(seconds: float) -> None:
    """After start-up, a stuck peer should surface within the per-round timeout, not the start
    one: the group's timeout (collectives) from here; the transport's own, for point-to-point
    waits, once the method's set-up exchanges are done (`engine.roles`)."""
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
    options: LaunchOptions,
    secret: bytes,
    surroundings: None,
) -> None:
    del surroundings  # applied while the arguments were unpickled (`LauncherSurroundings`)
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
        run_rank(config, rank, world_size, Path(run_dir), replace(options, show_progress=options.show_progress and rank == 0), secret)
    finally:
        dist.destroy_process_group()


def launch_local(
    config: RunConfig,
    run_dir: Path,
    *,
    overwrite: bool = False,
    cache_dir: Path | None = None,
    show_progress: bool = True,
    algorithm_path: str | None = None,
    classifier_file: Path | None = None,
) -> dict[str, Any]:
    """Check, create the run directory, spawn 1 server + K workers here, wait; return the summary.
    `classifier_file`: measure FID with this stored domain classifier (see `domain_classifier`)."""
    preflight(config, algorithm_path)
    select_backend(config, local_world_size=config.world_size)  # one that cannot run here fails now, once
    RunDirectory.check_available(run_dir, overwrite=overwrite)  # before minutes of classifier training
    domain_classifier(config, cache_dir, classifier_file)  # trained (or loaded) once, before the clock starts
    run = RunDirectory.create(run_dir, config, overwrite=overwrite)
    options = LaunchOptions(
        cache_dir=cache_dir, show_progress=show_progress, algorithm_path=algorithm_path, classifier_file=classifier_file
    )
    return _run_with_restarts(config, run, options)


def resume_local(
    run_dir: Path, *, cache_dir: Path | None = None, show_progress: bool = True, algorithm_path: str | None = None
) -> dict[str, Any]:
    """Continue a run directory from its last complete checkpoint, with its own stored config."""
    run = RunDirectory(Path(run_dir))
    config = run.config()
    try:
        preflight(config, algorithm_path, resuming=True)
    except ConfigError as error:
        raise ConfigError(f"{run_dir}: {error}") from None
    select_backend(config, local_world_size=config.world_size)
    domain_classifier(config, cache_dir)
    options = LaunchOptions(cache_dir=cache_dir, show_progress=show_progress, resume=True, algorithm_path=algorithm_path)
    return _run_with_restarts(config, run, options)


def _run_with_restarts(config: RunConfig, run: RunDirectory, options: LaunchOptions) -> dict[str, Any]:
    """Spawn the group; if a process dies or a peer times out, restart the whole group from the last
    complete checkpoint, up to `faults.max_restarts` times (torchrun's --max-restarts policy)."""
    secret = load_secret(config.security, allow_generated=True)
    restarts_left = config.faults.max_restarts
    while True:
        try:
            _spawn_group(config, run, options, secret)
            break
        except (ProcessRaisedException, ProcessExitedException) as error:
            if restarts_left == 0:
                raise
            restarts_left -= 1
            workers = list(range(1, config.world_size))
            run.append_event({
                "time": time.time(),
                "event": "restart",
                "reason": str(error).strip().splitlines()[-1][:500] if str(error).strip() else type(error).__name__,
                "resume_round": run.latest_complete_round(workers),
                "restarts_left": restarts_left,
            })
            options = replace(options, resume=True)
    return json.loads((run.root / SUMMARY_FILE).read_text())


FAILED_GROUP_GRACE_S = 3.0
"""Once a rank of a local group has failed, how long the others get to exit by themselves, and then
to exit after SIGTERM, before SIGKILL. torch's default is 30 s after SIGTERM, which is what a
stopped (hung) process always costs, since it cannot act on SIGTERM."""


def _spawn_group(config: RunConfig, run: RunDirectory, options: LaunchOptions, secret: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="entgan-rendezvous-") as rendezvous:
        group = mp.start_processes(
            _spawned_rank,
            args=(
                config.world_size,
                config.model_dump(mode="json"),
                str(run.root),
                os.path.join(rendezvous, "store"),
                options,
                secret,
                LauncherSurroundings(),
            ),
            nprocs=config.world_size,
            join=False,
            start_method=start_method(),
        )
        while not group.join(grace_period=FAILED_GROUP_GRACE_S):
            pass
