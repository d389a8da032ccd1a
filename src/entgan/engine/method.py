"""The method interface: the hooks a distributed-GAN method fills, one class per role.

The engine owns the round (`engine.rounds`); a method says what its server and its workers do at
each step of it, nothing more. Modelled on Flower's `Strategy`: the engine receives, checks and
refuses uploads, meters traffic, writes per-round reports, evaluates and checkpoints, once for
every method. A round, as the engine drives it:

    server (rank 0)                                   worker k (ranks 1..K)
      P_r := participants(r)                            if k in P_r:
      open_round(r, P_r)          e.g. fakes down         figures := local_round(r)
      for each upload kind, in order:                     (engine: settle k's last uploads,
        aggregate(r, kind, accepted uploads of P_r)        report = traffic/time since them)
          (engine: receive, check, refuse, log)           uploads(r) sent in envelopes,
      row := train_global(r)                               the report riding on the last
      send_down(r, participants(r + 1))                 if k in P_{r+1}: expect_down(r)

Checkpoint and resume are the normal path (torchtitan's `Stateful` trainer is the model): each
role's `state_dict` is written on checkpoint rounds and given back to `load_state_dict` during
`setup` when a run resumes, before setup's first exchange.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from entgan.config import RunConfig
from entgan.control.schedulers import RoundParticipation
from entgan.data.sources import ImageDataset
from entgan.engine.compression import Codec
from entgan.engine.context import RunContext
from entgan.engine.updates import Update, UpdateLayout
from entgan.models.generator import Generator


@dataclass(frozen=True)
class Capabilities:
    """What a method supports, declared once on its class and checked before any process starts
    (`engine.launch.check_capabilities`)."""

    resume: bool = False
    """Its roles' `state_dict` holds everything needed to continue a run exactly: `--resume` and
    restarts after a crash (`faults.max_restarts`, torchrun's `--max-restarts`) are allowed."""
    privacy: bool = False
    """Its workers can train under differential privacy (`privacy.enabled`)."""
    warm_start: bool = False
    """It can start from a parent run's models (`warm_start`, lifelong jobs)."""
    partial_participation: bool = False
    """It can follow the engine's participation policy below 1 (`engine.participation`): its roles
    use the default `participants` / `participates`, and nothing of theirs assumes every worker
    takes part in every round."""


@dataclass(frozen=True)
class UploadKind:
    """One message kind the workers upload each round, as the server receives it."""

    kind: str
    layout_of: Callable[[int], UpdateLayout]
    """The layout of the values that worker `rank` uploads (the envelope is checked against it)."""
    figures: tuple[str, ...] = ()
    """The method's own per-upload figures, carried before the report; their mean over a round's
    accepted uploads goes into the round's row under these names."""
    in_order: bool = False
    """Hand the uploads over by rank instead of by arrival (a fixed summation order, reproducible to
    the bit); their bodies still cross as their headers come, up to the upload window."""
    values_storage: torch.Tensor | None = None
    """Memory the received values may occupy (`engine.updates.UpdateReceiver`)."""
    codecs: tuple[Codec, ...] = ()
    """Codecs with parameters (int8, top-k) the workers may send this kind in, beyond the casts
    every receiver knows (`engine.updates.CAST_CODECS`)."""
    wire_storage: torch.Tensor | None = None
    """Memory the coded bytes of an upload may occupy while it is decoded (`UpdateReceiver`)."""


@dataclass(frozen=True)
class Upload:
    """One message a worker uploads in a round."""

    kind: str
    values: torch.Tensor
    """Flat values; must not change until the engine has settled the upload (next round)."""
    layout: UpdateLayout
    figures: Sequence[float] = ()
    codec: Codec | None = None
    """How the values travel (`engine.compression`); None: float32 as they are."""
    wait_at_once: bool = False
    """Complete the send before the worker goes on (a method without overlap)."""


@dataclass(frozen=True)
class LocalFigures:
    """A worker's own figures for its round report: its D loss and realness means."""

    d_loss: float
    real_realness: float
    fake_realness: float
    epsilon: float = 0.0
    """Differential privacy spent so far (0: privacy off)."""


class Role(ABC):
    """What both roles share: the run context and the checkpoint interface."""

    def __init__(self, context: RunContext) -> None:
        self.context = context
        self.config = context.config
        self.transport = context.transport

    def state_dict(self) -> dict[str, Any]:
        """This role's part of a checkpoint (taken between two rounds)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; called from `setup` when the run resumes."""

    @property
    def resumed_state(self) -> dict[str, Any] | None:
        """This role's part of the checkpoint the run resumes from, or None on a fresh start."""
        resume = self.context.resume
        if resume is None:
            return None
        return resume["server" if self.context.is_server else "worker"]

    def finish(self) -> None:
        """Settle outstanding transfers after the last round."""


class ServerRole(Role):
    """Rank 0: the global models, what comes up and what goes down."""

    upload_kinds: Sequence[UploadKind] = ()
    """What every participant uploads each round, received in this order (set in `setup`)."""

    @property
    @abstractmethod
    def generator(self) -> Generator:
        """The generator that is evaluated, sampled and checkpointed."""

    @abstractmethod
    def setup(self) -> None:
        """Build the global models and bring every worker to the same starting point."""

    def participants(self, round_index: int) -> list[int]:
        """Ranks of the workers that train and upload in round `round_index`: by default the
        engine's participation policy (`engine.participation`; every worker unless it is below 1)."""
        return self.context.participant_ranks(round_index)

    def open_round(self, round_index: int, participants: list[int]) -> None:
        """Before the uploads are received: what the server sends or computes while workers train."""

    def aggregate(self, round_index: int, kind: str, accepted: Iterator[Update]) -> None:
        """Take in the round's accepted uploads of `kind` as they arrive (consume them all)."""

    @abstractmethod
    def train_global(self, round_index: int) -> dict[str, float]:
        """After the uploads: train (or assemble) the global models; return the round's figures."""

    def send_down(self, round_index: int, participants: list[int]) -> None:
        """After the round: what goes down to `participants`, those of round `round_index + 1`."""


class WorkerRole(Role):
    """Ranks 1..K: local data and local models."""

    @abstractmethod
    def setup(self, shard: ImageDataset) -> None:
        """Receive the starting models and prepare local training on this worker's shard."""

    def participates(self, round_index: int) -> bool:
        """Whether this worker trains and uploads in round `round_index` (the server's `participants`)."""
        return self.context.participation.includes(self.context.worker_index, round_index)

    @abstractmethod
    def local_round(self, round_index: int) -> LocalFigures:
        """Train locally (and talk to peers) for one round; return the figures for the report."""

    def uploads(self, round_index: int) -> Sequence[Upload]:
        """What goes up after `local_round`, in the server's `upload_kinds` order."""
        return ()

    def expect_down(self, round_index: int) -> None:
        """Post the receives of what the server sends after round `round_index` (called only
        when this worker takes part in the next round)."""

    def digest(self) -> dict[str, float]:
        """Small fingerprint of the worker's models, written at the end (tests check sync with it)."""
        return {}


class Method:
    """A registry entry: a method's name, its capabilities and its two roles."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()
    server: ClassVar[type[ServerRole]]
    worker: ClassVar[type[WorkerRole]]

    @classmethod
    def default_participation(cls, config: RunConfig) -> float:
        """The share of each task's workers a round takes when `engine.participation` is unset."""
        return 1.0

    @classmethod
    def round_participation(cls, config: RunConfig) -> RoundParticipation:
        """Who takes part in each round of a run of this method (`engine.participation`,
        `engine.straggler_aware`)."""
        return RoundParticipation(cls.participation(config), config.worker_tasks(), config.engine.straggler_aware)

    @classmethod
    def participation(cls, config: RunConfig) -> float:
        """The run's participation share: `engine.participation`, or the method's default."""
        share = config.engine.participation
        return share if share is not None else cls.default_participation(config)

