"""Central: one multi-task GAN trained on the pooled data of every task, in one place.

The quality reference, not a private method: it is what the distributed methods would reach if
the edge's data could be gathered. Same models, batch size, losses, Adam settings and steps per
round as the others (`server_generator.StepsPerRound`).

Who holds what: the server holds G, D and every task's images (all workers' shards together).
What moves: nothing (its server's `participants` are nobody, its `train_global` does the steps). The engine still starts the K worker processes; they take part in no
exchange and their rounds do nothing.

    init: G, D as every method builds them (same seed)
    round:
      server:  d_steps times: D := D - lr * grad L_D(real, G(z, t))
                   real: a batch of the pooled data, every task equally represented (as in G's
                   batches); the fakes are generated for the same tasks, each judged by its
                   task's head
               g_steps times: G := G - lr * grad L_G(D(G(z, t), t))
      workers: nothing
"""

from __future__ import annotations

from typing import Any

import torch

from entgan.algorithms.server_generator import StepsPerRound, train_discriminator, train_generator
from entgan.data import build_tasks, load_source
from entgan.data.sources import ImageDataset
from entgan.data.tasks import TaskData
from entgan.engine.context import SeedPurpose
from entgan.engine.method import Capabilities, LocalFigures, Method, ServerRole, WorkerRole
from entgan.gan import RealBatches, adam, balanced_tasks, build_models
from entgan.gan.memory_layout import GeneratorGradients
from entgan.models.generator import Generator


class PooledBatches:
    """Batches of the pooled data with every task equally represented, each task's images
    reshuffled per epoch from one seeded stream."""

    def __init__(
        self, tasks: list[TaskData], batch_size: int, generator: torch.Generator, device: torch.device
    ) -> None:
        per_task = torch.bincount(balanced_tasks(batch_size, len(tasks), torch.device("cpu")), minlength=len(tasks))
        if int(per_task.min()) == 0:
            raise ValueError(f"optimizer.batch_size ({batch_size}) must be at least the number of tasks ({len(tasks)})")
        self._batches = [
            RealBatches(task.dataset, int(count), generator, device) for task, count in zip(tasks, per_task)
        ]
        sizes = torch.tensor([batches.batch_size for batches in self._batches])  # a small task caps its share
        self.tasks = torch.repeat_interleave(torch.arange(len(tasks)), sizes).to(device)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and their task ids."""
        return torch.cat([batches.next() for batches in self._batches]), self.tasks

    def state_dict(self) -> dict[str, Any]:
        """Every task's shuffle and position (they share one random stream, so each entry holds
        the same stream state)."""
        return {"tasks": [batches.state_dict() for batches in self._batches]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["tasks"]) != len(self._batches):
            raise ValueError(
                f"checkpoint holds {len(state['tasks'])} tasks' batches, this run has {len(self._batches)}"
            )
        for batches, task_state in zip(self._batches, state["tasks"], strict=True):
            batches.load_state_dict(task_state)


class CentralServer(ServerRole):
    """G, D and the pooled data of every task; no uploads."""

    @property
    def generator(self) -> Generator:
        return self.G

    def setup(self) -> None:
        config = self.config
        device = self.context.device
        torch.manual_seed(config.seed)  # the same initial G and D as every other method
        self.G, self.D = build_models(config, device)
        self.g_optimizer = adam(self.G.parameters(), config.optimizer.lr_generator, config.optimizer)
        self.gradients = GeneratorGradients(self.G, config.engine.memory_layout, device)
        self.d_optimizer = adam(self.D.parameters(), config.optimizer.lr_discriminator, config.optimizer)
        self.steps = StepsPerRound.from_config(config)
        self.real = PooledBatches(
            build_tasks(config, load_source(config.data)),
            config.optimizer.batch_size,
            self.context.generator_seed(SeedPurpose.REAL_BATCHES),
            device,
        )
        self.latent_stream = self.context.generator_seed(SeedPurpose.LATENTS)
        if self.resumed_state is not None:
            self.load_state_dict(self.resumed_state)

    def participants(self, round_index: int) -> list[int]:
        return []  # the workers' data is pooled here; nobody uploads

    def train_global(self, round_index: int) -> dict[str, float]:
        d_stats = train_discriminator(
            self.D, self.d_optimizer, self.steps.d_steps, self.real.next, self.G, self.latent_stream
        )
        self.D.requires_grad_(False)  # G's steps need gradients through D, not for D
        g_loss, realness = train_generator(
            self.gradients, self.g_optimizer, [self.D] * self.steps.g_steps, self.config.optimizer.batch_size,
            len(self.config.tasks),
        )
        self.D.requires_grad_(True)
        return {
            "g_loss": g_loss,
            "g_steps": float(self.steps.g_steps),
            "g_fake_realness": realness,
            "d_loss": d_stats.loss,
            "d_real_realness": d_stats.real_realness,
            "d_fake_realness": d_stats.fake_realness,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.G.state_dict(),
            "discriminator": self.D.state_dict(),
            "generator_optimizer": self.g_optimizer.state_dict(),
            "discriminator_optimizer": self.d_optimizer.state_dict(),
            "real_batches": self.real.state_dict(),
            "latent_stream": self.latent_stream.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["generator"])
        self.D.load_state_dict(state["discriminator"])
        self.g_optimizer.load_state_dict(state["generator_optimizer"])
        self.d_optimizer.load_state_dict(state["discriminator_optimizer"])
        self.real.load_state_dict(state["real_batches"])
        self.latent_stream.set_state(state["latent_stream"])


class IdleWorker(WorkerRole):
    """A worker's data is pooled at the server in this method; the worker takes part in no round."""

    def setup(self, shard: ImageDataset) -> None:
        """Nothing to prepare."""

    def participates(self, round_index: int) -> bool:
        return False

    def local_round(self, round_index: int) -> LocalFigures:
        raise RuntimeError("central: workers take part in no round")


class Central(Method):
    name = "central"
    capabilities = Capabilities(resume=True)
    server = CentralServer
    worker = IdleWorker
