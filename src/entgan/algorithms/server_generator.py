"""Shared mechanics of the methods whose server holds the generator (Ren et al., Distributed-GAN).

`GeneratorServer` and `DiscriminatorWorker` fill the engine's hooks (`engine.method`) the same way
for all of them; a method module says what the server makes of an upload (`aggregate`), which
critics G trains against (`train_global`), and, where it differs, what a worker uploads.

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

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from entgan.algorithms.aggregation import DiscriminatorLayout, discriminator_update_layouts
from entgan.config import RunConfig
from entgan.control.overlap import settle
from entgan.control.schedulers import local_steps
from entgan.data.sources import ImageDataset
from entgan.engine.context import SERVER_RANK, SeedPurpose
from entgan.engine.method import LocalFigures, ServerRole, Upload, UploadKind, WorkerRole
from entgan.engine.parameters import flatten, model_tensors
from entgan.engine.transport import Transfer
from entgan.engine.updates import Update, UpdateLayout
from entgan.engine.uploads import receive_hellos, send_hello
from entgan.gan import RealBatches, adam, balanced_tasks, build_models, discriminator_loss, model_digest
from entgan.gan.memory_layout import GeneratorGradients
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
    gradients: GeneratorGradients,
    optimizer: torch.optim.Optimizer,
    critics: Sequence[nn.Module],
    batch_size: int,
    num_tasks: int,
) -> tuple[float, float]:
    """One G step against each critic in `critics`, every task in every batch, in the engine's
    memory layout (`GeneratorGradients`: G's gradients in one buffer, micro-batches); returns the
    mean G loss and the mean probability the critics gave G's samples of being real."""
    if not critics:
        raise ValueError("need at least one critic to train the generator against")
    generator = gradients.generator
    device = next(generator.parameters()).device
    microbatch = gradients.microbatch(batch_size, batch_size)
    losses, realness = [], []
    for critic in critics:
        tasks = balanced_tasks(batch_size, num_tasks, device)
        latents = generator.sample_latent(batch_size)
        gradients.zero(optimizer)
        loss, fooled = gradients.add_loss_gradients(critic, latents, tasks, microbatch)
        optimizer.step()
        losses.append(loss)
        realness.append(fooled)
    gradients.release(optimizer)
    return sum(losses) / len(losses), sum(realness) / len(realness)


class _ServerGeneratorModels:
    """G, D and the upload layouts, built alike on the server and the workers (same seed: every
    method starts from the same pair)."""

    config: RunConfig

    def build_models(self, device: torch.device) -> None:
        self.G, self.D = build_models(self.config, device)
        self.layout = DiscriminatorLayout(self.D)
        self.update_layouts = discriminator_update_layouts(self.layout, self.D)

    def upload_layout(self, task: int) -> UpdateLayout:
        """What a task-`task` worker's upload is made of: by default D_k's trunk and its head."""
        return self.update_layouts[task]


class GeneratorServer(_ServerGeneratorModels, ServerRole):
    """Server: G (and D, where the method has one global D). A method fills `absorb_upload` (what
    the server does with one worker's upload) and `train_global` (which critics G trains against);
    the methods whose D comes down send it with G after every round."""

    discriminator_comes_down: ClassVar[bool] = True
    """Whether the server's D replaces every D_k each round (D_k := D), or each D_k stays the
    worker's own from the initial D on."""
    uploads_in_order: ClassVar[bool] = False
    """Read the uploads by rank rather than by arrival (`UploadKind.in_order`)."""

    @property
    def generator(self) -> Generator:
        return self.G

    def setup(self) -> None:
        torch.manual_seed(self.config.seed)  # the same initial G and D as every other method
        self.steps = StepsPerRound.from_config(self.config)
        self.build_models(self.context.device)
        self.D.requires_grad_(False)  # the server never trains a discriminator
        self.g_optimizer = adam(self.G.parameters(), self.config.optimizer.lr_generator, self.config.optimizer)
        self.gradients = GeneratorGradients(self.G, self.config.engine.memory_layout, self.context.device)
        self.sample_counts = receive_hellos(self.context)
        self.upload_kinds = [
            UploadKind(
                "discriminator-update",
                layout_of=lambda rank: self.upload_layout(self.context.task_of(rank)),
                in_order=self.uploads_in_order,
            )
        ]
        if self.resumed_state is not None:  # what goes down below is then the checkpointed G and D
            self.load_state_dict(self.resumed_state)
        # Initialisation: every worker starts from the same G and D.
        workers = self.context.worker_ranks
        self.transport.send_to_many(model_tensors(self.G), workers, "generator").wait()
        self.transport.send_to_many(model_tensors(self.D), workers, "discriminator").wait()
        self.generator_in_flight: Transfer | None = None
        self.discriminator_in_flight: Transfer | None = None

    def aggregate(self, round_index: int, kind: str, accepted: Iterator[Update]) -> None:
        """Take in every accepted upload, in arrival order (`absorb_upload`)."""
        for update in accepted:
            self.absorb_upload(update.rank, update.values)

    def absorb_upload(self, rank: int, values: torch.Tensor) -> None:
        """Take in worker `rank`'s accepted upload; called in arrival order."""

    def train_generator(self, critics: Sequence[nn.Module]) -> dict[str, float]:
        """One G step per critic (G's last broadcast must have left before G changes); the row's
        G figures."""
        settle(self.generator_in_flight)
        self.generator_in_flight = None
        g_loss, realness = train_generator(
            self.gradients, self.g_optimizer, critics, self.config.optimizer.batch_size, len(self.config.tasks)
        )
        return {"g_loss": g_loss, "g_steps": float(len(critics)), "g_fake_realness": realness}

    def settle_discriminator_send(self) -> None:
        """Call before the server's D changes: its last broadcast must have left."""
        settle(self.discriminator_in_flight)
        self.discriminator_in_flight = None

    def send_down(self, round_index: int, participants: list[int]) -> None:
        """G (and D) to every worker, asynchronously (waited for before they next change)."""
        self.generator_in_flight = self.transport.send_to_many(model_tensors(self.G), participants, "generator")
        if self.discriminator_comes_down:
            self.discriminator_in_flight = self.transport.send_to_many(
                model_tensors(self.D), participants, "discriminator"
            )

    def finish(self) -> None:
        settle(self.generator_in_flight, self.discriminator_in_flight)
        self.generator_in_flight = self.discriminator_in_flight = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.G.state_dict(),
            "generator_optimizer": self.g_optimizer.state_dict(),
            **self.discriminator_state(),
        }

    def discriminator_state(self) -> dict[str, Any]:
        """The server's discriminator(s) for the checkpoint."""
        return {"discriminator": self.D.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """G, its optimizer and the global D (where the method has one) as the checkpointed round
        left them. Nothing else lasts from one round to the next on the server: uploads are
        consumed within their round, and the torch random state is the engine's."""
        self.G.load_state_dict(state["generator"])
        self.g_optimizer.load_state_dict(state["generator_optimizer"])
        if "discriminator" in state:
            self.D.load_state_dict(state["discriminator"])


class DiscriminatorWorker(_ServerGeneratorModels, WorkerRole):
    """Worker k: a read-only copy of G and its own D_k, trained on local real data against G's
    fakes; the same round in every method here, apart from what it uploads (`upload_layout`,
    `upload_payload`)."""

    discriminator_comes_down: ClassVar[bool] = True
    """As the server's: whether D_k := D arrives with G after every round."""

    def setup(self, shard: ImageDataset) -> None:
        torch.manual_seed(self.config.seed + self.context.rank)
        self.steps = StepsPerRound.from_config(self.config)
        # Scaled by this worker's declared speed where the run declares speeds (`local_steps`).
        self.d_steps = local_steps(self.steps.d_steps, self.context.worker_index, self.config.engine.straggler_aware)
        self.build_models(self.context.device)
        self.real = RealBatches(
            shard, self.config.optimizer.batch_size, self.context.generator_seed(SeedPurpose.REAL_BATCHES), self.context.device
        )
        self.latent_stream = self.context.generator_seed(SeedPurpose.LATENTS)
        self.d_optimizer = adam(self.D.parameters(), self.config.optimizer.lr_discriminator, self.config.optimizer)
        send_hello(self.context, len(shard))
        self.transport.receive(model_tensors(self.G), SERVER_RANK, "generator").wait()
        self.transport.receive(model_tensors(self.D), SERVER_RANK, "discriminator").wait()
        self.G.requires_grad_(False)  # the worker's G only generates; G is trained at the server
        self.incoming: list[Transfer] = []
        if self.resumed_state is not None:  # G (and D_k := D) came from the server, as after a round
            self.load_state_dict(self.resumed_state)

    def local_round(self, round_index: int) -> LocalFigures:
        settle(*self.incoming)  # G (and D_k := D) must be whole before D_k trains against G's fakes
        self.incoming = []
        stats = self.train_local_discriminator()
        return LocalFigures(stats.loss, stats.real_realness, stats.fake_realness)

    def train_local_discriminator(self) -> DiscriminatorStats:
        """D_k trains on local real data vs. fakes of its task from the G it holds."""
        task = self.context.task
        return train_discriminator(
            self.D,
            self.d_optimizer,
            self.d_steps,
            lambda: (self.real.next(), task),
            self.G,
            self.latent_stream,
        )

    def uploads(self, round_index: int) -> Sequence[Upload]:
        return [Upload("discriminator-update", self.upload_payload(), self.upload_layout(self.context.task))]

    def upload_payload(self) -> torch.Tensor:
        """What goes up each round, as one flat vector: by default D_k's trunk and its task's head."""
        return flatten(self.layout.update_tensors(self.D, self.context.task))

    def expect_down(self, round_index: int) -> None:
        """The next round's models land straight in G's (and D_k's) own tensors, which stay
        untouched until the next round waits for them."""
        self.incoming.append(self.transport.receive(model_tensors(self.G), SERVER_RANK, "generator"))
        if self.discriminator_comes_down:
            self.incoming.append(self.transport.receive(model_tensors(self.D), SERVER_RANK, "discriminator"))

    def finish(self) -> None:
        settle(*self.incoming)
        self.incoming = []

    def state_dict(self) -> dict[str, Any]:
        """What the next round needs that the server does not re-send on resuming: D_k's optimizer
        and the real-batch and latent streams. G, and D where D_k := D, are in flight from the
        server at this point and are not read: resuming, the server sends the same models again."""
        state: dict[str, Any] = {
            "discriminator_optimizer": self.d_optimizer.state_dict(),
            "real_batches": self.real.state_dict(),
            "latent_stream": self.latent_stream.get_state(),
        }
        if not self.discriminator_comes_down:  # D_k is this worker's own
            state["discriminator"] = self.D.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.discriminator_comes_down:
            self.D.load_state_dict(state["discriminator"])
        self.d_optimizer.load_state_dict(state["discriminator_optimizer"])
        self.real.load_state_dict(state["real_batches"])
        self.latent_stream.set_state(state["latent_stream"])

    def digest(self) -> dict[str, float]:
        return {**model_digest(self.G, "generator"), **model_digest(self.D, "discriminator")}
