"""What a process knows about the run it belongs to: its rank, role, device, transport, run dir."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import torch

from entgan.config import RunConfig
from entgan.control.schedulers import RoundParticipation
from entgan.engine.transport import Transport
from entgan.rundir import RunDirectory

SERVER_RANK = 0


class SeedPurpose(IntEnum):
    """What a rank's seeded random stream is for (`RunContext.generator_seed`): one stream per
    purpose, so drawing more of one never shifts another."""

    REAL_BATCHES = 1
    LATENTS = 2
    PRIVACY_NOISE = 3


@dataclass
class RunContext:
    config: RunConfig
    rank: int
    world_size: int
    device: torch.device
    transport: Transport
    run_dir: Path
    participation: RoundParticipation
    """Who takes part in each round (`engine.participation`, or the method's default)."""
    session_keys: dict[int, bytes] = field(default_factory=dict)
    """Per-peer keys from the join handshake: the server holds one per worker, a worker the server's."""

    resume: dict[str, Any] | None = None
    """This rank's checkpoint when the run resumes (`engine.roles` and the algorithm restore it)."""

    def participant_ranks(self, round_index: int) -> list[int]:
        """Ranks of the workers that train and upload in round `round_index`."""
        return [self.rank_of_worker(index) for index in self.participation.workers(round_index)]

    def log_event(self, event: dict[str, Any]) -> None:
        """Append an event (refused update, restart, ...) to the run's `events.jsonl` (server only)."""
        if self.is_server:
            RunDirectory(self.run_dir).append_event({"time": time.time(), **event})

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

    def generator_seed(self, purpose: SeedPurpose) -> torch.Generator:
        """A per-rank, per-purpose random stream derived from the run seed (reproducible runs)."""
        generator = torch.Generator(device="cpu")
        generator.manual_seed(self.config.seed * 1_000_003 + self.rank * 1_009 + purpose)
        return generator
