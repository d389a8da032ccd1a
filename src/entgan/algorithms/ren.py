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

The paper collects every device's result before it averages them; averaging is linear, so the
server sums each D_k straight into D's float32 tensors as it reads it (in rank order, so the sum is
the same every run) and divides at the end: the same average without K copies, the memory layout
every method whose server averages gets (`aggregation.InPlaceDiscriminatorAverage`). Carried to
several tasks: the trunk is averaged over all devices and each head over its task's devices,
sample-weighted, as every method here averages a multi-head D. Broadcasts are sent asynchronously,
waited for only before the model they carry changes; with the engine's participation below 1
(`engine.participation`) a round averages the D_k of its devices.
"""

from __future__ import annotations

from collections.abc import Iterator

from entgan.algorithms.aggregation import DiscriminatorUploads
from entgan.algorithms.server_generator import DiscriminatorWorker, GeneratorServer
from entgan.engine.method import Capabilities, Method
from entgan.engine.updates import Update


class _RenServer(GeneratorServer):
    """What both schedules share: devices upload D_k, the server averages them into D."""

    uploads_in_order = True  # summed into D in rank order: the same float32 sum every run

    def setup(self) -> None:
        super().setup()
        self.discriminator_uploads = DiscriminatorUploads(self.layout, len(self.config.tasks), changes=False)

    def aggregate(self, round_index: int, kind: str, accepted: Iterator[Update]) -> None:
        """D := weighted average of this round's accepted D_k, summed into D as each is read (a
        part with no accepted update keeps its values)."""
        self.settle_discriminator_send()
        participants = self.participants(round_index)
        self.discriminator_uploads.fold(self.D, accepted, participants, self.context.task_of, self.sample_counts)

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
    capabilities = Capabilities(resume=True, partial_participation=True)
    server = RenSerialServer
    worker = DiscriminatorWorker


class RenParallel(Method):
    name = "ren-parallel"
    capabilities = Capabilities(resume=True, partial_participation=True)
    server = RenParallelServer
    worker = DiscriminatorWorker
