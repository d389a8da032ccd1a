"""What a process knows about the run it belongs to: its rank, role, device, transport, run dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from entgan.config import RunConfig
from entgan.engine.transport import Transport

SERVER_RANK = 0


@dataclass
class RunContext:
    config: RunConfig
    rank: int
    world_size: int
    device: torch.device
    transport: Transport
    run_dir: Path

    @property
    def is_server(self) -> bool:
        return self.rank == SERVER_RANK

    @property
    def worker_ranks(self) -> list[int]:
        """Edge workers are ranks 1..K."""
        return list(range(1, self.world_size))

    def task_of(self, rank: int) -> int:
        """Index of the task served by worker `rank`."""
        return self.config.worker_tasks()[rank - 1]

    @property
    def task(self) -> int:
        """This worker's task index."""
        return self.task_of(self.rank)

    @property
    def worker_index(self) -> int:
        """This worker's position among the workers, 0..K-1."""
        return self.rank - 1

    def rank_of_worker(self, worker_index: int) -> int:
        return worker_index + 1

    def generator_seed(self, purpose: int) -> torch.Generator:
        """A per-rank, per-purpose random stream derived from the run seed (reproducible runs)."""
        generator = torch.Generator(device="cpu")
        generator.manual_seed(self.config.seed * 1_000_003 + self.rank * 1_009 + purpose)
        return generator
