"""FL-GAN / FedGAN: every worker trains a whole GAN locally; the server federated-averages both nets
(Rasouli, Sun, Rajagopal, "FedGAN: Federated Generative Adversarial Networks for Distributed Data",
arXiv:2006.07228, 2020; the same scheme is the FL-GAN baseline of Hardy et al., MD-GAN, 2019).

Who holds what: worker k holds a local generator G_k and discriminator D_k with their Adam states;
the server (FedGAN's intermediary) holds the averages G and D and trains nothing. What moves each
round: G_k (whole) and D_k (shared trunk + its task's head) up to the server ("generator",
"discriminator-update"), the averaged G and D down to every worker ("generator", "discriminator").

One engine round is one synchronisation period: E = `baselines.flgan.local_steps` local steps on
every worker, then one averaging. Per round, a worker therefore runs E D steps and E G steps.

    init:     server builds G, D;  G_k := G, D_k := D for every worker k;  m_k := k's sample count
    each round:
      worker k: E times:  X(r) := b local samples;  X(g) := G_k(Z, t_k)
                          D_k := D_k - lr_D * grad L_D(X(r), X(g))          (task t_k's head)
                          G_k := G_k - lr_G * grad L_G(D_k(X(g)))           (the same X(g))
                send G_k and (trunk_k, head_k) to the server
      server:   G := sum_k m_k G_k / sum_k m_k                     (running sums, in arrival order)
                D.trunk := the same weighted mean of trunk_k;  D.head_t := over task t's workers
                send G and D to every worker:  G_k := G, D_k := D

The evaluated generator is the server's G, the average. Notes on the multi-task setting: worker k
generates and discriminates only its own task t_k, so G's embedding row for another task is left
unchanged by k's steps and is pulled back towards its previous value by k's weight in the average
(FedAvg of the whole G, as the paper averages whole models); D's heads follow EntGAN's rule
(`DiscriminatorAverager`), so a head is never diluted by workers that never train it. Optimizer
states stay on the workers and are not averaged: FedGAN averages parameters only.
"""

from __future__ import annotations

from typing import Any

import torch

from entgan.algorithms.aggregation import DiscriminatorAverager, DiscriminatorLayout, RunningAverage
from entgan.algorithms.base import Algorithm, RealBatches, WorkerReport, adam, build_models, model_digest, round_metrics
from entgan.algorithms.local_training import (
    StepMeans,
    UploadedFigures,
    UploadMeter,
    discriminator_step,
    generator_step,
    named_state,
    upload_extras,
)
from entgan.algorithms.uploads import (
    ArrivingUpdates,
    discriminator_update_layouts,
    receive_hellos,
    send_hello,
    upload,
)
from entgan.control.overlap import settle
from entgan.data.sources import ImageDataset
from entgan.engine.context import SERVER_RANK
from entgan.engine.parameters import flatten, model_tensors, numel
from entgan.engine.transport import Transfer
from entgan.engine.updates import UpdateLayout
from entgan.models.generator import Generator

GENERATOR_FIGURES = 2
"""Floats a worker appends to its upload: its mean local G loss and the realness D_k gave G_k's fakes."""


class FLGAN(Algorithm):
    name = "flgan"

    def _build_models(self) -> None:
        self.G, self.D = build_models(self.config, self.context.device)
        self.layout = DiscriminatorLayout(self.D)
        self.generator_layout = UpdateLayout.of(named_state(self.G))
        self.update_layouts = discriminator_update_layouts(self.layout, self.D)

    @property
    def generator(self) -> Generator:
        return self.G

    # ------------------------------------------------------------------ server
    def server_setup(self) -> None:
        torch.manual_seed(self.config.seed)
        self._build_models()
        self.G.requires_grad_(False)  # the server only averages
        self.D.requires_grad_(False)
        device = self.context.device
        self.generator_average = RunningAverage(numel(model_tensors(self.G)), device)
        self.discriminator_average = DiscriminatorAverager(self.layout, len(self.config.tasks), device)
        self.generators = ArrivingUpdates.checked(
            self.context, "generator", 0, layout_of=lambda rank: self.generator_layout
        )
        self.discriminators = ArrivingUpdates.checked(
            self.context,
            "discriminator-update",
            GENERATOR_FIGURES + WorkerReport.SIZE,
            layout_of=lambda rank: self.update_layouts[self.context.task_of(rank)],
        )
        self.sample_counts = receive_hellos(self.context)
        self.downloads_in_flight: list[Transfer] = []
        self.send_models()  # init: G_k := G, D_k := D
        settle(*self.downloads_in_flight)

    def server_round(self, round_index: int) -> dict[str, float]:
        """Average the G_k as they land, then the D_k updates (each worker sent its G_k first), and
        send both averages down. An upload the server refuses is left out of its average."""
        self.generator_average.reset()
        for update in self.generators.round(round_index):
            self.generator_average.add(update.values, float(self.sample_counts[update.rank]))
        self.discriminator_average.reset()
        uploaded = UploadedFigures(GENERATOR_FIGURES)
        for update in self.discriminators.round(round_index):
            weight = float(self.sample_counts[update.rank])
            self.discriminator_average.add(update.values, self.context.task_of(update.rank), weight)
            uploaded.add(update)
        settle(*self.downloads_in_flight)  # the last round's models must be out before they change
        if self.generator_average.count:
            self.generator_average.write_mean_into(model_tensors(self.G))
        if self.discriminator_average.count:
            self.discriminator_average.write_into(self.D)
        self.send_models()
        g_loss, g_realness = uploaded.figures.means()
        refused = self.generators.refused + self.discriminators.refused
        return round_metrics(g_loss, self.config.baselines.flgan.local_steps, g_realness, refused, uploaded.reports)

    def send_models(self) -> None:
        workers = self.context.worker_ranks
        self.downloads_in_flight = [
            self.transport.send_to_many(model_tensors(self.G), workers, "generator"),
            self.transport.send_to_many(model_tensors(self.D), workers, "discriminator"),
        ]

    def server_finish(self) -> None:
        settle(*self.downloads_in_flight)
        self.downloads_in_flight = []

    def server_state(self) -> dict[str, Any]:
        return {"generator": self.G.state_dict(), "discriminator": self.D.state_dict()}

    # ------------------------------------------------------------------ worker
    def worker_setup(self, shard: ImageDataset) -> None:
        config = self.config
        torch.manual_seed(config.seed + self.context.rank)
        self._build_models()
        self.real = RealBatches(shard, config.optimizer.batch_size, self.context.generator_seed(1), self.context.device)
        self.latent_stream = self.context.generator_seed(2)
        self.g_optimizer = adam(self.G.parameters(), config.optimizer.lr_generator, config.optimizer)
        self.d_optimizer = adam(self.D.parameters(), config.optimizer.lr_discriminator, config.optimizer)
        send_hello(self.context, len(shard))
        settle(*self.receive_models())
        self.meter = UploadMeter(self.transport.counters)
        self.downloads: list[Transfer] = []
        self.uploads: list[Transfer] = []

    def worker_round(self, round_index: int) -> None:
        settle(*self.downloads)  # G_k := G, D_k := D from the last synchronisation
        self.downloads = []
        task = self.context.task
        d_figures, g_figures = StepMeans(3), StepMeans(GENERATOR_FIGURES)
        for _ in range(self.config.baselines.flgan.local_steps):
            real = self.real.next()
            fakes = self.G(self.G.sample_latent(self.real.batch_size, generator=self.latent_stream), task)
            d_figures.add(*discriminator_step(self.D, self.d_optimizer, real, fakes, task))
            g_figures.add(*generator_step(self.g_optimizer, self.D, fakes, task))
        self.upload_models(round_index, d_figures, g_figures)
        self.downloads = self.receive_models()

    def upload_models(self, round_index: int, d_figures: StepMeans, g_figures: StepMeans) -> None:
        """Send G_k, then (trunk_k, head_k) with the round's figures and report. Both are copies, so
        the averaged models can be received into G_k and D_k while these are still in flight."""
        settle(*self.uploads)
        generator = flatten(model_tensors(self.G)).to(self.context.device)
        update = flatten(self.layout.update_tensors(self.D, self.context.task)).to(self.context.device)
        report = self.meter.report(*d_figures.means())
        self.meter.restart()  # the uploads below are booked in the next report
        extras = upload_extras(g_figures.means(), report, self.context.device)
        no_extras = torch.zeros(0, device=self.context.device)
        update_layout = self.update_layouts[self.context.task]
        self.uploads = [
            upload(self.context, generator, no_extras, self.generator_layout, round_index, "generator"),
            upload(self.context, update, extras, update_layout, round_index, "discriminator-update"),
        ]

    def receive_models(self) -> list[Transfer]:
        """Post the receive of the averaged G and D straight into G_k's and D_k's own tensors."""
        return [
            self.transport.receive(model_tensors(self.G), SERVER_RANK, "generator"),
            self.transport.receive(model_tensors(self.D), SERVER_RANK, "discriminator"),
        ]

    def worker_finish(self) -> None:
        settle(*self.downloads, *self.uploads)
        self.downloads, self.uploads = [], []

    def worker_digest(self) -> dict[str, float]:
        """After the final synchronisation, G_k is the server's G (tests compare the sums)."""
        return {**model_digest(self.G, "generator"), **model_digest(self.D, "discriminator")}
