"""MD-GAN: one generator on the server, one discriminator per worker (Hardy, Le Merrer, Sericola,
"MD-GAN: Multi-Discriminator Generative Adversarial Networks for Distributed Datasets", IPDPS 2019,
arXiv:1811.03850).

Who holds what: the server holds G and its optimizer; worker n holds its own D_n (initialised
locally, never averaged, never seen by the server) and its data. What moves each round: two
generated batches down to every worker ("fake-batch"), the error feedback dL_G/dx up from every
worker ("feedback"), and every P rounds each D_n to another worker ("gossip", peer-to-peer).
G's parameters never leave the server.

On the engine's hooks (`engine.method`): the server's `open_round` generates each task's batches
and sends every worker its two, `aggregate` back-propagates each batch's feedback once it is in,
`train_global` takes the Adam step; a worker's `local_round` is its D steps, F_n and the swap,
`uploads` is F_n.

    setup:    worker n: build D_n; send (task t_n, shard size m_n) to the server
              server:   build G; announce the swap period P = round(E * mean_n(m_n) / b) rounds
                        (E local epochs at one real batch of b per round)
    round i = 1, 2, ...:
      server:   for each task t, with workers N_t and k_t batches:
                  X_t^1 .. X_t^k := G(Z^1, t) .. G(Z^k, t)   (the graph kept for those used as X(g))
                  worker j of t: (X(d)_j, X(g)_j) := (X_t^(2j mod k), X_t^(2j+1 mod k)); send both
      worker n: X(r)_n := b samples of the local shard
                L times: D_n := D_n - lr * grad L_D(X(r)_n, X(d)_n)    (task t_n's head)
                F_n := { dL_G(D_n(X(g)_n)) / dx  for x in X(g)_n }     (D_n in eval mode)
                send F_n to the server
                if i mod P == 0: send D_n to worker pi_i(n) of the same task;
                                 D_n := the D received from pi_i^-1(n)
      server:   grad_w := 1/N sum_n sum_{x in X(g)_n} F_n(x) . dx/dw   (the F_n of one batch are
                          summed; X_t^b.backward(sum) once its last F_n is in, which frees that
                          batch's graph; then the division by N)
                G := Adam step with grad_w

Choices where the paper leaves room or the multi-task setting asks for one:
- The paper's server generates k <= N distinct batches and hands each worker two of them, and
  discusses small k (such as log N): the server's work and memory grow with k, not N. G is
  task-conditioned here and a worker's batches must be of its own task, so the batches are per
  task: k_t of them for the task's N_t workers (`baselines.mdgan.batches_per_task`), by default
  max(2, ceil(log2 N_t)): two is the fewest that still gives every worker two distinct batches, one
  to train D_n on and one to answer with feedback. Batches are dealt in turn (`deal_batches`), so
  they are used evenly. The server holds at most k_t graphs per task, or one at a time with
  `engine.feedback_graphs: recomputed` (`gan.feedback`).
- The feedback F_n is computed with D_n in eval mode (dropout off): the server back-propagates it
  into G, and dropout's masks would only add noise. D_n's training steps keep their dropout.
- pi_i is a random derangement within each task's workers, drawn from the run seed and the swap's
  index (`swap_partners`), so every worker agrees on it without a coordinator, and every worker of
  a task with two or more workers sends and receives exactly one D. Swapping within a task keeps a
  D_n's task head trained on the data it sees (a swap across tasks hands a worker a D whose head
  for its task another task's worker never trained). The whole D moves (trunk and heads); each
  worker keeps its own Adam state, as the paper swaps parameters only. A task's only worker has no
  one to swap with and keeps its D.
- With the engine's participation below 1 (`engine.participation`; the paper's server may wait
  for a subset of workers), a round's batches are dealt to its workers only (k_t from their
  number) and only they swap, among themselves.
- Epochs count real samples drawn; shards may differ in size, so the period is computed once by
  the server from the mean shard (the paper's shards are equal) and every worker swaps together.
- Losses are the project's shared non-saturating GAN losses (the same for every method).
- F_n travels in the engine's authenticated update envelope (`engine.updates`), like every upload
  the server acts on; a refused F_n is logged and left out, and N counts the accepted ones.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import torch

from entgan.algorithms.local_training import discriminator_step, error_feedback
from entgan.config import RunConfig
from entgan.control.overlap import settle
from entgan.data.sources import ImageDataset
from entgan.engine.context import SERVER_RANK, SeedPurpose
from entgan.engine.method import Capabilities, LocalFigures, Method, ServerRole, Upload, UploadKind, WorkerRole
from entgan.engine.parameters import flatten, model_tensors, unflatten_into
from entgan.engine.reports import FigureMeans
from entgan.engine.transport import Transfer
from entgan.engine.updates import Update, UpdateLayout
from entgan.engine.uploads import receive_hellos, send_hello
from entgan.gan import RealBatches, adam, model_digest
from entgan.gan.feedback import FakesAwaitingFeedback
from entgan.gan.memory_layout import GeneratorGradients
from entgan.models import build_discriminator, build_generator
from entgan.models.generator import Generator

FEEDBACK_FIGURES = ("g_loss", "g_fake_realness")
"""What a worker appends to its feedback: its G loss and the realness D_n gives X(g)_n."""


# ---------------------------------------------------------------------- the method's math
# The worker's half, F_n = dL_G/dx, is `local_training.error_feedback` (DANCE returns the same);
# the server's, sum_x F_n(x) . dx/dw through the batch's graph, is `gan.feedback`.
def average_gradients(module: torch.nn.Module, count: int) -> None:
    """Divide the gradients summed over `count` workers' feedback by `count` (the paper's 1/N)."""
    for parameter in module.parameters():
        if parameter.grad is not None:
            parameter.grad.div_(count)


def swap_period(swap_every_epochs: float, shard_sizes: list[int], batch_size: int) -> int:
    """Rounds between two swaps: E epochs of the mean shard at one real batch of `batch_size` per round."""
    if not shard_sizes:
        raise ValueError("no worker shards to compute the swap period from")
    mean_shard = sum(shard_sizes) / len(shard_sizes)
    return max(1, round(swap_every_epochs * mean_shard / batch_size))


def swap_partners(
    worker_tasks: Sequence[int], seed: int, swap_index: int, among: Collection[int] | None = None
) -> list[int]:
    """pi for swap number `swap_index`: worker n sends its D to worker pi[n], a worker of the same
    task. Within each task of two or more workers, a derangement (nobody keeps its own D) drawn
    from the run seed, so every worker computes the same pi on its own; a task's only worker maps
    to itself (it does not swap). `among`: the workers taking part in the swap's round (the
    engine's participation policy); the others map to themselves."""
    stream = torch.Generator().manual_seed(seed * 1_000_003 + swap_index)
    partners = list(range(len(worker_tasks)))
    by_task: dict[int, list[int]] = defaultdict(list)
    for worker, task in enumerate(worker_tasks):
        if among is None or worker in among:
            by_task[task].append(worker)
    for task in sorted(by_task):
        members = by_task[task]
        if len(members) < 2:
            continue
        while True:  # rejection sampling: a random permutation is a derangement with probability ~1/e
            order = torch.randperm(len(members), generator=stream).tolist()
            if all(target != source for source, target in enumerate(order)):
                break
        for source, target in enumerate(order):
            partners[members[source]] = members[target]
    return partners


def default_batches_per_task(workers: int) -> int:
    """k_t for a task of `workers` workers: max(2, ceil(log2 N_t)) (see the module docstring)."""
    return max(2, math.ceil(math.log2(workers))) if workers > 1 else 2


def deal_batches(workers: int, batches: int) -> list[tuple[int, int]]:
    """(X(d), X(g)) batch indices for each of a task's `workers`, out of `batches` (k_t): worker j
    gets batches 2j and 2j+1 mod k_t, so every batch is used about equally often and, for
    k_t >= 2, a worker's two batches differ. Batches past 2 N_t would never be dealt: k_t is
    capped there."""
    batches = min(batches, 2 * workers)
    return [((2 * worker) % batches, (2 * worker + 1) % batches) for worker in range(workers)]


def feedback_layout(config: RunConfig) -> UpdateLayout:
    """A feedback upload's values: dL_G/dx for one fake batch."""
    return UpdateLayout.of([("feedback", torch.empty(config.optimizer.batch_size, *config.image_shape))])


class MDGANServer(ServerRole):
    """Holds G and its optimizer; generates every worker's batches and back-propagates their feedback."""

    @property
    def generator(self) -> Generator:
        return self.G

    @property
    def batch_size(self) -> int:
        return self.config.optimizer.batch_size

    def setup(self) -> None:
        config = self.config
        torch.manual_seed(config.seed)
        self.G = build_generator(config.model, config.image_shape, len(config.tasks)).to(self.context.device)
        self.g_optimizer = adam(self.G.parameters(), config.optimizer.lr_generator, config.optimizer)
        self.gradients = GeneratorGradients(self.G, config.engine.memory_layout, self.context.device)
        self.latent_stream = self.context.generator_seed(SeedPurpose.LATENTS)
        layout = feedback_layout(config)
        self.upload_kinds = [UploadKind("feedback", layout_of=lambda rank: layout, figures=FEEDBACK_FIGURES)]
        counts = receive_hellos(self.context)
        self.swap_period = swap_period(config.baselines.mdgan.swap_every_epochs, list(counts.values()), self.batch_size)
        period = torch.tensor([self.swap_period], dtype=torch.int64, device=self.context.device)
        self.transport.send_to_many([period], self.context.worker_ranks, "hello").wait()
        if self.resumed_state is not None:
            self.load_state_dict(self.resumed_state)

    def open_round(self, round_index: int, participants: list[int]) -> None:
        """Each task's k_t batches, dealt two to each of its workers; a batch some worker answers
        with feedback keeps what its backward needs (`gan.feedback`).

        A worker's batches leave as soon as its task's batches exist, so it starts its D steps
        while the server is still generating for the next task."""
        self.awaiting: dict[tuple[int, int], FakesAwaitingFeedback] = {}
        self.answer_batch: dict[int, tuple[int, int]] = {}  # rank -> its X(g)'s (task, batch)
        self.sends: list[Transfer] = []
        by_task: dict[int, list[int]] = defaultdict(list)
        for rank in participants:
            by_task[self.context.task_of(rank)].append(rank)
        for task, ranks in sorted(by_task.items()):
            dealt = deal_batches(len(ranks), self.batches_per_task(len(ranks)))
            answered = {answer for _, answer in dealt}
            batches: list[torch.Tensor] = []
            for batch in range(max(max(pair) for pair in dealt) + 1):
                if batch in answered:
                    fakes = FakesAwaitingFeedback(
                        self.G, self._latents(), task, self.config.engine.feedback_graphs, self.gradients.forward
                    )
                    self.awaiting[(task, batch)] = fakes
                    batches.append(fakes.images)
                else:
                    with torch.no_grad():
                        batches.append(self.G(self._latents(), task))
            for rank, (for_discriminator, for_generator) in zip(ranks, dealt, strict=True):
                pair = [batches[for_discriminator], batches[for_generator]]
                self.sends.append(self.transport.send(pair, rank, "fake-batch"))
                self.answer_batch[rank] = (task, for_generator)
        self.graphs_held = sum(fakes.holds_graph for fakes in self.awaiting.values())
        self.gradients.zero(self.g_optimizer)

    def batches_per_task(self, workers: int) -> int:
        configured = self.config.baselines.mdgan.batches_per_task
        return configured if configured is not None else default_batches_per_task(workers)

    def _latents(self) -> torch.Tensor:
        return self.G.sample_latent(self.batch_size, generator=self.latent_stream)

    def aggregate(self, round_index: int, kind: str, accepted: Iterator[Update]) -> None:
        """grad_w += sum_x F(x) . dx/dw per batch, F summed over the workers that answered it, once
        the batch's last expected F has landed (which frees its graph)."""
        self.feedbacks_in = 0
        expected = defaultdict(int)
        for key in self.answer_batch.values():
            expected[key] += 1
        summed: dict[tuple[int, int], torch.Tensor] = {}
        for update in accepted:
            key = self.answer_batch[update.rank]
            summed[key] = summed[key] + update.values if key in summed else update.values.clone()
            expected[key] -= 1
            self.feedbacks_in += 1
            if expected[key] == 0:
                self.awaiting.pop(key).backpropagate(summed.pop(key))
        for key, feedback in summed.items():  # batches with some of their feedback refused
            self.awaiting.pop(key).backpropagate(feedback)
        for fakes in self.awaiting.values():  # batches whose feedback was all refused
            fakes.drop()
        self.awaiting.clear()

    def train_global(self, round_index: int) -> dict[str, float]:
        """G := Adam step with the gradient averaged over the accepted feedback (the paper's 1/N)."""
        if self.feedbacks_in:
            average_gradients(self.G, self.feedbacks_in)
            self.g_optimizer.step()
        self.gradients.release(self.g_optimizer)
        settle(*self.sends)
        return {"g_steps": 1.0 if self.feedbacks_in else 0.0, "feedback_graphs_held": float(self.graphs_held)}

    def state_dict(self) -> dict[str, Any]:
        """G, its optimizer and the latent stream the next round's fakes come from. Nothing is in
        flight between rounds: a round's fakes are generated, sent and answered within it."""
        return {
            "generator": self.G.state_dict(),
            "generator_optimizer": self.g_optimizer.state_dict(),
            "latent_stream": self.latent_stream.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["generator"])
        self.g_optimizer.load_state_dict(state["generator_optimizer"])
        self.latent_stream.set_state(state["latent_stream"])


class MDGANWorker(WorkerRole):
    """Holds its own D_n and data; returns the error feedback on the server's fakes; swaps D_n."""

    @property
    def batch_size(self) -> int:
        return self.config.optimizer.batch_size

    def setup(self, shard: ImageDataset) -> None:
        config = self.config
        device = self.context.device
        torch.manual_seed(config.seed + self.context.rank)  # the paper initialises each D_n locally
        self.D = build_discriminator(config.model, config.image_shape, len(config.tasks)).to(device)
        self.d_optimizer = adam(self.D.parameters(), config.optimizer.lr_discriminator, config.optimizer)
        self.real = RealBatches(shard, self.batch_size, self.context.generator_seed(SeedPurpose.REAL_BATCHES), device)
        self.fakes_for_discriminator = torch.empty(self.batch_size, *config.image_shape, device=device)
        self.fakes_for_generator = torch.empty_like(self.fakes_for_discriminator)
        self.feedback_layout = feedback_layout(config)
        send_hello(self.context, len(shard))
        period = torch.zeros(1, dtype=torch.int64, device=device)
        self.transport.receive([period], SERVER_RANK, "hello").wait()
        self.swap_period = int(period.item())
        self.swap_in_flight: tuple[Transfer, torch.Tensor] | None = None
        self.swaps = 0
        self.fake_sums = [0.0, 0.0]
        self.first_swap_round = self.last_swap_round = 0
        self.last_sent_sum = 0.0
        if self.resumed_state is not None:
            self.load_state_dict(self.resumed_state)

    def local_round(self, round_index: int) -> LocalFigures:
        incoming = self.transport.receive(
            [self.fakes_for_discriminator, self.fakes_for_generator], SERVER_RANK, "fake-batch"
        )
        real = self.real.next()  # X(r)_n, drawn while the fakes are in flight
        self.finish_swap()
        incoming.wait()
        self.fake_sums = [float(fakes.double().sum()) for fakes in (self.fakes_for_discriminator, self.fakes_for_generator)]
        task = self.context.task
        d_figures = FigureMeans(3)  # loss, real realness, fake realness
        for _ in range(self.config.baselines.mdgan.d_steps):
            d_figures.add(*discriminator_step(self.D, self.d_optimizer, real, self.fakes_for_discriminator, task))
        self.feedback, g_loss, g_realness = error_feedback(self.D, self.fakes_for_generator, task)
        self.feedback_figures = [g_loss, g_realness]
        # The swap is posted before the feedback leaves (both asynchronous) only so that this
        # round's report counts its bytes; D_n has produced F_n either way.
        round_number = round_index + 1
        if round_number % self.swap_period == 0:
            self.start_swap(round_number, among=self.context.participation.workers(round_index))
        return LocalFigures(*d_figures.means())

    def uploads(self, round_index: int) -> Sequence[Upload]:
        return [Upload("feedback", self.feedback, self.feedback_layout, figures=self.feedback_figures)]

    def start_swap(self, round_number: int, among: Collection[int]) -> None:
        """Send D_n to pi(n) and post the receive of pi^-1(n)'s D; it lands before D_n is used again.
        Swap number s is the same for every worker (the s-th multiple of the period), so a worker
        alone in its task, which never swaps, still agrees with the others on pi. Only the round's
        participants (`among`) swap: the others are not in the round to answer."""
        swap_index = round_number // self.swap_period - 1
        partners = swap_partners(self.config.worker_tasks(), self.config.seed, swap_index, among)
        me = self.context.worker_index
        if partners[me] == me:
            return
        send_to = self.context.rank_of_worker(partners[me])
        receive_from = self.context.rank_of_worker(partners.index(me))
        outgoing = flatten(model_tensors(self.D))
        incoming = torch.empty_like(outgoing)
        transfer = self.transport.exchange(outgoing, send_to, incoming, receive_from, "gossip")
        self.swap_in_flight = (transfer, incoming)
        self.swaps += 1
        self.first_swap_round = self.first_swap_round or round_number
        self.last_swap_round = round_number
        self.last_sent_sum = float(outgoing.double().sum())

    def finish_swap(self) -> None:
        if self.swap_in_flight is None:
            return
        transfer, incoming = self.swap_in_flight
        transfer.wait()
        unflatten_into(incoming, model_tensors(self.D))
        self.swap_in_flight = None

    def finish(self) -> None:
        self.finish_swap()

    def state_dict(self) -> dict[str, Any]:
        """D_n as the next round will use it: a swap posted in this round is completed first (the
        peer's D replaces D_n before anything reads D_n again, so completing it here changes nothing
        but when it is waited for). Then D_n's optimizer, the real-batch stream and the swap
        history the digest reports."""
        self.finish_swap()
        return {
            "discriminator": self.D.state_dict(),
            "discriminator_optimizer": self.d_optimizer.state_dict(),
            "real_batches": self.real.state_dict(),
            "swaps": self.swaps,
            "first_swap_round": self.first_swap_round,
            "last_swap_round": self.last_swap_round,
            "last_sent_sum": self.last_sent_sum,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.D.load_state_dict(state["discriminator"])
        self.d_optimizer.load_state_dict(state["discriminator_optimizer"])
        self.real.load_state_dict(state["real_batches"])
        self.swaps = int(state["swaps"])
        self.first_swap_round = int(state["first_swap_round"])
        self.last_swap_round = int(state["last_swap_round"])
        self.last_sent_sum = float(state["last_sent_sum"])

    def digest(self) -> dict[str, float]:
        """Which swaps happened, the D sent away last vs. the D held now, and the last round's
        fakes (tests trace swaps and shared batches)."""
        return {
            "swap_period": float(self.swap_period),
            "swaps": float(self.swaps),
            "first_swap_round": float(self.first_swap_round),
            "last_swap_round": float(self.last_swap_round),
            "last_sent_discriminator_sum": self.last_sent_sum,
            # The last round's X(d) and X(g): a task's workers share batches, tasks do not.
            "last_fakes_for_discriminator_sum": self.fake_sums[0],
            "last_fakes_for_generator_sum": self.fake_sums[1],
            **model_digest(self.D, "discriminator"),
        }


class MDGAN(Method):
    name = "mdgan"
    capabilities = Capabilities(resume=True, partial_participation=True)
    server = MDGANServer
    worker = MDGANWorker
