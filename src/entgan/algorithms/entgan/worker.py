"""EntGAN's edge worker: steps 1 and 2 of DESIGN.md section 1 (see the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from entgan.algorithms.entgan.common import EntGANRole
from entgan.algorithms.local_training import local_game_step
from entgan.control.noniid import NonIIDOptimizer
from entgan.control.overlap import settle
from entgan.control.schedulers import WorkerPlan, WorkerTaskScheduler, local_steps
from entgan.data.sources import ImageDataset
from entgan.engine.compression import ErrorFeedback
from entgan.engine.context import SERVER_RANK, SeedPurpose
from entgan.engine.method import LocalFigures, Upload, WorkerRole
from entgan.engine.parameters import LayerStream, change_since, flatten, model_tensors, numel, unflatten_into
from entgan.engine.reports import FigureMeans
from entgan.engine.transport import Transfer
from entgan.engine.updates import update_problem
from entgan.engine.uploads import send_hello
from entgan.gan import (
    RealBatches,
    adam,
    discriminator_loss,
    fake_loss,
    fake_loss_from_logits,
    model_digest,
    real_loss,
)
from entgan.models import build_discriminator
from entgan.models.discriminator import Discriminator


class EntGANWorker(EntGANRole, WorkerRole):
    """Holds G_k (a read-only copy of G), its own D_k for its task, and a peer's D for gossip."""

    def setup(self, shard: ImageDataset) -> None:
        torch.manual_seed(self.config.seed + self.context.rank)
        self.build_models()
        self.peer_D = build_discriminator(self.config.model, self.config.image_shape, len(self.config.tasks))
        self.peer_D.to(self.context.device)
        self.peer_D.eval().requires_grad_(False)  # a teacher only: deterministic outputs, no gradients
        self.real = RealBatches(
            shard, self.config.optimizer.batch_size, self.context.generator_seed(SeedPurpose.REAL_BATCHES), self.context.device
        )
        self.latent_stream = self.context.generator_seed(SeedPurpose.LATENTS)
        self.private = None
        if self.config.privacy.enabled:  # DP-SGD on every D_k step that reads local real data
            from entgan.algorithms.entgan.privacy import PrivateDiscriminatorTraining  # Opacus loads slowly

            privacy = self.config.privacy
            self.private = PrivateDiscriminatorTraining(
                self.D,
                self.context.task,
                privacy,
                self.config.optimizer,
                shard_size=len(self.real),
                batch_size=self.real.batch_size,
                generator=self.context.generator_seed(SeedPurpose.PRIVACY_NOISE) if privacy.reproducible_noise else None,
            )
            self.d_optimizer = self.private.optimizer  # the only optimizer allowed to step D_k
        else:
            self.d_optimizer = adam(self.D.parameters(), self.config.optimizer.lr_discriminator, self.config.optimizer)
        scheduler = self.config.control.worker_scheduler
        self.worker_scheduler = WorkerTaskScheduler(
            scheduler, local_steps(scheduler.d_steps, self.context.worker_index, self.config.engine.straggler_aware)
        )
        self.noniid = NonIIDOptimizer(
            self.config.control.noniid, self.context.worker_index, self.config.num_workers, self.config.seed
        )
        # Sending changes: the D this round started from (the server's, just synced, which the
        # round's gossip peer holds too) and what earlier compressed uploads left out (error feedback).
        self.synced_D: Discriminator | None = None
        self.upload_feedback: ErrorFeedback | None = None
        if self.uploads_changes:
            self.synced_D = build_discriminator(self.config.model, self.config.image_shape, len(self.config.tasks))
            self.synced_D.to(self.context.device).requires_grad_(False)
            self.upload_feedback = ErrorFeedback(self.layout.update_size, self.context.device)
        # With G_k steps at the edge (`control.edge_generator`): G_k's optimizer, the G this
        # round started from, and what earlier G_k uploads' codec left out.
        self.g_optimizer: torch.optim.Optimizer | None = None
        self.synced_G: torch.Tensor | None = None
        self.generator_feedback: ErrorFeedback | None = None
        if self.edge_generator:
            self.g_optimizer = adam(self.G.parameters(), self.config.optimizer.lr_generator, self.config.optimizer)
            if self.upload_codec is not None:
                self.generator_feedback = ErrorFeedback(numel(model_tensors(self.G)), self.context.device)
        send_hello(self.context, len(shard))
        codec = self.codecs.at_start(self.resumed_state is not None)  # as the server sends them
        self.transport.receive(model_tensors(self.G), SERVER_RANK, "generator", codec).wait()
        self.transport.receive(model_tensors(self.D), SERVER_RANK, "discriminator", codec).wait()
        if self.resumed_state is not None:  # G_k := G came from the server; D_k is this worker's own
            self.load_state_dict(self.resumed_state)
        if not self.edge_generator:
            self.G.requires_grad_(False)  # G_k only generates; G is trained at the server
        self.incoming_generator: LayerStream | None = None
        self.incoming_discriminator: Transfer | None = None

    # ------------------------------------------------------------------ the round
    def local_round(self, round_index: int) -> LocalFigures:
        """Steps 1-2: fakes from G_k, D_k's update, then gossip and the continual-learning update."""
        settle(self.incoming_discriminator)
        self.incoming_discriminator = None
        if self.synced_D is not None:  # D_k := D was just synced: this round's changes are from here
            self.synced_D.load_state_dict(self.D.state_dict())
        plan = self.worker_scheduler.plan(round_index)
        if self.edge_generator:  # all of G first, then a D_k and a G_k step on each fresh fake batch
            settle(self.incoming_generator)
            self.incoming_generator = None
            self.synced_G = flatten(model_tensors(self.G))
            d_loss, real_realness, fake_realness, fakes = self.play_local_game(plan.d_steps)
        else:
            d_loss, real_realness, fake_realness, fakes = self.update_discriminator(plan)

        # Gossip after the local steps: a snapshot taken before them would, right after a sync,
        # be the averaged D the peer already holds.
        gossip = self.start_gossip(round_index)
        if gossip is not None:
            self.continual_learning_update(gossip, fakes)

        if self.private is not None:
            # Loss and realness on real data are not privatised: sending them would spend privacy
            # that epsilon does not count.
            return LocalFigures(float("nan"), float("nan"), fake_realness, self.private.epsilon())
        return LocalFigures(d_loss, real_realness, fake_realness)

    def uploads(self, round_index: int) -> Sequence[Upload]:
        """(trunk_k, head_k), or its change since the sync, in an authenticated envelope the server
        validates before averaging."""
        task = self.context.task
        values = flatten(self.layout.update_tensors(self.D, task))
        if self.uploads_changes:
            values = self.compressed_change(values)
        uploads = [
            Upload(
                "discriminator-update",
                values,
                self.update_layouts[task],
                codec=self.upload_codec,
                wait_at_once=not self.overlap.enabled,
            )
        ]
        if self.edge_generator:
            assert self.synced_G is not None
            change = change_since(model_tensors(self.G), self.synced_G)
            if self.generator_feedback is not None and self.upload_codec is not None:
                change = self.generator_feedback.corrected(change, self.upload_codec)
            wait = not self.overlap.enabled
            uploads.append(Upload("generator", change, self.generator_layout, codec=self.upload_codec, wait_at_once=wait))
        return uploads

    def compressed_change(self, update: torch.Tensor) -> torch.Tensor:
        """D_k's change since the sync plus what earlier uploads left out; what this upload's codec
        leaves out of it is kept for the next one (error feedback: nothing is dropped for good)."""
        assert self.synced_D is not None and self.upload_feedback is not None and self.upload_codec is not None
        change = update.sub_(flatten(self.layout.update_tensors(self.synced_D, self.context.task)))
        return self.upload_feedback.corrected(change, self.upload_codec)

    def expect_down(self, round_index: int) -> None:
        """Post the receives of what the server sends after round `round_index`: D on sync rounds
        and G (consumed layer by layer as it arrives)."""
        if self.is_sync_round(round_index):
            # D_k := D. Waited for at the start of the next round, before D_k is used again.
            self.incoming_discriminator = self.transport.receive(
                model_tensors(self.D), SERVER_RANK, "discriminator", self.model_codec
            )
        transfer = self.transport.receive(model_tensors(self.G), SERVER_RANK, "generator", self.model_codec)
        self.incoming_generator = self.overlap.incoming_model(self.G, transfer)

    # ------------------------------------------------------------------ steps 1-2
    def update_discriminator(self, plan: WorkerPlan) -> tuple[float, float, float, torch.Tensor]:
        """Steps 1-2: G_k generates fakes for this task; D_k trains on local real vs. those fakes."""
        task = self.context.task
        batch_size = self.real.batch_size
        fake_batches: list[torch.Tensor] = []
        losses, real_scores, fake_scores = [], [], []
        for step in range(plan.d_steps):
            if self.private is not None:
                # DP-SGD clips each real and fake sample in one step over both batches (each real
                # record charged once), so the real half cannot run ahead while G is still arriving.
                fakes = self._fakes_for_step(plan, step, fake_batches, batch_size)
                real = self.private.sample_real(self.real.images)
                loss_value, real_score, fake_score = self.private.step(real, fakes)
            else:
                real = self.real.next()
                self.d_optimizer.zero_grad(set_to_none=True)
                if step == 0 and self.overlap.real_half_first:
                    # The real-data half needs no G: compute it while G's layers are still arriving.
                    loss_real, real_score = real_loss(self.D, real, task)
                    loss_real.backward()
                    fakes = self._fakes_for_step(plan, step, fake_batches, batch_size)
                    loss_fake, fake_score = fake_loss(self.D, fakes, task)
                    loss_fake.backward()
                    loss = loss_real.detach() + loss_fake.detach()
                else:
                    fakes = self._fakes_for_step(plan, step, fake_batches, batch_size)
                    loss, real_score, fake_score = discriminator_loss(self.D, real, fakes, task)
                    loss.backward()
                self.d_optimizer.step()
                loss_value = loss.item()
            losses.append(loss_value)
            real_scores.append(real_score)
            fake_scores.append(fake_score)
        steps = len(losses)
        return sum(losses) / steps, sum(real_scores) / steps, sum(fake_scores) / steps, fake_batches[-1]

    def play_local_game(self, steps: int) -> tuple[float, float, float, torch.Tensor]:
        """[edge G] `steps` rounds of the game on this worker (`local_game_step`, FL-GAN's local
        step): a D_k step against a fresh fake batch, then a G_k step against D_k through the same
        fakes. The batch's tasks are the worker task scheduler's (`_fake_inputs`: mostly this task, a
        share of the others as negatives for D_k's head). Returns the mean D figures and the last
        fake batch, as `update_discriminator` does."""
        assert self.g_optimizer is not None
        task, batch_size = self.context.task, self.real.batch_size
        figures = FigureMeans(3)
        fakes = torch.empty(0)
        for _ in range(steps):
            latents, tasks = self._fake_inputs(batch_size)
            d_step, _, fakes = local_game_step(
                self.G, self.D, (self.g_optimizer, self.d_optimizer), self.real.next(), latents, tasks, task
            )
            figures.add(*d_step)
        d_loss, real_realness, fake_realness = figures.means()
        return d_loss, real_realness, fake_realness, fakes

    def _fakes_for_step(
        self, plan: WorkerPlan, step: int, fake_batches: list[torch.Tensor], batch_size: int
    ) -> torch.Tensor:
        """The fake batch D step `step` uses, generating as the worker task scheduler planned."""
        wanted = plan.fake_batch_for_step(step)
        if wanted >= len(fake_batches):
            count = plan.fake_batches - len(fake_batches) if plan.generate_upfront else 1
            fake_batches.extend(self._generate(count * batch_size).split(batch_size))
        return fake_batches[wanted]

    def _fake_inputs(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents and tasks for `n` of G_k's fakes, drawn from the worker's latent stream in that
        order: the tasks are the worker task scheduler's (every task alike for a generator with
        batch statistics, as in the server's G batches)."""
        latents = self.G.sample_latent(n, generator=self.latent_stream)
        tasks = self.worker_scheduler.fake_tasks(
            n, self.context.task, len(self.config.tasks), self.latent_stream, like_server=self.G.normalises_over_batch
        )
        return latents, tasks.to(self.context.device)

    def _generate(self, n: int) -> torch.Tensor:
        with torch.no_grad():
            fakes = self.G(*self._fake_inputs(n))
        if self.incoming_generator is not None:
            self.incoming_generator.finish()  # all layers were needed for this pass; drop the hooks
            self.incoming_generator = None
        return fakes

    # ------------------------------------------------------------------ non-IID optimizer
    def start_gossip(self, round_index: int) -> tuple[Transfer, torch.Tensor] | None:
        """Exchange: send a snapshot of D_k to a peer among the round's participants, receive the peer's."""
        partners = self.noniid.partners(round_index, among=self.context.participation.workers(round_index))
        if partners is None:
            return None
        send_to, receive_from = (self.context.rank_of_worker(index) for index in partners)
        snapshot = flatten(model_tensors(self.D))
        if self.synced_D is not None:  # the peer synced the same D this round: send the change
            snapshot.sub_(flatten(model_tensors(self.synced_D)))
        if self.upload_codec is not None:
            snapshot = self.upload_codec.encode_packed(snapshot)
        incoming = torch.empty_like(snapshot)
        transfer = self.transport.exchange(snapshot, send_to, incoming, receive_from, "gossip")
        return transfer, incoming

    def continual_learning_update(self, gossip: tuple[Transfer, torch.Tensor], fakes: torch.Tensor) -> None:
        """Update: mix in the peer's D, then fit own data while held to the peer."""
        transfer, incoming = gossip
        transfer.wait()
        if self.upload_codec is not None:
            incoming = self.upload_codec.decode_packed(incoming, numel(model_tensors(self.peer_D)))
        if self.synced_D is not None:
            incoming = incoming.add_(flatten(model_tensors(self.synced_D)))
        if update_problem(incoming, self.config.security.max_update_norm) is not None:
            return  # a broken peer (NaN, exploded) must not spread: skip this exchange, keep own D_k
        unflatten_into(incoming, model_tensors(self.peer_D))
        self.noniid.mix(self.D, self.peer_D)
        task = self.context.task
        for _ in range(self.noniid.config.steps):
            if self.private is not None:
                # Private too, as it reads real data. The regulariser reads only fakes and the peer's
                # (already private) D, so its gradient joins after the noise.
                real = self.private.sample_real(self.real.images)
                self.private.step(real, fakes, regulariser=lambda: self.noniid.regulariser(self.D, self.peer_D, fakes))
                continue
            # One forward of D_k on the fakes serves both its own loss (its task's head) and the
            # distillation term (every head).
            fake_heads = self.D.all_heads(fakes)
            loss = real_loss(self.D, self.real.next(), task)[0] + fake_loss_from_logits(fake_heads[:, task])
            loss = loss + self.noniid.regulariser(self.D, self.peer_D, fakes, local_fake_logits=fake_heads)
            self.d_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.d_optimizer.step()

    # ------------------------------------------------------------------ life cycle
    def finish(self) -> None:
        settle(self.incoming_generator, self.incoming_discriminator)
        self.incoming_generator = self.incoming_discriminator = None

    def state_dict(self) -> dict[str, Any]:
        """D_k as the next round will start with it: the models in flight are received first
        (a stall on checkpoint rounds only)."""
        settle(self.incoming_generator, self.incoming_discriminator)
        self.incoming_generator = self.incoming_discriminator = None
        return {
            "discriminator": self.D.state_dict(),
            "discriminator_optimizer": self.d_optimizer.state_dict(),
            "real_batches": self.real.state_dict(),
            "latent_stream": self.latent_stream.get_state(),
            # The privacy spent so far: a resumed run keeps counting epsilon, never restarts at 0.
            "private": self.private.state_dict() if self.private is not None else None,
            "unsent_change": None if self.upload_feedback is None else self.upload_feedback.residual.clone(),
            "generator_optimizer": None if self.g_optimizer is None else self.g_optimizer.state_dict(),
            "unsent_generator_change": (
                None if self.generator_feedback is None else self.generator_feedback.residual.clone()
            ),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.D.load_state_dict(state["discriminator"])
        self.d_optimizer.load_state_dict(state["discriminator_optimizer"])
        self.real.load_state_dict(state["real_batches"])
        self.latent_stream.set_state(state["latent_stream"])
        if self.private is not None:
            self.private.load_state_dict(state["private"])
        if self.upload_feedback is not None and state.get("unsent_change") is not None:  # absent before changes
            self.upload_feedback.residual.copy_(state["unsent_change"])
        if self.g_optimizer is not None and state.get("generator_optimizer") is not None:
            self.g_optimizer.load_state_dict(state["generator_optimizer"])
        if self.generator_feedback is not None and state.get("unsent_generator_change") is not None:
            self.generator_feedback.residual.copy_(state["unsent_generator_change"])

    def digest(self) -> dict[str, float]:
        return model_digest(self.G, "generator")
