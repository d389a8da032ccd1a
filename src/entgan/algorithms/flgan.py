"""FL-GAN / FedGAN: every worker trains a whole GAN locally; the server federated-averages both nets
(Rasouli, Sun, Rajagopal, "FedGAN: Federated Generative Adversarial Networks for Distributed Data",
arXiv:2006.07228, 2020; the same scheme is the FL-GAN baseline of Hardy et al., MD-GAN, 2019).

Who holds what: worker k holds a local generator G_k and discriminator D_k with their Adam states;
the server (FedGAN's intermediary) holds the averages G and D and trains nothing. What moves each
round: G_k (whole) and D_k (shared trunk + its task's head) up to the server ("generator",
"discriminator-update"), the averaged G and D down to every worker ("generator", "discriminator").
On the engine's hooks (`engine.method`): a worker's `local_round` is its E local steps, `uploads`
G_k then D_k; the server's `aggregate` averages each kind into G's and D's own tensors (the
engine's memory layout, as EntGAN's and Ren's servers do), `send_down` sends both. With
`baselines.flgan.compression` on (EntGAN's coded transfers, for the edge bench's level field; not
in the paper) the averages go down coded and the workers upload their changes since the sync,
whose weighted means the server adds to G and D.

One engine round is one synchronisation period: E = `baselines.flgan.local_steps` local steps on
every worker, then one averaging. Per round, a worker therefore runs E D steps and E G steps.

    init:     server builds G, D;  G_k := G, D_k := D for every worker k;  m_k := k's sample count
    each round:
      worker k: E times:  X(r) := b local samples;  X(g) := G_k(Z, t_k)
                          D_k := D_k - lr_D * grad L_D(X(r), X(g))          (task t_k's head)
                          G_k := G_k - lr_G * grad L_G(D_k(X(g)))           (the same X(g))
                send G_k and (trunk_k, head_k) to the server
      server:   G := sum_k m_k G_k / sum_k m_k                     (in place, in rank order)
                D.trunk := the same weighted mean of trunk_k;  D.head_t := over task t's workers
                send G and D to every worker:  G_k := G, D_k := D

The evaluated generator is the server's G, the average. Notes on the multi-task setting: worker k
generates and discriminates only its own task t_k, so G's embedding row for another task is left
unchanged by k's steps and is pulled back towards its previous value by k's weight in the average
(FedAvg of the whole G, as the paper averages whole models); D's heads follow EntGAN's rule
(`aggregation`), so a head is never diluted by workers that never train it. Optimizer states stay
on the workers and are not averaged: FedGAN averages parameters only. With the engine's
participation below 1 (`engine.participation`, FedAvg's client fraction C) a round averages the
models of its workers, and a worker that sat out receives the averages when it is next due.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from entgan.algorithms.aggregation import (
    DiscriminatorLayout,
    DiscriminatorUploads,
    ModelUploads,
    discriminator_update_layouts,
)
from entgan.algorithms.local_training import local_game_step, named_state
from entgan.control.overlap import settle
from entgan.control.schedulers import local_steps
from entgan.data.sources import ImageDataset
from entgan.engine.compression import Codec, ErrorFeedback, LinkCodecs
from entgan.engine.context import SERVER_RANK, SeedPurpose
from entgan.engine.method import Capabilities, LocalFigures, Method, ServerRole, Upload, UploadKind, WorkerRole
from entgan.engine.parameters import change_since, flatten, keep_statistics_valid, model_tensors, numel
from entgan.engine.reports import FigureMeans
from entgan.engine.transport import Transfer, WireBuffers
from entgan.engine.updates import Update, UpdateLayout
from entgan.engine.uploads import receive_hellos, send_hello
from entgan.gan import RealBatches, adam, build_models, model_digest
from entgan.models.generator import Generator

GENERATOR_FIGURES = ("g_loss", "g_fake_realness")
"""What a worker appends to its upload: its mean local G loss and the realness D_k gave G_k's fakes."""


class _FLGANModels:
    """G, D, the two upload layouts and the codecs, alike on both sides."""

    def build_models(self, config: Any, device: torch.device) -> None:
        self.G, self.D = build_models(config, device)
        self.layout = DiscriminatorLayout(self.D)
        self.generator_layout = UpdateLayout.of(named_state(self.G))
        self.update_layouts = discriminator_update_layouts(self.layout, self.D)
        self.codecs = LinkCodecs.from_config(config.baselines.flgan.compression)


class FLGANServer(_FLGANModels, ServerRole):
    """FedGAN's intermediary: averages the G_k and the D_k, trains nothing."""

    @property
    def generator(self) -> Generator:
        return self.G

    def setup(self) -> None:
        torch.manual_seed(self.config.seed)
        self.build_models(self.config, self.context.device)
        self.G.requires_grad_(False)  # the server only averages
        self.D.requires_grad_(False)
        # The averages are accumulated straight into G's and D's own tensors (the engine's memory
        # layout, as EntGAN's server does): models are averaged, changes added, each scaled by its
        # worker's share, in rank order so that the float32 sums are the same on every run.
        self.generator_uploads = ModelUploads(changes=self.codecs.changes)
        self.discriminator_uploads = DiscriminatorUploads(self.layout, len(self.config.tasks), self.codecs.changes)
        # Each worker sends its G_k first, then (trunk_k, head_k) with its figures and report.
        upload_codecs = () if self.codecs.upload is None else (self.codecs.upload,)
        self.upload_kinds = [
            UploadKind("generator", layout_of=lambda rank: self.generator_layout, in_order=True, codecs=upload_codecs),
            UploadKind(
                "discriminator-update",
                layout_of=lambda rank: self.update_layouts[self.context.task_of(rank)],
                in_order=True,
                figures=GENERATOR_FIGURES,
                codecs=upload_codecs,
            ),
        ]
        self.sample_counts = receive_hellos(self.context)
        self.downloads_in_flight: list[Transfer] = []
        codec = self.codecs.model
        self.wires = [None if codec is None else WireBuffers(model_tensors(model), codec) for model in (self.G, self.D)]
        if self.resumed_state is not None:  # the averages of the checkpointed round go down instead
            self.load_state_dict(self.resumed_state)
        # init: G_k := G, D_k := D
        self.send_models(self.context.worker_ranks, self.codecs.at_start(self.resumed_state is not None))
        settle(*self.downloads_in_flight)

    def aggregate(self, round_index: int, kind: str, accepted: Iterator[Update]) -> None:
        """G := the sample-weighted mean of the G_k, D := that of the D_k (trunk over every
        participant, a head over its task's), added into G and D as the uploads are read, in rank
        order. From changes, G := G + their weighted mean, and so for D; a refused upload counts
        as no change. From models, a refused one is left out of its average."""
        settle(*self.downloads_in_flight)  # the last round's models must be out before they change
        self.downloads_in_flight = []
        participants = self.participants(round_index)
        if kind == "generator":
            self.generator_uploads.fold(model_tensors(self.G), accepted, participants, self.sample_counts)
            keep_statistics_valid(self.G)
            return
        self.discriminator_uploads.fold(self.D, accepted, participants, self.context.task_of, self.sample_counts)

    def train_global(self, round_index: int) -> dict[str, float]:
        """Nothing to train: the workers trained, and `aggregate` has made G and D the averages."""
        return {"g_steps": float(self.config.baselines.flgan.local_steps)}

    def send_down(self, round_index: int, participants: list[int]) -> None:
        self.send_models(participants, self.codecs.model)

    def send_models(self, participants: list[int], codec: Codec | None) -> None:
        wires = self.wires if codec is not None else [None, None]
        self.downloads_in_flight = [
            self.transport.send_to_many(model_tensors(model), participants, kind, codec, wire)
            for model, kind, wire in zip((self.G, self.D), ("generator", "discriminator"), wires)
        ]

    def finish(self) -> None:
        settle(*self.downloads_in_flight)
        self.downloads_in_flight = []

    def state_dict(self) -> dict[str, Any]:
        """The averages G and D: all the server keeps between rounds (it trains nothing)."""
        return {"generator": self.G.state_dict(), "discriminator": self.D.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["generator"])
        self.D.load_state_dict(state["discriminator"])


class FLGANWorker(_FLGANModels, WorkerRole):
    """A whole local GAN: E local D and G steps per round, then both go up to be averaged."""

    def setup(self, shard: ImageDataset) -> None:
        config = self.config
        torch.manual_seed(config.seed + self.context.rank)
        self.build_models(config, self.context.device)
        self.real = RealBatches(
            shard, config.optimizer.batch_size, self.context.generator_seed(SeedPurpose.REAL_BATCHES), self.context.device
        )
        self.latent_stream = self.context.generator_seed(SeedPurpose.LATENTS)
        self.g_optimizer = adam(self.G.parameters(), config.optimizer.lr_generator, config.optimizer)
        self.d_optimizer = adam(self.D.parameters(), config.optimizer.lr_discriminator, config.optimizer)
        # E, or this worker's share of it where device speeds are declared (`engine.straggler_aware`).
        self.local_steps = local_steps(
            config.baselines.flgan.local_steps, self.context.worker_index, config.engine.straggler_aware
        )
        # Uploading changes: G_k's and (trunk_k, head_k)'s values at the sync, and what the codec
        # left out of earlier uploads (error feedback).
        self.synced: tuple[torch.Tensor, torch.Tensor] | None = None
        self.feedback: tuple[ErrorFeedback, ErrorFeedback] | None = None
        if self.codecs.changes:
            device = self.context.device
            self.feedback = (
                ErrorFeedback(numel(model_tensors(self.G)), device),
                ErrorFeedback(self.layout.update_size, device),
            )
        send_hello(self.context, len(shard))
        self.receive_models(self.codecs.at_start(self.resumed_state is not None))
        settle(*self.downloads)
        self.downloads = []
        if self.resumed_state is not None:  # G_k := G, D_k := D came from the server, as after a round
            self.load_state_dict(self.resumed_state)

    def local_round(self, round_index: int) -> LocalFigures:
        settle(*self.downloads)  # G_k := G, D_k := D from the last synchronisation
        self.downloads = []
        task = self.context.task
        if self.feedback is not None:  # the changes uploaded are from here
            self.synced = (flatten(model_tensors(self.G)), flatten(self.layout.update_tensors(self.D, task)))
        d_figures, self.g_figures = FigureMeans(3), FigureMeans(len(GENERATOR_FIGURES))
        optimizers = (self.g_optimizer, self.d_optimizer)
        for _ in range(self.local_steps):
            real = self.real.next()
            latents = self.G.sample_latent(self.real.batch_size, generator=self.latent_stream)
            d_step, g_step, _ = local_game_step(self.G, self.D, optimizers, real, latents, task, task)
            d_figures.add(*d_step)
            self.g_figures.add(*g_step)
        return LocalFigures(*d_figures.means())

    def uploads(self, round_index: int) -> Sequence[Upload]:
        """G_k, then (trunk_k, head_k) with the round's G figures. Both are copies, so the averaged
        models can be received into G_k and D_k while these are still in flight."""
        task = self.context.task
        states = [model_tensors(self.G), self.layout.update_tensors(self.D, task)]
        if self.feedback is not None and self.synced is not None and self.codecs.change is not None:
            values = [
                feedback.corrected(change_since(tensors, then), self.codecs.change)
                for tensors, then, feedback in zip(states, self.synced, self.feedback)
            ]
        else:
            values = [flatten(tensors) for tensors in states]
        return [
            Upload("generator", values[0], self.generator_layout, codec=self.codecs.upload),
            Upload(
                "discriminator-update",
                values[1],
                self.update_layouts[task],
                figures=self.g_figures.means(),
                codec=self.codecs.upload,
            ),
        ]

    def expect_down(self, round_index: int) -> None:
        self.receive_models(self.codecs.model)

    def receive_models(self, codec: Codec | None) -> None:
        """Post the receive of the averaged G and D straight into G_k's and D_k's own tensors."""
        self.downloads: list[Transfer] = [
            self.transport.receive(model_tensors(self.G), SERVER_RANK, "generator", codec),
            self.transport.receive(model_tensors(self.D), SERVER_RANK, "discriminator", codec),
        ]

    def finish(self) -> None:
        settle(*self.downloads)
        self.downloads = []

    def state_dict(self) -> dict[str, Any]:
        """What the worker keeps across a synchronisation: both optimizers' states and the
        real-batch and latent streams. G_k and D_k are being overwritten by the averages in flight
        and are not read: resuming, the server sends them."""
        return {
            "generator_optimizer": self.g_optimizer.state_dict(),
            "discriminator_optimizer": self.d_optimizer.state_dict(),
            "real_batches": self.real.state_dict(),
            "latent_stream": self.latent_stream.get_state(),
            "unsent_changes": None if self.feedback is None else [f.residual.clone() for f in self.feedback],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.g_optimizer.load_state_dict(state["generator_optimizer"])
        self.d_optimizer.load_state_dict(state["discriminator_optimizer"])
        self.real.load_state_dict(state["real_batches"])
        self.latent_stream.set_state(state["latent_stream"])
        if self.feedback is not None and state.get("unsent_changes") is not None:  # absent before codecs
            for feedback, residual in zip(self.feedback, state["unsent_changes"]):
                feedback.residual.copy_(residual)

    def digest(self) -> dict[str, float]:
        """After the final synchronisation, G_k is the server's G (tests compare the sums)."""
        return {**model_digest(self.G, "generator"), **model_digest(self.D, "discriminator")}


class FLGAN(Method):
    name = "flgan"
    capabilities = Capabilities(resume=True, partial_participation=True)
    server = FLGANServer
    worker = FLGANWorker
