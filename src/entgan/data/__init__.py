"""Data: sources normalised to one in-memory form, tasks cut from them, shards per worker."""

from entgan.data.errors import DataError
from entgan.data.partition import dirichlet_partition, iid_partition, shard_partition
from entgan.data.sources import ImageDataset, load_source
from entgan.data.tasks import TaskData, build_tasks, load_worker_shard, task_seed, worker_shards

__all__ = [
    "DataError",
    "ImageDataset",
    "TaskData",
    "build_tasks",
    "dirichlet_partition",
    "iid_partition",
    "load_source",
    "load_worker_shard",
    "shard_partition",
    "task_seed",
    "worker_shards",
]
