"""EntGAN: one multi-task GAN learned across edge workers (DESIGN.md section 1).

Who holds what: the server holds the global generator G and discriminator D; worker k holds G_k
(a copy of G) and its own D_k for its task. What moves each round: D_k up to the server (shared
trunk + its task's head), D_k to a peer (gossip), G down to the next round's participants, layer
by layer, and on sync rounds the averaged D down to them as well.

    init: G_k := G, D_k := D for every worker k
    each round r:
      P_r := server_task_scheduler.participants(r)                  # a share of each task's workers, in turn
      worker k in P_r:
                 1. plan := worker_task_scheduler.plan()            # when G_k runs, fake reuse
                 2. fakes := G_k(z, task_k)                          # streams in as G arrives
                    D_k := D_k - lr * grad L_D(real_k, fakes)        # edge discriminator update
                    non-IID optimizer: swap D_k with a peer in P_r, mix, continual-learning update
                    send (trunk_k, head_k) to the server
      server:    3. D := sample-weighted running average of P_r's updates as they arrive
                    (trunk over all of them, head t over task t's);
                    every `aggregation.sync_every` rounds, send D down at once to P_{r+1} (D_k := D)
                 4. n := server_task_scheduler.next_steps(feedback)
                    n times: G := G - lr * grad L_G(D(G(z, t), t))
                    send G to P_{r+1} layer by layer, asynchronously (overlap controller)
                    optionally G_avg := decay * G_avg + (1 - decay) * G: the G that is sampled
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch

from entgan.algorithms.aggregation import DiscriminatorLayout, InPlaceDiscriminatorAverage
from entgan.algorithms.base import (
    Algorithm,
    RealBatches,
    WorkerReport,
    adam,
    balanced_tasks,
    build_models,
    discriminator_loss,
    fake_loss,
    fake_loss_from_logits,
    generator_loss,
    model_digest,
    real_loss,
    round_metrics,
)
from entgan.algorithms.uploads import (
    ArrivingUpdates,
    discriminator_update_layouts,
    receive_hellos,
    send_hello,
    update_receiver,
)
from entgan.control.noniid import NonIIDOptimizer
from entgan.control.overlap import OverlapController, settle
from entgan.control.schedulers import (
    GeneratorFeedback,
    RoundParticipation,
    ServerTaskScheduler,
    WorkerPlan,
    WorkerTaskScheduler,
)
from entgan.data.sources import ImageDataset
from entgan.engine.context import SERVER_RANK
from entgan.engine.memory_layout import bind_gradients, linear_gradients_in_place
from entgan.engine.model_average import ModelAverage
from entgan.engine.parameters import LayerStream, flatten, model_tensors, numel, unflatten_into
from entgan.engine.transport import Transfer
from entgan.engine.updates import send_update, update_problem
from entgan.models import build_discriminator
from entgan.models.discriminator import Discriminator
from entgan.models.generator import Generator


class EntGAN(Algorithm):
    name = "entgan"
    supports_resume = True

    # ------------------------------------------------------------------ common
    def _build_models(self) -> None:
        self.G, self.D = build_models(self.config, self.context.device)
        self.generator_average: ModelAverage | None = None  # the server's, when configured
        self.layout = DiscriminatorLayout(self.D)
        self.update_layouts = discriminator_update_layouts(self.layout, self.D)
        self.overlap = OverlapController(self.config.control.overlap)
        self.participation = RoundParticipation(self.config.control.server_scheduler, self.config.worker_tasks())
        compression = self.config.control.compression
        # Per-round traffic travels in half precision when compression is on (the start is exact).
        self.wire_dtype: torch.dtype | None = getattr(torch, compression.wire_dtype) if compression.enabled else None

    @property
    def generator(self) -> Generator:
        """G, or on the server with `control.generator_average` on, its moving average."""
        return self.generator_average.model if self.generator_average is not None else self.G

    # ------------------------------------------------------------------ server
    def server_setup(self) -> None:
        torch.manual_seed(self.config.seed)
        self._build_models()
        self.warm_start = None
        if self.config.warm_start is not None:  # a lifelong job's next version starts from its parent
            from entgan.engine.warmstart import WarmStart

            self.warm_start = WarmStart.from_config(self.config, self.context.device)
            self.warm_start.initialise(self.G, self.D)
        self.D.requires_grad_(False)  # the server never trains D; it only averages it
        self.g_optimizer = adam(self.G.parameters(), self.config.optimizer.lr_generator, self.config.optimizer)
        self.server_scheduler = ServerTaskScheduler(self.config.control.server_scheduler)
        self.averager = InPlaceDiscriminatorAverage(self.layout, len(self.config.tasks))
        average = self.config.control.generator_average
        # Copied before G's gradients are bound to the shared buffer, so the copy takes none of it.
        self.generator_average = ModelAverage(self.G, average.half_life_rounds) if average.enabled else None
        self.shared_buffer = self.gradients_and_upload_buffer()
        self.updates = update_receiver(
            self.context,
            WorkerReport.SIZE,
            layout_of=lambda rank: self.update_layouts[self.context.task_of(rank)],
            values_storage=self.shared_buffer,
        )
        self.feedback: GeneratorFeedback | None = None
        if self.context.resume is not None:
            self.load_server_state(self.context.resume["server"])
        self.sample_counts = receive_hellos(self.context)
        # Initialisation: G_k := G, D_k := D.
        workers = self.context.worker_ranks
        self.transport.send_to_many(model_tensors(self.G), workers, "generator").wait()
        self.transport.send_to_many(model_tensors(self.D), workers, "discriminator").wait()
        self.generator_in_flight: Transfer | None = None
        self.discriminator_in_flight: Transfer | None = None

    def server_round(self, round_index: int) -> dict[str, float]:
        reports, refused = self.average_discriminators(round_index)
        self.discriminator_in_flight = self.send_discriminator(round_index)
        steps = self.server_scheduler.next_steps(self.feedback)
        settle(self.generator_in_flight)  # G's previous broadcast must leave before G changes
        g_loss, realness = self.train_generator(steps)
        self.feedback = GeneratorFeedback(fake_realness=realness)
        self.generator_in_flight = self.broadcast_generator(round_index)
        if self.generator_average is not None:  # only reads G, so while G is on its way
            self.generator_average.update(self.G)
        return round_metrics(g_loss, steps, realness, refused, reports)

    def average_discriminators(self, round_index: int) -> tuple[dict[int, WorkerReport], int]:
        """Step 3: D := weighted average of the D_k, accumulated straight into D as they are received.

        No buffer beyond D and one update: updates are read in rank order (they are all in flight
        by then, so order costs no waiting) and summed into D's own float32 tensors, which makes
        the sum the same on every run. Updates that fail validation (`engine.updates`) are refused
        and logged; the average is over the accepted ones, and a part (trunk, a task's head) with
        no accepted update keeps its values.
        """
        settle(self.discriminator_in_flight)  # the last sync's D must be out before D changes
        self.discriminator_in_flight = None
        self.averager.reset()
        reports: dict[int, WorkerReport] = {}
        uploads = ArrivingUpdates(self.context, "discriminator-update", self.updates)
        for update in uploads.round(round_index, in_order=True, ranks=self.participant_ranks(round_index)):
            task = self.context.task_of(update.rank)
            self.averager.add(self.D, update.values, task, self.sample_counts[update.rank])
            reports[update.rank] = WorkerReport.from_tensor(update.extras)
        self.averager.finish(self.D)
        return reports, uploads.refused

    def gradients_and_upload_buffer(self) -> torch.Tensor | None:
        """With the memory layout on, one flat buffer that holds G's gradients during the G steps and
        the upload being averaged before them (`engine.memory_layout`); None: autograd allocates G's
        gradients and the receiver its own buffer."""
        if not self.config.control.memory.enabled:
            return None
        parameters = list(self.G.parameters())
        size = max(numel(parameters), self.layout.update_size)
        buffer = torch.zeros(size, dtype=torch.float32, device=self.context.device)
        bind_gradients(parameters, buffer)
        return buffer

    def train_generator(self, steps: int) -> tuple[float, float]:
        """Step 4: `steps` G updates against the averaged D, every task in every batch.

        Memory layout (`control.memory`): each step's batch goes through G and D in micro-batches
        whose gradients are added into G's gradient buffer (on the CPU, in place), so the server holds one
        micro-batch's activations at a time, not the batch's. The update is the same (the loss is the
        batch mean either way) for generators without batch statistics (the MLP); a BatchNorm
        generator normalises each micro-batch on its own, so for one the micro-batch is as large as a
        worker's fake batch (`generator_microbatch`)."""
        batch_size = self.server_scheduler.generator_batch(self.config.optimizer.batch_size, len(self.config.tasks))
        micro = self.generator_microbatch(batch_size)
        gradients_bound = self.shared_buffer is not None
        # The in-place linear gradients are for glibc's heap; on a GPU the caching allocator reuses
        # autograd's temporaries exactly, and the Python backward was slower (H200, MLP: a 64-sample
        # step's gradients took 12.3 ms in place against 8.7 ms).
        in_place = gradients_bound and self.context.device.type == "cpu"
        losses, realness = [], []
        for _ in range(steps):
            tasks = balanced_tasks(batch_size, len(self.config.tasks), self.context.device)
            latents = self.G.sample_latent(batch_size)
            self.g_optimizer.zero_grad(set_to_none=not gradients_bound)
            step_loss, step_fooled = add_generator_gradients(self.G, self.D, latents, tasks, micro, in_place)
            if self.warm_start is not None:  # old tasks: no forgetting
                replay = self.warm_start.replay_loss(self.G)
                if replay.requires_grad:
                    replay.backward()
                step_loss += replay.item()
            self.g_optimizer.step()
            losses.append(step_loss)
            realness.append(step_fooled)
        if not gradients_bound:  # not needed until the next G step: their memory can serve the upload
            self.g_optimizer.zero_grad(set_to_none=True)
        return sum(losses) / len(losses), sum(realness) / len(realness)

    def generator_microbatch(self, batch_size: int) -> int:
        """Samples per pass through G and D in a G step of `batch_size`: the memory layout's
        micro-batch, but for a generator with batch statistics never fewer than a worker's fake
        batch. Such a G's samples depend on the batch they are drawn in, and D_k learns from
        batches of `optimizer.batch_size` (DCGAN nets, 60 s: FID 315 with 16-sample passes at the
        server, 78 and 109 with 64; 288 with 16-sample passes on both sides: too few samples)."""
        memory = self.config.control.memory
        if not memory.enabled:
            return batch_size
        if self.G.normalises_over_batch:
            return min(batch_size, max(memory.generator_microbatch, self.config.optimizer.batch_size))
        return memory.generator_microbatch

    def send_discriminator(self, round_index: int) -> Transfer | None:
        """On sync rounds, D_k := D: the averaged D goes down before G trains, so workers can start
        the real-data half of their next D step while the server is still busy with G. It goes to
        the workers that take part in the next round (a worker that sits it out gets D when it
        is next due)."""
        if not self.is_sync_round(round_index):
            return None
        next_workers = self.participant_ranks(round_index + 1)
        transfer = self.transport.send_to_many(model_tensors(self.D), next_workers, "discriminator", self.wire_dtype)
        return self.overlap.outgoing(transfer)

    def broadcast_generator(self, round_index: int) -> Transfer | None:
        """Send G layer by layer to the workers that take part in the next round; the overlap
        controller decides when to wait."""
        next_workers = self.participant_ranks(round_index + 1)
        transfer = self.transport.send_to_many(model_tensors(self.G), next_workers, "generator", self.wire_dtype)
        return self.overlap.outgoing(transfer)

    def participant_ranks(self, round_index: int) -> list[int]:
        """Ranks of the workers that train and upload in round `round_index` (server task scheduler)."""
        return [self.context.rank_of_worker(index) for index in self.participation.workers(round_index)]

    def is_sync_round(self, round_index: int) -> bool:
        every = self.config.aggregation.sync_every
        return every > 0 and (round_index + 1) % every == 0

    def server_finish(self) -> None:
        settle(self.discriminator_in_flight, self.generator_in_flight)

    def server_state(self) -> dict[str, Any]:
        """Under "generator", the run's generator, the one sampled and deployed: G's moving average
        when it is on, with G itself under "trained_generator"."""
        trained = {} if self.generator_average is None else {"trained_generator": self.G.state_dict()}
        return {
            "generator": self.generator.state_dict(),
            **trained,
            "discriminator": self.D.state_dict(),
            "generator_optimizer": self.g_optimizer.state_dict(),
            "server_scheduler": self.server_scheduler.state_dict(),
            "feedback": None if self.feedback is None else self.feedback.fake_realness,
        }

    def load_server_state(self, state: dict[str, Any]) -> None:
        """A checkpoint without an average (written with it off) starts the average at G."""
        self.G.load_state_dict(state.get("trained_generator", state["generator"]))
        if self.generator_average is not None:
            self.generator_average.model.load_state_dict(state["generator"])
        self.D.load_state_dict(state["discriminator"])
        self.g_optimizer.load_state_dict(state["generator_optimizer"])
        self.server_scheduler.load_state_dict(state["server_scheduler"])
        if state["feedback"] is not None:
            self.feedback = GeneratorFeedback(fake_realness=state["feedback"])

    # ------------------------------------------------------------------ worker
    def worker_setup(self, shard: ImageDataset) -> None:
        torch.manual_seed(self.config.seed + self.context.rank)
        self._build_models()
        self.peer_D = build_discriminator(self.config.model, self.config.image_shape, len(self.config.tasks))
        self.peer_D.to(self.context.device)
        self.peer_D.eval().requires_grad_(False)  # a teacher only: deterministic outputs, no gradients
        self.real = RealBatches(
            shard, self.config.optimizer.batch_size, self.context.generator_seed(1), self.context.device
        )
        self.latent_stream = self.context.generator_seed(2)
        self.private = None
        if self.config.privacy.enabled:  # DP-SGD on every D_k step that reads local real data
            from entgan.privacy import PrivateDiscriminatorTraining  # Opacus loads slowly: private runs only

            privacy = self.config.privacy
            self.private = PrivateDiscriminatorTraining(
                self.D,
                self.context.task,
                privacy,
                self.config.optimizer,
                shard_size=len(self.real),
                batch_size=self.real.batch_size,
                generator=self.context.generator_seed(3) if privacy.reproducible_noise else None,
            )
            self.d_optimizer = self.private.optimizer  # the only optimizer allowed to step D_k
        else:
            self.d_optimizer = adam(self.D.parameters(), self.config.optimizer.lr_discriminator, self.config.optimizer)
        self.worker_scheduler = WorkerTaskScheduler(self.config.control.worker_scheduler)
        self.noniid = NonIIDOptimizer(
            self.config.control.noniid, self.context.worker_index, self.config.num_workers, self.config.seed
        )
        send_hello(self.context, len(shard))
        self.transport.receive(model_tensors(self.G), SERVER_RANK, "generator").wait()
        self.transport.receive(model_tensors(self.D), SERVER_RANK, "discriminator").wait()
        if self.context.resume is not None:  # G_k := G came from the server; D_k is this worker's own
            self.load_worker_state(self.context.resume["worker"])
        self.G.requires_grad_(False)  # G_k only generates; G is trained at the server
        self.incoming_generator: LayerStream | None = None
        self.incoming_discriminator: Transfer | None = None
        self.upload_in_flight: Transfer | None = None

    def worker_round(self, round_index: int) -> None:
        """Train and upload if this worker takes part in the round; then, if it takes part in the
        next one, post the receives of the models the server sends for it."""
        me = self.context.worker_index
        if self.participation.includes(me, round_index):
            self.train_round(round_index)
        if self.participation.includes(me, round_index + 1):
            self.expect_models(round_index)

    def train_round(self, round_index: int) -> None:
        started = time.perf_counter()
        counters = self.transport.counters
        bytes_before = (counters.bytes_sent, counters.bytes_received, counters.wait_seconds)
        settle(self.incoming_discriminator)
        self.incoming_discriminator = None
        plan = self.worker_scheduler.plan(round_index)

        d_loss, real_realness, fake_realness, fakes = self.update_discriminator(plan)

        # Gossip after the local steps: a snapshot taken before them would, right after a sync,
        # be the averaged D the peer already holds.
        gossip = self.start_gossip(round_index)
        if gossip is not None:
            self.continual_learning_update(gossip, fakes)

        settle(self.upload_in_flight)
        if self.private is not None:
            # Loss and realness on real data are not privatised: sending them would spend privacy
            # that epsilon does not count.
            d_loss = real_realness = float("nan")
        report = WorkerReport(
            d_loss=d_loss,
            real_realness=real_realness,
            fake_realness=fake_realness,
            bytes_sent=counters.bytes_sent - bytes_before[0],
            bytes_received=counters.bytes_received - bytes_before[1],
            comm_wait_s=counters.wait_seconds - bytes_before[2],
            compute_s=time.perf_counter() - started,
            epsilon=self.private.epsilon() if self.private is not None else 0.0,
        )
        self.upload_in_flight = self.upload_discriminator(report, round_index)

    def expect_models(self, round_index: int) -> None:
        """Post the receives of what the server sends after round `round_index`: D on sync rounds
        and G (consumed layer by layer as it arrives)."""
        if self.is_sync_round(round_index):
            # D_k := D. Waited for at the start of the next round, before D_k is used again.
            self.incoming_discriminator = self.transport.receive(
                model_tensors(self.D), SERVER_RANK, "discriminator", self.wire_dtype
            )
        transfer = self.transport.receive(model_tensors(self.G), SERVER_RANK, "generator", self.wire_dtype)
        self.incoming_generator = self.overlap.incoming_model(self.G, transfer)

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

    def _fakes_for_step(
        self, plan: WorkerPlan, step: int, fake_batches: list[torch.Tensor], batch_size: int
    ) -> torch.Tensor:
        """The fake batch D step `step` uses, generating as the worker task scheduler planned."""
        wanted = plan.fake_batch_for_step(step)
        if wanted >= len(fake_batches):
            count = plan.fake_batches - len(fake_batches) if plan.generate_upfront else 1
            fake_batches.extend(self._generate(count * batch_size).split(batch_size))
        return fake_batches[wanted]

    def _generate(self, n: int) -> torch.Tensor:
        with torch.no_grad():
            z = self.G.sample_latent(n, generator=self.latent_stream)
            tasks = self.worker_scheduler.fake_tasks(
                n, self.context.task, len(self.config.tasks), self.latent_stream, like_server=self.G.normalises_over_batch
            )
            fakes = self.G(z, tasks.to(self.context.device))
        if self.incoming_generator is not None:
            self.incoming_generator.finish()  # all layers were needed for this pass; drop the hooks
            self.incoming_generator = None
        return fakes

    def start_gossip(self, round_index: int) -> tuple[Transfer, torch.Tensor] | None:
        """Non-IID optimizer, exchange: send a snapshot of D_k to a peer, receive the peer's."""
        partners = self.noniid.partners(round_index, among=self.participation.workers(round_index))
        if partners is None:
            return None
        send_to, receive_from = (self.context.rank_of_worker(index) for index in partners)
        snapshot = flatten(model_tensors(self.D)).to(self.wire_dtype or torch.float32)
        incoming = torch.empty_like(snapshot)
        transfer = self.transport.exchange(snapshot, send_to, incoming, receive_from, "gossip")
        return transfer, incoming

    def continual_learning_update(self, gossip: tuple[Transfer, torch.Tensor], fakes: torch.Tensor) -> None:
        """Non-IID optimizer, update: mix in the peer's D, then fit own data while held to the peer."""
        transfer, incoming = gossip
        transfer.wait()
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

    def upload_discriminator(self, report: WorkerReport, round_index: int) -> Transfer | None:
        """Send (trunk_k, head_k) plus the round report to the server, asynchronously, in an
        authenticated envelope the server validates before averaging."""
        transfer = send_update(
            self.transport,
            self.context.session_keys[SERVER_RANK],
            flatten(self.layout.update_tensors(self.D, self.context.task)),
            report.to_tensor(),
            self.update_layouts[self.context.task],
            round_index,
            SERVER_RANK,
            "discriminator-update",
            self.wire_dtype or torch.float32,
        )
        return self.overlap.outgoing(transfer)

    def worker_finish(self) -> None:
        settle(self.incoming_generator, self.incoming_discriminator, self.upload_in_flight)
        self.incoming_generator = self.incoming_discriminator = None

    def worker_state(self) -> dict[str, Any]:
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
        }

    def load_worker_state(self, state: dict[str, Any]) -> None:
        self.D.load_state_dict(state["discriminator"])
        self.d_optimizer.load_state_dict(state["discriminator_optimizer"])
        self.real.load_state_dict(state["real_batches"])
        self.latent_stream.set_state(state["latent_stream"])
        if self.private is not None:
            self.private.load_state_dict(state["private"])

    def worker_digest(self) -> dict[str, float]:
        return model_digest(self.G, "generator")


def add_generator_gradients(
    generator: Generator,
    discriminator: Discriminator,
    latents: torch.Tensor,
    tasks: torch.Tensor,
    microbatch: int,
    in_place: bool,
) -> tuple[float, float]:
    """Add the gradient of the batch's non-saturating G loss against `discriminator` to G's `.grad`,
    computed `microbatch` samples at a time; return the batch's loss and the mean realness D gave
    its samples. `in_place`: G's gradients are bound (`engine.memory_layout.bind_gradients`) and
    its linear layers add theirs into them directly."""
    batch_size = latents.shape[0]
    loss_sum = fooled_sum = 0.0
    for z, task in zip(latents.split(microbatch), tasks.split(microbatch), strict=True):
        share = z.shape[0] / batch_size
        with linear_gradients_in_place(generator) if in_place else nullcontext():
            fakes = generator(z, task)
        loss, fooled = generator_loss(discriminator, fakes, task)
        (loss * share).backward()
        loss_sum += loss.item() * share
        fooled_sum += fooled * share
    return loss_sum, fooled_sum
