"""From one loaded source to per-task datasets and per-worker shards.

Worker ranks 1..K serve tasks in config order (`RunConfig.worker_tasks()`); each task's images
are split among its own workers with the task's partitioner, seeded from the run seed and the
task index so every rank computes the same split independently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from entgan.config import RunConfig, TaskConfig
from entgan.data.errors import DataError
from entgan.data.partition import dirichlet_partition, iid_partition
from entgan.data.sources import ImageDataset, load_source

__all__ = ["TaskData", "build_tasks", "load_worker_shard", "task_seed", "worker_shards"]


@dataclass(frozen=True, eq=False)
class TaskData:
    """One task's identity and all of its images (before splitting across workers)."""

    name: str
    index: int
    labels: tuple[int, ...]
    dataset: ImageDataset


def build_tasks(cfg: RunConfig, source: ImageDataset) -> list[TaskData]:
    """One `TaskData` per `cfg.tasks` entry, in order, holding the source images of its labels."""
    available = source.classes()
    tasks: list[TaskData] = []
    for index, task in enumerate(cfg.tasks):
        missing = sorted(set(task.labels) - set(available))
        if missing:
            raise DataError(
                f"tasks[{index}] '{task.name}': labels {missing} are not in source '{source.name}'; "
                f"available labels: {available}"
            )
        dataset = source.select_labels(task.labels, name=f"{source.name}/{task.name}")
        tasks.append(TaskData(name=task.name, index=index, labels=tuple(task.labels), dataset=dataset))
    return tasks


def task_seed(run_seed: int, task_index: int) -> int:
    """Independent, reproducible seed for one task's partition (negative run seeds are fine)."""
    sequence = np.random.SeedSequence([run_seed % 2**64, task_index])
    return int(sequence.generate_state(1, dtype=np.uint64)[0])


def _split_task(cfg: RunConfig, task_cfg: TaskConfig, task: TaskData) -> list[np.ndarray]:
    workers = task_cfg.workers
    size = len(task.dataset)
    if size < workers:
        raise DataError(
            f"task '{task.name}' has {size} images but {workers} workers; every worker needs at least one"
        )
    if workers == 1:
        return [np.arange(size, dtype=np.int64)]
    seed = task_seed(cfg.seed, task.index)
    if task_cfg.partition == "iid":
        return iid_partition(size, workers, seed)
    try:
        labels = task.dataset.labels.numpy()
        return dirichlet_partition(labels, workers, task_cfg.dirichlet_alpha, seed, min_size=1)
    except DataError as error:
        raise DataError(f"task '{task.name}': {error}") from None


def worker_shards(cfg: RunConfig, tasks: list[TaskData]) -> list[ImageDataset]:
    """The data shard of each worker rank 1..K, in rank order (list position = rank - 1)."""
    if [t.name for t in tasks] != [t.name for t in cfg.tasks]:
        raise DataError(
            f"tasks {[t.name for t in tasks]} do not match the config's tasks {[t.name for t in cfg.tasks]}"
        )
    splits = [_split_task(cfg, task_cfg, task) for task_cfg, task in zip(cfg.tasks, tasks)]
    next_part = [0] * len(tasks)
    shards: list[ImageDataset] = []
    for rank, task_index in enumerate(cfg.worker_tasks(), start=1):
        part = splits[task_index][next_part[task_index]]
        next_part[task_index] += 1
        task = tasks[task_index]
        shards.append(task.dataset.subset(part, name=f"{task.dataset.name}/rank{rank}"))
    return shards


def load_worker_shard(cfg: RunConfig, rank: int) -> ImageDataset:
    """Load the source and return worker `rank`'s shard (rank 1..K; rank 0 is the server)."""
    if not 1 <= rank <= cfg.num_workers:
        raise DataError(f"worker rank must be in 1..{cfg.num_workers}, found {rank}")
    tasks = build_tasks(cfg, load_source(cfg.data))
    return worker_shards(cfg, tasks)[rank - 1]
