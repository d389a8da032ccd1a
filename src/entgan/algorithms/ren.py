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

As in the paper, the server first collects every device's result and then computes their average
(so it holds the K uploaded discriminators at once; averaging on arrival without the copies is
EntGAN's own step 3, not Ren et al.'s). The average uses the same multi-task rule as EntGAN (trunk
over all devices, each head over its task's devices, sample-weighted), and broadcasts are sent
asynchronously, waited for only before the model they carry changes.
"""

from __future__ import annotations

import torch

from entgan.algorithms.aggregation import DiscriminatorAverager
from entgan.algorithms.base import WorkerReport
from entgan.algorithms.server_generator import ServerGenerator


class _RenDistributedGAN(ServerGenerator):
    """What both schedules share: devices upload D_k, the server averages them into D."""

    def server_setup(self) -> None:
        super().server_setup()
        self.averager = DiscriminatorAverager(self.layout, len(self.config.tasks), self.context.device)
        self.collected: dict[int, torch.Tensor] = {}

    def absorb_upload(self, rank: int, values: torch.Tensor) -> None:
        self.collected[rank] = values.clone()  # the devices' results, kept until all have arrived

    def average_discriminators(self, round_index: int) -> tuple[dict[int, WorkerReport], int]:
        """D := weighted average of this round's accepted D_k (D stays as it was if none was)."""
        reports, refused = self.gather_uploads(round_index)
        self.settle_discriminator_send()
        if self.collected:
            self.averager.reset()
            for rank, values in sorted(self.collected.items()):
                self.averager.add(values, self.context.task_of(rank), self.sample_counts[rank])
            self.averager.write_into(self.D)
        self.collected.clear()
        return reports, refused

    def update_generator(self) -> tuple[float, float]:
        """g_steps G updates against the server's current D."""
        return self.train_generator([self.D] * self.steps.g_steps)

    def broadcast(self) -> None:
        self.send_generator()
        self.send_discriminator()


class RenSerial(_RenDistributedGAN):
    name = "ren-serial"

    def server_round(self, round_index: int) -> dict[str, float]:
        reports, refused = self.average_discriminators(round_index)
        generator_step = self.update_generator()
        self.broadcast()
        return self.round_metrics(generator_step, self.steps.g_steps, reports, refused)


class RenParallel(_RenDistributedGAN):
    name = "ren-parallel"

    def server_round(self, round_index: int) -> dict[str, float]:
        generator_step = self.update_generator()  # against D^t, while the devices train theirs
        reports, refused = self.average_discriminators(round_index)
        self.broadcast()
        return self.round_metrics(generator_step, self.steps.g_steps, reports, refused)
