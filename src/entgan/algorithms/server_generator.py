"""Shared mechanics of the methods whose server holds the generator (Ren et al., Distributed-GAN).

In these methods the server owns G and is the only one to train it; worker k owns a discriminator
D_k for its task and a read-only copy of G, from which it generates its fakes. A round, in the
words the method modules (`ren.py`, `dgan.py`) use:

    worker k:  wait until G (and, in the methods that send it, the server's D: D_k := D) arrived
               d_steps times: D_k := D_k - lr * grad L_D(real_k, G(z, task_k))
               upload what the method uploads (D_k's trunk + head, or selected update entries),
               with the round's WorkerReport piggybacked, asynchronously
               post the receive of the next G (and D)
    server:    gather the uploads in arrival order, each checked by the engine's update envelope
               (`engine.updates`: authenticated, finite, bounded) and refused if it fails
               (what the server makes of the accepted ones: the method)
               one G step per critic the method names:  G := G - lr * grad L_G(critic(G(z, t), t))
               send G (and D) to every worker, asynchronously

Why the pieces are the same for every method here, so that a comparison with EntGAN is fair:
the models, data shards, batch size, losses and Adam settings are those of `base.py`; the step
counts are EntGAN's with its schedulers switched off (`StepsPerRound`), with one fresh fake batch
per D step and fakes of the worker's own task only. EntGAN's control modules (task schedulers,
gossip, overlap controller) are its contribution and are deliberately absent.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from entgan.algorithms.aggregation import DiscriminatorLayout
from entgan.algorithms.base import (
    Algorithm,
    RealBatches,
    WorkerReport,
    adam,
    balanced_tasks,
    build_models,
    discriminator_loss,
    generator_loss,
    model_digest,
    round_metrics,
)
from entgan.algorithms.uploads import (
    ArrivingUpdates,
    discriminator_update_layouts,
    receive_hellos,
    send_hello,
    upload,
)
from entgan.config import RunConfig
from entgan.control.overlap import settle
from entgan.data.sources import ImageDataset
from entgan.engine.context import SERVER_RANK, RunContext
from entgan.engine.parameters import flatten, model_tensors
from entgan.engine.transport import Transfer
from entgan.engine.updates import UpdateLayout
from entgan.models.discriminator import Discriminator
from entgan.models.generator import Generator


@dataclass(frozen=True)
class StepsPerRound:
    """D steps per worker and G steps at the server in one round, fixed for the whole run."""

    d_steps: int
    g_steps: int

    @classmethod
    def from_config(cls, config: RunConfig) -> StepsPerRound:
        """The counts EntGAN runs with its task schedulers switched off, so every method does the
        same amount of work per round (`control.worker_scheduler.d_steps`,
        `control.server_scheduler.g_steps`)."""
        return cls(
            d_steps=config.control.worker_scheduler.d_steps,
            g_steps=config.control.server_scheduler.g_steps,
        )


@dataclass(frozen=True)
class DiscriminatorStats:
    """Means over one round's D steps: the loss and how real D found the real and fake batches."""

    loss: float
    real_realness: float
    fake_realness: float


def train_discriminator(
    discriminator: Discriminator,
    optimizer: torch.optim.Optimizer,
    steps: int,
    next_real: Callable[[], tuple[torch.Tensor, torch.Tensor | int]],
    generator: Generator,
    latent_stream: torch.Generator | None = None,
) -> DiscriminatorStats:
    """`steps` textbook D steps: a real batch (with its task ids) vs. a fresh fake batch of G for
    the same tasks, each step."""
    losses, real_scores, fake_scores = [], [], []
    for _ in range(steps):
        real, tasks = next_real()
        with torch.no_grad():
            fakes = generator(generator.sample_latent(real.shape[0], generator=latent_stream), tasks)
        loss, real_score, fake_score = discriminator_loss(discriminator, real, fakes, tasks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        real_scores.append(real_score)
        fake_scores.append(fake_score)
    return DiscriminatorStats(
        loss=sum(losses) / steps, real_realness=sum(real_scores) / steps, fake_realness=sum(fake_scores) / steps
    )


def train_generator(
    generator: Generator,
    optimizer: torch.optim.Optimizer,
    critics: Sequence[nn.Module],
    batch_size: int,
    num_tasks: int,
) -> tuple[float, float]:
    """One G step against each critic in `critics`, every task in every batch; returns the mean G
    loss and the mean probability the critics gave G's samples of being real."""
    if not critics:
        raise ValueError("need at least one critic to train the generator against")
    device = next(generator.parameters()).device
    losses, realness = [], []
    for critic in critics:
        tasks = balanced_tasks(batch_size, num_tasks, device)
        fakes = generator(generator.sample_latent(batch_size), tasks)
        loss, fooled = generator_loss(critic, fakes, tasks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        realness.append(fooled)
    return sum(losses) / len(losses), sum(realness) / len(realness)


class ServerGenerator(Algorithm):
    """Server: G (and D, where the method has one global D); worker k: a copy of G and its D_k.

    A method module fills `absorb_upload` (what the server does with one worker's upload) and
    `server_round` (the order of gathering, training G and sending, and which critic G trains
    against); a worker's round is the same in every method, apart from what it uploads
    (`upload_layout`, `upload_payload`).
    """

    discriminator_comes_down: ClassVar[bool] = True
    """Whether the server's D replaces every D_k each round (D_k := D), or each D_k stays the
    worker's own from the initial D on."""

    def __init__(self, context: RunContext) -> None:
        super().__init__(context)
        self.steps = StepsPerRound.from_config(self.config)

    def _build_models(self) -> None:
        self.G, self.D = build_models(self.config, self.context.device)
        self.layout = DiscriminatorLayout(self.D)
        self._update_layouts = discriminator_update_layouts(self.layout, self.D)

    @property
    def generator(self) -> Generator:
        return self.G

    # ------------------------------------------------------------------ server
    def server_setup(self) -> None:
        torch.manual_seed(self.config.seed)  # the same initial G and D as every other method
        self._build_models()
        self.D.requires_grad_(False)  # the server never trains a discriminator
        self.g_optimizer = adam(self.G.parameters(), self.config.optimizer.lr_generator, self.config.optimizer)
        self.sample_counts = receive_hellos(self.context)
        self.uploads = ArrivingUpdates.checked(
            self.context,
            "discriminator-update",
            WorkerReport.SIZE,
            layout_of=lambda rank: self.upload_layout(self.context.task_of(rank)),
        )
        # Initialisation: every worker starts from the same G and D.
        workers = self.context.worker_ranks
        self.transport.send_to_many(model_tensors(self.G), workers, "generator").wait()
        self.transport.send_to_many(model_tensors(self.D), workers, "discriminator").wait()
        self.generator_in_flight: Transfer | None = None
        self.discriminator_in_flight: Transfer | None = None

    def upload_layout(self, task: int) -> UpdateLayout:
        """What a task-`task` worker's upload is made of: by default D_k's trunk and its head."""
        return self._update_layouts[task]

    @abstractmethod
    def absorb_upload(self, rank: int, values: torch.Tensor) -> None:
        """Take in worker `rank`'s accepted upload; called in arrival order."""

    def gather_uploads(self, round_index: int) -> tuple[dict[int, WorkerReport], int]:
        """Receive one upload from every worker, in arrival order; return the reports of the
        accepted ones and how many were refused (each refusal is logged as a run event)."""
        reports: dict[int, WorkerReport] = {}
        for update in self.uploads.round(round_index):
            self.absorb_upload(update.rank, update.values)
            reports[update.rank] = WorkerReport.from_tensor(update.extras)
        return reports, self.uploads.refused

    def train_generator(self, critics: Sequence[nn.Module]) -> tuple[float, float]:
        """One G step per critic; G's last broadcast must have left before G changes."""
        settle(self.generator_in_flight)
        self.generator_in_flight = None
        return train_generator(
            self.G, self.g_optimizer, critics, self.config.optimizer.batch_size, len(self.config.tasks)
        )

    def round_metrics(
        self, generator_step: tuple[float, float], g_steps: int, reports: dict[int, WorkerReport], refused: int
    ) -> dict[str, float]:
        """The round's row: G's loss and realness, the workers' reports, refused uploads."""
        g_loss, realness = generator_step
        return round_metrics(g_loss, g_steps, realness, refused, reports)

    def settle_discriminator_send(self) -> None:
        """Call before the server's D changes: its last broadcast must have left."""
        settle(self.discriminator_in_flight)
        self.discriminator_in_flight = None

    def send_generator(self) -> None:
        """G to every worker, asynchronously (waited for before G next changes)."""
        self.generator_in_flight = self.transport.send_to_many(model_tensors(self.G), self.context.worker_ranks, "generator")

    def send_discriminator(self) -> None:
        """The server's D to every worker, asynchronously (waited for before D next changes)."""
        self.discriminator_in_flight = self.transport.send_to_many(
            model_tensors(self.D), self.context.worker_ranks, "discriminator"
        )

    def server_finish(self) -> None:
        settle(self.generator_in_flight, self.discriminator_in_flight)
        self.generator_in_flight = self.discriminator_in_flight = None

    def server_state(self) -> dict[str, Any]:
        return {
            "generator": self.G.state_dict(),
            "generator_optimizer": self.g_optimizer.state_dict(),
            **self.discriminator_state(),
        }

    def discriminator_state(self) -> dict[str, Any]:
        """The server's discriminator(s) for the checkpoint."""
        return {"discriminator": self.D.state_dict()}

    # ------------------------------------------------------------------ worker
    def worker_setup(self, shard: ImageDataset) -> None:
        torch.manual_seed(self.config.seed + self.context.rank)
        self._build_models()
        self.real = RealBatches(
            shard, self.config.optimizer.batch_size, self.context.generator_seed(1), self.context.device
        )
        self.latent_stream = self.context.generator_seed(2)
        self.d_optimizer = adam(self.D.parameters(), self.config.optimizer.lr_discriminator, self.config.optimizer)
        send_hello(self.context, len(shard))
        self.transport.receive(model_tensors(self.G), SERVER_RANK, "generator").wait()
        self.transport.receive(model_tensors(self.D), SERVER_RANK, "discriminator").wait()
        self.G.requires_grad_(False)  # the worker's G only generates; G is trained at the server
        self.incoming: list[Transfer] = []
        self.upload_in_flight: Transfer | None = None
        self.traffic_reported = self._traffic()

    def _traffic(self) -> tuple[float, float, float]:
        counters = self.transport.counters
        return float(counters.bytes_sent), float(counters.bytes_received), counters.wait_seconds

    def _traffic_since_last_report(self) -> tuple[float, float, float]:
        """Bytes sent, bytes received and seconds waited since the previous report: this round's
        model receives and the previous round's upload (a report cannot count the message that
        carries it), so every byte after setup lands in exactly one report but the last upload."""
        sent, received, waited = self._traffic()
        last_sent, last_received, last_waited = self.traffic_reported
        self.traffic_reported = (sent, received, waited)
        return sent - last_sent, received - last_received, waited - last_waited

    def worker_round(self, round_index: int) -> None:
        started = time.perf_counter()
        settle(*self.incoming)  # G (and D_k := D) must be whole before D_k trains against G's fakes
        self.incoming = []

        stats = self.train_local_discriminator()

        settle(self.upload_in_flight)
        bytes_sent, bytes_received, comm_wait_s = self._traffic_since_last_report()
        report = WorkerReport(
            d_loss=stats.loss,
            real_realness=stats.real_realness,
            fake_realness=stats.fake_realness,
            bytes_sent=bytes_sent,
            bytes_received=bytes_received,
            comm_wait_s=comm_wait_s,
            compute_s=time.perf_counter() - started,
        )
        self.upload_in_flight = upload(
            self.context,
            self.upload_payload(),
            report.to_tensor().to(self.context.device),
            self.upload_layout(self.context.task),
            round_index,
            "discriminator-update",
        )
        # The next round's models land straight in G's (and D_k's) own tensors, which stay
        # untouched until the next round waits for them.
        self.incoming.append(self.transport.receive(model_tensors(self.G), SERVER_RANK, "generator"))
        if self.discriminator_comes_down:
            self.incoming.append(self.transport.receive(model_tensors(self.D), SERVER_RANK, "discriminator"))

    def train_local_discriminator(self) -> DiscriminatorStats:
        """D_k trains on local real data vs. fakes of its task from the G it holds."""
        task = self.context.task
        return train_discriminator(
            self.D,
            self.d_optimizer,
            self.steps.d_steps,
            lambda: (self.real.next(), task),
            self.G,
            self.latent_stream,
        )

    def upload_payload(self) -> torch.Tensor:
        """What goes up each round, as one flat vector: by default D_k's trunk and its task's head."""
        return flatten(self.layout.update_tensors(self.D, self.context.task))

    def worker_finish(self) -> None:
        settle(*self.incoming, self.upload_in_flight)
        self.incoming, self.upload_in_flight = [], None

    def worker_digest(self) -> dict[str, float]:
        return {**model_digest(self.G, "generator"), **model_digest(self.D, "discriminator")}
