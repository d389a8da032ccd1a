"""The plug-in interface every algorithm fills, and the GAN mechanics they all share.

The engine owns the round loop (see `entgan.engine.roles`); an algorithm says what the server does
in a round and what a worker does in a round, nothing more. Losses, optimizers, real-batch sampling
and worker reports live here once, so methods differ only where their papers differ.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import astuple, dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from entgan.config import OptimizerConfig, RunConfig
from entgan.data.sources import ImageDataset
from entgan.engine.context import RunContext
from entgan.engine.parameters import flatten, model_tensors
from entgan.models import build_discriminator, build_generator
from entgan.models.discriminator import Discriminator
from entgan.models.generator import Generator


class Algorithm(ABC):
    """One distributed-GAN method: a server side and a worker side, one round at a time.

    Resuming: when `context.resume` holds this rank's checkpoint, `server_setup` / `worker_setup`
    restore `server_state()` / `worker_state()` from it before their first exchange, and the
    exchanges of setup then bring every rank to where the checkpointed round left it. A method that
    cannot do this leaves `supports_resume` False, and `--resume` says so instead of guessing.
    """

    name: ClassVar[str]
    supports_resume: ClassVar[bool] = False

    def __init__(self, context: RunContext) -> None:
        self.context = context
        self.config = context.config
        self.transport = context.transport

    # --- server (rank 0) ---
    @abstractmethod
    def server_setup(self) -> None:
        """Build the global models and bring every worker to the same starting point."""

    @abstractmethod
    def server_round(self, round_index: int) -> dict[str, float]:
        """Run one round on the server; return the round's metrics (losses, steps, worker reports)."""

    def server_finish(self) -> None:
        """Settle outstanding transfers after the last round."""

    @property
    @abstractmethod
    def generator(self) -> Generator:
        """The generator that is evaluated, sampled and checkpointed."""

    def server_state(self) -> dict[str, Any]:
        """Everything needed to sample from (and later resume) the server's side."""
        return {"generator": self.generator.state_dict()}

    # --- worker (ranks 1..K) ---
    @abstractmethod
    def worker_setup(self, shard: ImageDataset) -> None:
        """Receive the starting models and prepare local training on this worker's shard."""

    @abstractmethod
    def worker_round(self, round_index: int) -> None:
        """Run one round on the worker."""

    def worker_finish(self) -> None:
        """Settle outstanding transfers after the last round."""

    def worker_state(self) -> dict[str, Any]:
        """This worker's part of a resumable checkpoint (taken between two rounds)."""
        return {}

    def worker_digest(self) -> dict[str, float]:
        """Small fingerprint of the worker's models, written at the end (tests check sync with it)."""
        return {}


@dataclass(frozen=True)
class WorkerReport:
    """Per-round figures a worker piggybacks on its upload (a handful of floats)."""

    d_loss: float = 0.0
    real_realness: float = 0.0
    fake_realness: float = 0.0
    bytes_sent: float = 0.0
    bytes_received: float = 0.0
    comm_wait_s: float = 0.0
    compute_s: float = 0.0
    epsilon: float = 0.0
    """Differential privacy spent by this worker so far (at `privacy.delta`); 0 when privacy is
    off, and then left out of the metrics (0 would read as "perfectly private")."""

    SIZE: ClassVar[int] = 8

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor(astuple(self), dtype=torch.float32)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> WorkerReport:
        return cls(*[float(v) for v in values.tolist()])

    def as_metrics(self, rank: int) -> dict[str, float]:
        return {
            f"worker{rank}/{field.name}": getattr(self, field.name)
            for field in fields(self)
            if not (field.name == "epsilon" and self.epsilon == 0.0)
        }


assert WorkerReport.SIZE == len(fields(WorkerReport))


def summarise_reports(reports: dict[int, WorkerReport]) -> dict[str, float]:
    """Per-worker figures plus their means and the workers' total traffic."""
    metrics: dict[str, float] = {}
    for rank in sorted(reports):
        metrics.update(reports[rank].as_metrics(rank))
    if reports:
        values = list(reports.values())
        metrics["d_loss"] = sum(r.d_loss for r in values) / len(values)
        metrics["d_real_realness"] = sum(r.real_realness for r in values) / len(values)
        metrics["d_fake_realness"] = sum(r.fake_realness for r in values) / len(values)
        metrics["workers/bytes_sent"] = sum(r.bytes_sent for r in values)
        metrics["workers/bytes_received"] = sum(r.bytes_received for r in values)
    return metrics


def round_metrics(
    g_loss: float, g_steps: float, g_fake_realness: float, refused: int, reports: dict[int, WorkerReport]
) -> dict[str, float]:
    """A server round's row: G's loss, steps and realness, refused uploads, the workers' reports."""
    return {
        "g_loss": g_loss,
        "g_steps": float(g_steps),
        "g_fake_realness": g_fake_realness,
        "refused_updates": float(refused),
        **summarise_reports(reports),
    }


def build_models(config: RunConfig, device: torch.device) -> tuple[Generator, Discriminator]:
    """The run's G and D on `device`, G first: under the same seed, every method starts from the
    same pair."""
    num_tasks = len(config.tasks)
    generator = build_generator(config.model, config.image_shape, num_tasks).to(device)
    discriminator = build_discriminator(config.model, config.image_shape, num_tasks).to(device)
    return generator, discriminator


def model_digest(module: nn.Module, name: str) -> dict[str, float]:
    """Sum and absolute sum of a model's state, in float64 (tests compare copies with them)."""
    values = flatten(model_tensors(module)).double()
    return {f"{name}_sum": float(values.sum()), f"{name}_abs_sum": float(values.abs().sum())}


def adam(parameters: Any, lr: float, config: OptimizerConfig) -> torch.optim.Adam:
    """The optimizer of every method's G and D (same algorithm and settings for all).

    The fused kernel updates all parameters in one pass; on CPU it takes a quarter of the time of
    the default per-tensor loop, which at these model sizes is a visible share of a D step."""
    return torch.optim.Adam(parameters, lr=lr, betas=(config.beta1, config.beta2), fused=True)


def discriminator_loss(
    discriminator: Discriminator, real: torch.Tensor, fake: torch.Tensor, task: torch.Tensor | int
) -> tuple[torch.Tensor, float, float]:
    """Standard GAN D loss on its task head; also the mean realness of real and fake batches."""
    real_logits = discriminator(real, task)
    fake_logits = discriminator(fake.detach(), task)
    loss = F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return loss, torch.sigmoid(real_logits).mean().item(), torch.sigmoid(fake_logits).mean().item()


def real_loss(discriminator: Discriminator, real: torch.Tensor, task: torch.Tensor | int) -> tuple[torch.Tensor, float]:
    """The real-data half of the D loss (computable before the generator has arrived)."""
    logits = discriminator(real, task)
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)), torch.sigmoid(logits).mean().item()


def fake_loss(discriminator: Discriminator, fake: torch.Tensor, task: torch.Tensor | int) -> tuple[torch.Tensor, float]:
    """The fake-data half of the D loss."""
    logits = discriminator(fake.detach(), task)
    return fake_loss_from_logits(logits), torch.sigmoid(logits).mean().item()


def fake_loss_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """The fake-data half of the D loss, from D's logits on the fakes."""
    return F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))


def generator_loss(
    discriminator: nn.Module, fakes: torch.Tensor, tasks: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Non-saturating G loss against `discriminator`; also the mean realness D gives the fakes."""
    logits = discriminator(fakes, tasks)
    loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    return loss, torch.sigmoid(logits).mean().item()


def balanced_tasks(batch_size: int, num_tasks: int, device: torch.device) -> torch.Tensor:
    """Task labels for a G batch: every task equally represented."""
    return torch.arange(batch_size, device=device) % num_tasks


class RealBatches:
    """Shuffled mini-batches of a worker's local data, reshuffled each epoch, from a seeded stream."""

    def __init__(
        self, shard: ImageDataset, batch_size: int, generator: torch.Generator, device: torch.device | None = None
    ) -> None:
        if len(shard) == 0:
            raise ValueError("a worker's data shard is empty")
        self.images = shard.images.to(device) if device is not None else shard.images
        self.batch_size = min(batch_size, len(shard))
        self._generator = generator
        self._order = torch.randperm(len(shard), generator=generator)
        self._position = 0

    def __len__(self) -> int:
        return self.images.shape[0]

    def state_dict(self) -> dict[str, Any]:
        return {"order": self._order.clone(), "position": self._position, "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["order"].numel() != len(self._order):
            raise ValueError(f"checkpoint holds a shard of {state['order'].numel()} images, this worker has {len(self._order)}")
        self._order = state["order"].clone()
        self._position = int(state["position"])
        self._generator.set_state(state["generator"])

    def next(self) -> torch.Tensor:
        if self._position + self.batch_size > len(self._order):
            self._order = torch.randperm(len(self._order), generator=self._generator)
            self._position = 0
        indices = self._order[self._position : self._position + self.batch_size].to(self.images.device)
        self._position += self.batch_size
        return self.images[indices]
