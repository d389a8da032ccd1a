"""Model construction, the optimizer and real batches: set-up that every method shares."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from entgan.config import OptimizerConfig, RunConfig
from entgan.data.sources import ImageDataset
from entgan.engine.parameters import flatten, model_tensors
from entgan.models import build_discriminator, build_generator
from entgan.models.discriminator import Discriminator
from entgan.models.generator import Generator


def build_models(config: RunConfig, device: torch.device) -> tuple[Generator, Discriminator]:
    """The run's G and D on `device`, G first: under the same seed, every method starts from the
    same pair."""
    num_tasks = len(config.tasks)
    generator = build_generator(config.model, config.image_shape, num_tasks).to(device)
    discriminator = build_discriminator(config.model, config.image_shape, num_tasks).to(device)
    return generator, discriminator


def model_digest(module: nn.Module, name: str) -> dict[str, float]:
    """Sum and absolute sum of a model's state, in float64 (tests compare copies with them)."""
    values = flatten(model_tensors(module)).double()
    return {f"{name}_sum": float(values.sum()), f"{name}_abs_sum": float(values.abs().sum())}


def adam(parameters: Any, lr: float, config: OptimizerConfig) -> torch.optim.Adam:
    """The optimizer of every method's G and D (same algorithm and settings for all).

    The fused kernel updates all parameters in one pass; on CPU it takes a quarter of the time of
    the default per-tensor loop, which at these model sizes is a visible share of a D step."""
    return torch.optim.Adam(parameters, lr=lr, betas=(config.beta1, config.beta2), fused=True)


def balanced_tasks(batch_size: int, num_tasks: int, device: torch.device) -> torch.Tensor:
    """Task labels for a G batch: every task equally represented."""
    return torch.arange(batch_size, device=device) % num_tasks


class RealBatches:
    """Shuffled mini-batches of a worker's local data, reshuffled each epoch, from a seeded stream."""

    def __init__(
        self, shard: ImageDataset, batch_size: int, generator: torch.Generator, device: torch.device | None = None
    ) -> None:
        if len(shard) == 0:
            raise ValueError("a worker's data shard is empty")
        self.images = shard.images.to(device) if device is not None else shard.images
        self.batch_size = min(batch_size, len(shard))
        self._generator = generator
        self._order = torch.randperm(len(shard), generator=generator)
        self._position = 0

    def __len__(self) -> int:
        return self.images.shape[0]

    def state_dict(self) -> dict[str, Any]:
        return {"order": self._order.clone(), "position": self._position, "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["order"].numel() != len(self._order):
            raise ValueError(f"checkpoint holds a shard of {state['order'].numel()} images, this worker has {len(self._order)}")
        self._order = state["order"].clone()
        self._position = int(state["position"])
        self._generator.set_state(state["generator"])

    def next(self) -> torch.Tensor:
        if self._position + self.batch_size > len(self._order):
            self._order = torch.randperm(len(self._order), generator=self._generator)
            self._position = 0
        indices = self._order[self._position : self._position + self.batch_size].to(self.images.device)
        self._position += self.batch_size
        return self.images[indices]
