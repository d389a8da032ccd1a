"""EntGAN's server: steps 3 and 4 of DESIGN.md section 1 (see the package docstring).

Where D is averaged: `EntGANServer.aggregate`, one upload at a time into D's own tensors
(`aggregation.InPlaceDiscriminatorAverage`); where G trains: `train_global`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from entgan.algorithms.aggregation import DiscriminatorUploads, ModelUploads
from entgan.algorithms.entgan.common import EntGANRole
from entgan.algorithms.entgan.model_average import ModelAverage
from entgan.control.overlap import settle
from entgan.control.schedulers import GeneratorFeedback, ServerTaskScheduler
from entgan.engine.method import ServerRole, UploadKind
from entgan.engine.parameters import keep_statistics_valid, model_tensors
from entgan.engine.transport import Transfer, WireBuffers
from entgan.engine.updates import Update
from entgan.engine.uploads import receive_hellos
from entgan.gan import adam, balanced_tasks
from entgan.gan.memory_layout import GeneratorGradients
from entgan.models.generator import Generator


class EntGANServer(EntGANRole, ServerRole):
    """Holds G (with its Adam state) and the averaged D; trains G, never D."""

    @property
    def generator(self) -> Generator:
        """G, or with `control.generator_average` on, its moving average."""
        return self.generator_average.model if self.generator_average is not None else self.G

    def setup(self) -> None:
        torch.manual_seed(self.config.seed)
        self.build_models()
        self.generator_average: ModelAverage | None = None
        self.warm_start = None
        if self.config.warm_start is not None:  # a lifelong job's next version starts from its parent
            from entgan.algorithms.entgan.warmstart import WarmStart

            self.warm_start = WarmStart.from_config(self.config, self.context.device)
            self.warm_start.initialise(self.G, self.D)
        self.D.requires_grad_(False)  # the server never trains D; it only averages it
        # With `control.edge_generator.server_g_steps` off, G is only the mean of the G_k steps: no
        # optimizer, and G needs no gradients (its buffer below still receives the uploads).
        self.trains_generator = not self.edge_generator or self.config.control.edge_generator.server_g_steps
        self.g_optimizer: torch.optim.Optimizer | None = None
        if self.trains_generator:
            self.g_optimizer = adam(self.G.parameters(), self.config.optimizer.lr_generator, self.config.optimizer)
        else:
            self.G.requires_grad_(False)
        self.server_scheduler = ServerTaskScheduler(self.config.control.server_scheduler)
        self.discriminator_uploads = DiscriminatorUploads(self.layout, len(self.config.tasks), self.uploads_changes)
        average = self.config.control.generator_average
        # Copied before G's gradients are bound to the shared buffer, so the copy takes none of it.
        self.generator_average = ModelAverage(self.G, average.half_life_rounds) if average.enabled else None
        # G's gradients and the upload being averaged take turns in one buffer (`engine.memory_layout`).
        self.gradients = GeneratorGradients(
            self.G, self.config.engine.memory_layout, self.context.device, share_with=self.layout.update_size
        )
        # G and D are coded into the same buffers every round (the sends settle before G or D change).
        codec = self.model_codec
        self.generator_wire = None if codec is None else WireBuffers(model_tensors(self.G), codec)
        self.discriminator_wire = None if codec is None else WireBuffers(model_tensors(self.D), codec)
        self.upload_kinds = [
            UploadKind(
                "discriminator-update",
                layout_of=lambda rank: self.update_layouts[self.context.task_of(rank)],
                in_order=True,
                values_storage=self.gradients.buffer,
                codecs=() if self.upload_codec is None else (self.upload_codec,),
                # Uploads arrive after the last sync's D has left (`aggregate`), so their coded
                # bytes can sit in the buffer that D is coded into, until D is coded again.
                wire_storage=None if self.discriminator_wire is None else self.discriminator_wire.storage,
            )
        ]
        if self.edge_generator:  # G_k's changes since the round's G, averaged and added to G
            self.upload_kinds.append(
                UploadKind(
                    "generator",
                    layout_of=lambda rank: self.generator_layout,
                    in_order=True,
                    # Read after D's uploads and before G's steps, so they take the same turns in
                    # G's gradient buffer; their coded bytes arrive after G's broadcast has left.
                    values_storage=self.gradients.buffer,
                    codecs=() if self.upload_codec is None else (self.upload_codec,),
                    wire_storage=None if self.generator_wire is None else self.generator_wire.storage,
                )
            )
            self.generator_uploads = ModelUploads(changes=True)
        self.feedback: GeneratorFeedback | None = None
        if self.resumed_state is not None:
            self.load_state_dict(self.resumed_state)
        self.sample_counts = receive_hellos(self.context)
        # Initialisation: G_k := G, D_k := D (`LinkCodecs.at_start`: exact, or coded on a resume).
        workers = self.context.worker_ranks
        codec = self.codecs.at_start(self.resumed_state is not None)
        self.transport.send_to_many(model_tensors(self.G), workers, "generator", codec).wait()
        self.transport.send_to_many(model_tensors(self.D), workers, "discriminator", codec).wait()
        self.generator_in_flight: Transfer | None = None
        self.discriminator_in_flight: Transfer | None = None

    # ------------------------------------------------------------------ the round
    def aggregate(self, round_index: int, kind: str, accepted: Iterator[Update]) -> None:
        """Step 3: D := weighted average of the D_k, accumulated straight into D as they are received.

        No buffer beyond D and the upload window's coded bodies (`engine.upload_window`): updates
        are read in rank order and summed into D's own float32 tensors, which makes the sum the
        same on every run, whatever order the bodies crossed their links in. Refused updates
        (`engine.updates`) never get here; a part (trunk, a task's head) with no accepted update
        keeps its values. With compressed changes uploaded (`control.compression.uploads:
        changes`), each is added to D in place instead, scaled by its worker's share
        (`aggregation.DiscriminatorUploads`). On sync rounds the averaged D then goes down at once
        (D_k := D), before G trains, so the next round's participants can start the real-data half
        of their D step while the server trains G. With
        `control.edge_generator` on, the G_k changes that follow D's uploads (kind `generator`)
        are added to G in place, in rank order, each scaled by its worker's share of the round's
        participants (`InPlaceModelChange`: no sum buffer; a refused one counts as no change).
        """
        participants = self.participants(round_index)
        if kind == "generator":  # `control.edge_generator`: G := G + the weighted mean G_k change
            settle(self.generator_in_flight)  # G's last broadcast must be out before G changes
            self.generator_in_flight = None
            self.generator_uploads.fold(model_tensors(self.G), accepted, participants, self.sample_counts)
            keep_statistics_valid(self.G)
            return
        settle(self.discriminator_in_flight)  # the last sync's D must be out before D changes
        self.discriminator_in_flight = None
        self.discriminator_uploads.fold(self.D, accepted, participants, self.context.task_of, self.sample_counts)
        if self.is_sync_round(round_index):
            next_workers = self.participants(round_index + 1)
            transfer = self.transport.send_to_many(
                model_tensors(self.D), next_workers, "discriminator", self.model_codec, self.discriminator_wire
            )
            self.discriminator_in_flight = self.overlap.outgoing(transfer)

    def train_global(self, round_index: int) -> dict[str, float]:
        """Step 4: the server task scheduler picks the number of G steps from how well G fooled D
        last round; G trains against the averaged D. With the server's G steps off
        (`control.edge_generator.server_g_steps`), G already is the round's G (`aggregate`)."""
        row = {"g_steps": 0.0}
        if self.trains_generator:
            steps = self.server_scheduler.next_steps(self.feedback)
            settle(self.generator_in_flight)  # G's previous broadcast must leave before G changes
            g_loss, realness = self.train_generator(steps)
            self.feedback = GeneratorFeedback(fake_realness=realness)
            row = {"g_loss": g_loss, "g_steps": float(steps), "g_fake_realness": realness}
        if self.generator_average is not None:  # the run's generator, evaluated before G goes down
            self.generator_average.update(self.G)
        return row

    def send_down(self, round_index: int, participants: list[int]) -> None:
        """G goes to the next round's participants layer by layer; the overlap controller decides
        when to wait."""
        transfer = self.transport.send_to_many(
            model_tensors(self.G), participants, "generator", self.model_codec, self.generator_wire
        )
        self.generator_in_flight = self.overlap.outgoing(transfer)

    # ------------------------------------------------------------------ G steps
    def train_generator(self, steps: int) -> tuple[float, float]:
        """`steps` G updates against the averaged D, every task in every batch, in the engine's
        memory layout (`GeneratorGradients`: micro-batches whose gradients are added into G's
        buffer in place, so the server holds one micro-batch's activations at a time)."""
        assert self.g_optimizer is not None
        batch_size = self.server_scheduler.generator_batch(self.config.optimizer.batch_size, len(self.config.tasks))
        micro = self.gradients.microbatch(batch_size, self.config.optimizer.batch_size)
        losses, realness = [], []
        for _ in range(steps):
            tasks = balanced_tasks(batch_size, len(self.config.tasks), self.context.device)
            latents = self.G.sample_latent(batch_size)
            self.gradients.zero(self.g_optimizer)
            step_loss, step_fooled = self.gradients.add_loss_gradients(self.D, latents, tasks, micro)
            if self.warm_start is not None:  # old tasks: no forgetting
                replay = self.warm_start.replay_loss(self.G)
                if replay.requires_grad:
                    replay.backward()
                step_loss += replay.item()
            self.g_optimizer.step()
            losses.append(step_loss)
            realness.append(step_fooled)
        self.gradients.release(self.g_optimizer)  # their memory can serve the upload until the next step
        return sum(losses) / len(losses), sum(realness) / len(realness)

    # ------------------------------------------------------------------ life cycle
    def finish(self) -> None:
        settle(self.discriminator_in_flight, self.generator_in_flight)

    def state_dict(self) -> dict[str, Any]:
        """Under "generator", the run's generator, the one sampled and deployed: G's moving average
        when it is on, with G itself under "trained_generator"."""
        trained = {} if self.generator_average is None else {"trained_generator": self.G.state_dict()}
        return {
            "generator": self.generator.state_dict(),
            **trained,
            "discriminator": self.D.state_dict(),
            "generator_optimizer": None if self.g_optimizer is None else self.g_optimizer.state_dict(),
            "server_scheduler": self.server_scheduler.state_dict(),
            "feedback": None if self.feedback is None else self.feedback.fake_realness,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint without an average (written with it off) starts the average at G."""
        self.G.load_state_dict(state.get("trained_generator", state["generator"]))
        if self.generator_average is not None:
            self.generator_average.model.load_state_dict(state["generator"])
        self.D.load_state_dict(state["discriminator"])
        if self.g_optimizer is not None and state["generator_optimizer"] is not None:
            self.g_optimizer.load_state_dict(state["generator_optimizer"])
        self.server_scheduler.load_state_dict(state["server_scheduler"])
        if state["feedback"] is not None:
            self.feedback = GeneratorFeedback(fake_realness=state["feedback"])


