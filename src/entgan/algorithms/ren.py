"""Ren, Liu, Yu, Guo 2021, "A New Distributed Method for Training Generative Adversarial Networks"
(arXiv 2107.08681): devices train local discriminators, the server averages them and trains G.

Who holds what: the server holds the global G and the global D; device (worker) k holds a copy of
both and trains its copy D_k on its local data. What moves each round: D_k up (shared trunk + its
task's head, with the round's report), the averaged D and the updated G down to every device.

The paper gives two update schedules over the same steps.

Serial (`ren-serial`): devices and server strictly alternate.

    init: G_k := G, D_k := D for every device k
    round t:
      device k:  D_k := D^t                      (received at the end of round t-1)
                 d_steps times: D_k := D_k - lr * grad L_D(real_k, G^t(z, task_k))
                 send D_k to the server
      server:    D^{t+1} := sample-weighted average of the D_k   (trunk over all devices, head t
                                                                  over task t's devices)
                 g_steps times: G := G - lr * grad L_G(D^{t+1}(G(z, t), t))     -> G^{t+1}
                 send G^{t+1}, D^{t+1} to every device

Parallel (`ren-parallel`): the server's G update runs at the same time as the devices' D update,
both starting from the models of the last broadcast (G^t, D^t). G^{t+1} is therefore trained
against D^t, one round older than in the serial schedule (staleness one round), and a round costs
the longer of the two updates instead of their sum.

    round t:
      device k:  as in the serial schedule: D_k := D^t, train D_k against G^t, send D_k
      server:    g_steps times: G := G - lr * grad L_G(D^t(G(z, t), t))          -> G^{t+1}
                 (meanwhile the devices train their D_k)
                 D^{t+1} := sample-weighted average of the D_k
                 send G^{t+1}, D^{t+1} to every device

On the engine's hooks (`engine.method`): the devices' round is `server_generator.DiscriminatorWorker`;
the server's `aggregate` collects the D_k and averages them, `train_global` trains G (serial), or
`open_round` does it before the uploads arrive (parallel); `send_down` sends G and D.

As in the paper, the server first collects every device's result and then computes their average
(so it holds the K uploaded discriminators at once; averaging on arrival without the copies is
EntGAN's own step 3, not Ren et al.'s). The average uses the same multi-task rule as EntGAN (trunk
over all devices, each head over its task's devices, sample-weighted), and broadcasts are sent
asynchronously, waited for only before the model they carry changes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from entgan.algorithms.aggregation import DiscriminatorAverager
from entgan.algorithms.server_generator import DiscriminatorWorker, GeneratorServer
from entgan.engine.method import Capabilities, Method
from entgan.engine.updates import Update


class _RenServer(GeneratorServer):
    """What both schedules share: devices upload D_k, the server averages them into D."""

    def setup(self) -> None:
        super().setup()
        self.averager = DiscriminatorAverager(self.layout, len(self.config.tasks), self.context.device)
        self.collected: dict[int, torch.Tensor] = {}

    def aggregate(self, round_index: int, kind: str, accepted: Iterator[Update]) -> None:
        """D := weighted average of this round's accepted D_k, once all have arrived (D stays as
        it was if none was accepted)."""
        for update in accepted:
            self.collected[update.rank] = update.values.clone()  # the devices' results, kept until all are in
        self.settle_discriminator_send()
        if self.collected:
            self.averager.reset()
            for rank, values in sorted(self.collected.items()):
                self.averager.add(values, self.context.task_of(rank), self.sample_counts[rank])
            self.averager.write_into(self.D)
        self.collected.clear()

    def update_generator(self) -> dict[str, float]:
        """g_steps G updates against the server's current D."""
        return self.train_generator([self.D] * self.steps.g_steps)


class RenSerialServer(_RenServer):
    """Average the round's D_k, then train G against the new D."""

    def train_global(self, round_index: int) -> dict[str, float]:
        return self.update_generator()


class RenParallelServer(_RenServer):
    """Train G against D^t while the devices train theirs; average when their uploads are in."""

    def open_round(self, round_index: int, participants: list[int]) -> None:
        self.generator_step = self.update_generator()

    def train_global(self, round_index: int) -> dict[str, float]:
        return self.generator_step


class RenSerial(Method):
    name = "ren-serial"
    capabilities = Capabilities(resume=True)
    server = RenSerialServer
    worker = DiscriminatorWorker


class RenParallel(Method):
    name = "ren-parallel"
    capabilities = Capabilities(resume=True)
    server = RenParallelServer
    worker = DiscriminatorWorker
