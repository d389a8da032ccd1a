"""DANCE / AC-GAN: gossiping discriminator nodes with bandwidth-adaptive compression.

Zhang, Zhu, Wang, Bao, Yang, "DANCE: Distributed Generative Adversarial Networks with
Communication Compression", ACM Transactions on Internet Technology 22(2), 2022,
doi:10.1145/3458929. DANCE splits a GAN between a generator node (G-node) and discriminator nodes
(D-nodes) that hold the data; AC-GAN is its training algorithm: D-nodes update locally, aggregate
their discriminators by gossip with peers (randomised gossip, Boyd et al. 2006), and the generator
is trained as the leader of a Stackelberg game against the D-nodes' response; every exchange among
D-nodes is compressed as much as the measured link bandwidth requires.

Reading of the paper, stated where the abstract leaves room: "AC-GAN" is the paper's name for its
algorithm, not Odena et al.'s auxiliary-classifier GAN, so no auxiliary classifier is added; task
conditioning comes from the per-task heads of the shared `Discriminator`, as in every method here.
G and D are split between nodes (model parallelism): the G-node sends fake images forward and gets
dL/dx back, as MD-GAN does, which is why a D-node never holds G. Compression is applied to the
gossip (parameter) links; fake batches and their gradients travel in float32.

Who holds what: the server is the G-node (G and its optimizer; it builds one D only to give every
D-node the same start, then drops it); worker k is a D-node holding D_k and its own data.

    init: G-node builds G, D; every D-node k: D_k := D; every gossip link starts from D
    each round:
      G-node:   for every D-node k (task t_k):
                  X_k^d := G(z, t_k)  (d_steps batches),  X_k^g := G(z', t_k)  (one batch)
                  send (X_k^d, X_k^g) to k                             # fake-batch, down
      D-node k: d_steps times: D_k := D_k - lr * grad L_D(real_k, X_k^d)   # local update
                gossip with (send_to j, receive_from i)  [ring or random pairs, agreed by seed]:
                  c := the forced codec, or (auto) the least lossy whose payload crosses link
                       k->j within target_exchange_s at its smoothed measured bandwidth
                  send header c, then C_c(D_k - est_kj); est_kj += decoded     # gossip, compressed
                  receive i's header, then its payload; est_ik += decoded
                  D_k := (1 - mixing) * D_k + mixing * est_ik   (trunk; head t_k if t_i = t_k)
                  bandwidth_kj := EMA(payload bytes / transfer time)
                e_k := dL_G(D_k(X_k^g, t_k)) / dX_k^g  (D_k in eval mode)  # the follower's response
                send e_k (+ G loss, WorkerReport) to the G-node, in an update envelope  # feedback
      G-node:   G := Adam step on (1/K') sum_k <e_k, dX_k^g/dtheta>   over the K' accepted e_k
                                                                    # the leader's move

On the engine's hooks (`engine.method`): the G-node's `open_round` generates and sends the fakes,
`aggregate` places each e_k, `train_global` is the leader's move; a D-node's `local_round` is its
local update, gossip and response, `uploads` is e_k.

Carried to several tasks: a D-node trains only its own task's head, so gossip mixes the trunk with
every peer and the head of its task only with a peer of the same task; mixing it with another
task's node would pull it towards a head that node never trained. The paper's single task is the
case where every peer is of the same task. With the engine's participation below 1
(`engine.participation`) only the round's D-nodes get fakes and gossip, among themselves.

`est_kj` is D-node k's copy of what j believes D_k is; j holds the same vector, because both start
from the initial D and apply the same decoded differences. Whatever C_c dropped is still in the
next difference D_k - est_kj, so it is sent later (error feedback).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from entgan.algorithms.local_training import discriminator_step, error_feedback
from entgan.config import DanceConfig, NonIIDConfig
from entgan.control.noniid import NonIIDOptimizer
from entgan.control.overlap import settle
from entgan.data.sources import ImageDataset
from entgan.engine.compression import (
    BandwidthEstimate,
    Codec,
    CodecChooser,
    ReplicaReceiver,
    ReplicaSender,
    build_codec,
    codec_id,
    codec_named,
)
from entgan.engine.context import SERVER_RANK, SeedPurpose
from entgan.engine.method import Capabilities, LocalFigures, Method, ServerRole, Upload, UploadKind, WorkerRole
from entgan.engine.parameters import flatten, model_tensors, unflatten_into
from entgan.engine.reports import FigureMeans
from entgan.engine.transport import BODY_SUFFIX, Transfer, Transport
from entgan.engine.updates import Update, UpdateLayout
from entgan.gan import RealBatches, adam, model_digest
from entgan.gan.feedback import FakesAwaitingFeedback
from entgan.gan.memory_layout import GeneratorGradients
from entgan.models import build_discriminator, build_generator
from entgan.models.discriminator import Discriminator, head_prefix, is_shared
from entgan.models.generator import Generator

AUTO_LADDER: tuple[str, ...] = ("none", "fp16", "int8", "topk")
"""Codecs `auto` chooses from, least to most compressed (bf16 is fp16's size: only when forced)."""

GENERATOR_FIGURES = ("g_loss", "g_fake_realness")
"""What a D-node appends to its feedback: its G loss and the realness D_k gives X^g."""


class CompressedGossip:
    """One D-node's side of compressed, bandwidth-adaptive gossip of its discriminator.

    Per outgoing link: a `ReplicaSender` and a `BandwidthEstimate`; per incoming link: a
    `ReplicaReceiver`. Links open on first use, all from the initial D that every D-node received
    (with random pairs a node may hold one estimate per peer; with a ring, one each way).

    A node mixes towards its estimate of the peer. With a lossy codec that estimate lags by what
    error feedback has not delivered yet: the D-nodes still come to agree, but on a value that is
    not exactly the average of their discriminators (exact with `none`; see the consensus test).
    """

    def __init__(self, config: DanceConfig, transport: Transport, initial: torch.Tensor) -> None:
        self.config = config
        self.transport = transport
        self.initial = initial.detach().clone()
        self.numel = initial.numel()
        self.codecs = {
            name: build_codec(name, config.topk_ratio, config.int8_chunk_size)
            for name in ("none", "fp16", "bf16", "int8", "topk")
        }
        self.chooser = CodecChooser([self.codecs[name] for name in AUTO_LADDER], config.target_exchange_s)
        self.senders: dict[int, ReplicaSender] = {}
        self.receivers: dict[int, ReplicaReceiver] = {}
        self.bandwidth: dict[int, BandwidthEstimate] = {}
        self.codec_uses: Counter[str] = Counter()
        self.payload_bytes_sent = 0
        self.raw_bytes_sent = 0

    def codec_for(self, peer: int) -> Codec:
        """The sender's choice for its link to `peer` (announced to the peer in the header)."""
        if self.config.codec != "auto":
            return self.codecs[self.config.codec]
        estimate = self.bandwidth.get(peer)
        return self.chooser.choose(self.numel, None if estimate is None else estimate.bytes_per_second)

    def exchange(self, vector: torch.Tensor, send_to: int, receive_from: int) -> torch.Tensor:
        """Send `vector` (compressed) to `send_to`; return this node's estimate of `receive_from`'s."""
        codec = self.codec_for(send_to)
        header_out = torch.tensor([codec_id(codec)], dtype=torch.int64, device=vector.device)
        header_in = torch.empty_like(header_out)
        self.transport.exchange(header_out, send_to, header_in, receive_from, "gossip").wait()
        incoming_codec = codec_named(int(header_in.item()), list(self.codecs.values()))

        sender = self.senders.setdefault(send_to, ReplicaSender(self.initial))
        receiver = self.receivers.setdefault(receive_from, ReplicaReceiver(self.initial))
        payload = sender.encode(vector, codec)
        buffers = incoming_codec.empty_payload(self.numel, vector.device)
        # Both ends have just met at the header, so this measures the transfer, not the peer's compute.
        started = time.perf_counter()
        self.transport.exchange_many(payload, send_to, buffers, receive_from, "gossip" + BODY_SUFFIX).wait()
        elapsed = time.perf_counter() - started

        outgoing_bytes = codec.payload_bytes(self.numel)
        # Full-duplex links: both directions cross at once, the larger payload sets the time.
        moved = max(outgoing_bytes, incoming_codec.payload_bytes(self.numel))
        self.bandwidth.setdefault(send_to, BandwidthEstimate(self.config.bandwidth_smoothing)).observe(moved, elapsed)
        self.codec_uses[codec.name] += 1
        self.payload_bytes_sent += outgoing_bytes
        self.raw_bytes_sent += self.codecs["none"].payload_bytes(self.numel)
        return receiver.decode(buffers, incoming_codec)

    def state_dict(self) -> dict[str, Any]:
        """Every open link: the replica estimates at both ends (what error feedback has not
        delivered yet lives in them) and the measured bandwidths the next codec choice reads; and
        the figures of the digest."""
        return {
            "senders": {peer: sender.mirror.estimate.clone() for peer, sender in self.senders.items()},
            "receivers": {peer: receiver.estimate.clone() for peer, receiver in self.receivers.items()},
            "bandwidth": {peer: estimate.bytes_per_second for peer, estimate in self.bandwidth.items()},
            "codec_uses": dict(self.codec_uses),
            "payload_bytes_sent": self.payload_bytes_sent,
            "raw_bytes_sent": self.raw_bytes_sent,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.senders, self.receivers, self.bandwidth = {}, {}, {}
        for peer, estimate in state["senders"].items():
            sender = self.senders[int(peer)] = ReplicaSender(self.initial)
            sender.mirror.estimate.copy_(estimate)
        for peer, estimate in state["receivers"].items():
            receiver = self.receivers[int(peer)] = ReplicaReceiver(self.initial)
            receiver.estimate.copy_(estimate)
        for peer, bytes_per_second in state["bandwidth"].items():
            bandwidth = self.bandwidth[int(peer)] = BandwidthEstimate(self.config.bandwidth_smoothing)
            bandwidth.bytes_per_second = bytes_per_second
        self.codec_uses = Counter(state["codec_uses"])
        self.payload_bytes_sent = int(state["payload_bytes_sent"])
        self.raw_bytes_sent = int(state["raw_bytes_sent"])

    def digest(self) -> dict[str, float]:
        figures: dict[str, float] = {f"gossip_codec/{name}": float(n) for name, n in sorted(self.codec_uses.items())}
        figures["gossip_payload_bytes_sent"] = float(self.payload_bytes_sent)
        figures["gossip_uncompressed_bytes_sent"] = float(self.raw_bytes_sent)
        for peer, estimate in sorted(self.bandwidth.items()):
            if estimate.bytes_per_second is not None:
                figures[f"gossip_bandwidth_to_rank{peer}"] = estimate.bytes_per_second
        return figures


class _DanceRole:
    """Sizes and models both nodes agree on."""

    config: Any
    context: Any

    @property
    def dance(self) -> DanceConfig:
        return self.config.baselines.dance

    @property
    def fake_batch_shape(self) -> tuple[int, ...]:
        return (self.config.optimizer.batch_size, *self.config.image_shape)

    def feedback_layout(self) -> UpdateLayout:
        """A feedback upload's values: dL_G/dx for one fake batch."""
        return UpdateLayout.of([("feedback", torch.empty(self.fake_batch_shape))])

    def new_discriminator(self) -> Discriminator:
        return build_discriminator(self.config.model, self.config.image_shape, len(self.config.tasks)).to(
            self.context.device
        )


class DanceGNode(_DanceRole, ServerRole):
    """The G-node (server): G and its optimizer; fakes forward, feedback back."""

    @property
    def generator(self) -> Generator:
        return self.G

    def setup(self) -> None:
        torch.manual_seed(self.config.seed)
        device = self.context.device
        self.G = build_generator(self.config.model, self.config.image_shape, len(self.config.tasks)).to(device)
        initial_D = self.new_discriminator()
        self.g_optimizer = adam(self.G.parameters(), self.config.optimizer.lr_generator, self.config.optimizer)
        self.gradients = GeneratorGradients(self.G, self.config.engine.memory_layout, self.context.device)
        self.latents = self.context.generator_seed(SeedPurpose.LATENTS)
        workers = self.context.worker_ranks
        # Init: D_k := D for every D-node (resuming too: it is where every gossip link started).
        # The G-node keeps no D after this.
        self.transport.send_to_many(model_tensors(initial_D), workers, "discriminator").wait()
        del initial_D
        layout = self.feedback_layout()
        self.upload_kinds = [UploadKind("feedback", layout_of=lambda rank: layout, figures=GENERATOR_FIGURES)]
        self.fakes_in_flight: list[Transfer] = []
        if self.resumed_state is not None:
            self.load_state_dict(self.resumed_state)

    def open_round(self, round_index: int, participants: list[int]) -> None:
        """X_k^d for every D-node in one pass without a graph; X_k^g in one pass whose graph is held
        or recomputed when the responses land (`engine.feedback_graphs`); each D-node's share goes
        down as one message."""
        self.participants_now = participants
        batch_size = self.config.optimizer.batch_size
        d_steps = self.dance.d_steps
        worker_tasks = torch.tensor([self.context.task_of(rank) for rank in participants], device=self.context.device)
        d_tasks = worker_tasks.repeat_interleave(d_steps * batch_size)
        with torch.no_grad():
            d_fakes = self.G(self._latents(d_tasks.numel()), d_tasks)
        g_tasks = worker_tasks.repeat_interleave(batch_size)
        graphs = self.config.engine.feedback_graphs
        self.g_fakes = FakesAwaitingFeedback(self.G, self._latents(g_tasks.numel()), g_tasks, graphs, self.gradients.forward)
        settle(*self.fakes_in_flight)
        self.fakes_in_flight = [
            self.transport.send([torch.cat([d_part.reshape(-1), g_part.reshape(-1)])], rank, "fake-batch")
            for rank, d_part, g_part in zip(
                participants, d_fakes.split(d_steps * batch_size), self.g_fakes.images.split(batch_size), strict=True
            )
        ]

    def _latents(self, count: int) -> torch.Tensor:
        return self.G.sample_latent(count, generator=self.latents)

    def aggregate(self, round_index: int, kind: str, accepted: Iterator[Update]) -> None:
        """dL_G/dX_k^g from every D-node, in arrival order, placed at k's rows of X^g; the rows of
        a refused upload stay zero, so that D-node does not steer G this round."""
        batch_size = self.config.optimizer.batch_size
        self.feedback = torch.zeros_like(self.g_fakes.images)
        self.feedbacks_in = 0
        for update in accepted:
            rows = self.participants_now.index(update.rank) * batch_size
            self.feedback[rows : rows + batch_size] = update.values.view(self.fake_batch_shape)
            self.feedbacks_in += 1

    def train_global(self, round_index: int) -> dict[str, float]:
        """The leader's move: the mean G loss over the D-nodes heard from, through G."""
        if self.feedbacks_in:
            self.gradients.zero(self.g_optimizer)
            self.g_fakes.backpropagate(self.feedback / self.feedbacks_in)
            self.g_optimizer.step()
            self.gradients.release(self.g_optimizer)
        self.g_fakes.drop()
        del self.g_fakes, self.feedback
        return {"g_steps": 1.0 if self.feedbacks_in else 0.0}

    def finish(self) -> None:
        settle(*self.fakes_in_flight)
        self.fakes_in_flight = []

    def state_dict(self) -> dict[str, Any]:
        """G, its optimizer and the latent stream of the next round's fakes. The fakes sent in a
        round were received (and answered) by every D-node within it, so nothing else is pending."""
        return {
            "generator": self.G.state_dict(),
            "generator_optimizer": self.g_optimizer.state_dict(),
            "latent_stream": self.latents.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["generator"])
        self.g_optimizer.load_state_dict(state["generator_optimizer"])
        self.latents.set_state(state["latent_stream"])


class DanceDNode(_DanceRole, WorkerRole):
    """A D-node (worker): D_k and its data; local steps, compressed gossip, the follower's response."""

    def setup(self, shard: ImageDataset) -> None:
        torch.manual_seed(self.config.seed + self.context.rank)
        self.D = self.new_discriminator()
        self.peer_D = self.new_discriminator()  # scratch module the peer's estimate is loaded into
        self.transport.receive(model_tensors(self.D), SERVER_RANK, "discriminator").wait()
        self.d_optimizer = adam(self.D.parameters(), self.config.optimizer.lr_discriminator, self.config.optimizer)
        self.real = RealBatches(
            shard, self.config.optimizer.batch_size, self.context.generator_seed(SeedPurpose.REAL_BATCHES), self.context.device
        )
        # Partner choice (ring / random pairs from the shared seed) and parameter mixing are the
        # engine's gossip mechanics; DANCE's own part is the compressed, bandwidth-adaptive link.
        self.peers = NonIIDOptimizer(
            NonIIDConfig(topology=self.dance.topology, mixing=self.dance.mixing),
            self.context.worker_index,
            self.config.num_workers,
            self.config.seed,
        )
        self.gossip = CompressedGossip(self.dance, self.transport, flatten(model_tensors(self.D)))
        self.fakes = torch.empty(
            (self.dance.d_steps + 1) * self.config.optimizer.batch_size,
            *self.config.image_shape,
            device=self.context.device,
        )
        if self.resumed_state is not None:  # after the gossip's links took the initial D as their start
            self.load_state_dict(self.resumed_state)

    def local_round(self, round_index: int) -> LocalFigures:
        self.transport.receive([self.fakes], SERVER_RANK, "fake-batch").wait()
        d_fakes, g_fakes = self.fakes.split(
            [self.dance.d_steps * self.config.optimizer.batch_size, self.config.optimizer.batch_size]
        )
        d_figures = self.local_update(d_fakes)
        self.gossip_round(round_index)
        # The follower's response for the leader: dL_G/dX^g under D_k (non-saturating loss).
        self.response, g_loss, g_realness = error_feedback(self.D, g_fakes, self.context.task)
        self.response_figures = [g_loss, g_realness]
        return LocalFigures(*d_figures.means())

    def uploads(self, round_index: int) -> Sequence[Upload]:
        return [Upload("feedback", self.response, self.feedback_layout(), figures=self.response_figures)]

    def local_update(self, d_fakes: torch.Tensor) -> FigureMeans:
        """D_k trains on local real data against the G-node's fakes, one fresh batch per step."""
        figures = FigureMeans(3)  # loss, real realness, fake realness
        for fakes in d_fakes.split(self.config.optimizer.batch_size):
            figures.add(*discriminator_step(self.D, self.d_optimizer, self.real.next(), fakes, self.context.task))
        return figures

    def gossip_round(self, round_index: int) -> None:
        """Compressed exchange with this round's peers (among the round's participants), then
        D_k := (1 - m) D_k + m * peer estimate, over the trunk, and over this task's head only when
        the peer serves the same task (another task's node never trains this task's head)."""
        partners = self.peers.partners(round_index, among=self.context.participation.workers(round_index))
        if partners is None:  # a single D-node, or the odd one out of random pairs
            return
        send_to, receive_from = (self.context.rank_of_worker(index) for index in partners)
        peer_estimate = self.gossip.exchange(flatten(model_tensors(self.D)), send_to, receive_from)
        unflatten_into(peer_estimate, model_tensors(self.peer_D))
        task = self.context.task
        same_task = self.context.task_of(receive_from) == task
        own_head = head_prefix(task)
        self.peers.mix(self.D, self.peer_D, only=lambda name: is_shared(name) or (same_task and name.startswith(own_head)))

    def state_dict(self) -> dict[str, Any]:
        """D_k, its optimizer, the real-batch stream and the gossip links' state. A round's
        gossip is complete within the round; `peer_D` is scratch."""
        return {
            "discriminator": self.D.state_dict(),
            "discriminator_optimizer": self.d_optimizer.state_dict(),
            "real_batches": self.real.state_dict(),
            "gossip": self.gossip.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.D.load_state_dict(state["discriminator"])
        self.d_optimizer.load_state_dict(state["discriminator_optimizer"])
        self.real.load_state_dict(state["real_batches"])
        self.gossip.load_state_dict(state["gossip"])

    def digest(self) -> dict[str, float]:
        """D_k's fingerprint (D-nodes hold no G) and what the compressed gossip did."""
        return {**model_digest(self.D, "discriminator"), **self.gossip.digest()}


class DanceACGAN(Method):
    name = "acgan-dance"
    capabilities = Capabilities(resume=True, partial_participation=True)
    server = DanceGNode
    worker = DanceDNode
