"""The GAN losses every method uses: the standard (non-saturating) objective on task heads.

One definition for all methods, so that a comparison between them measures their distribution
schemes, not their losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from entgan.models.discriminator import Discriminator


def mean_realness(logits: torch.Tensor) -> float:
    """The mean probability of being real that D's `logits` give, a figure: computed off the graph,
    so no autograd node is built for it (one that is never back-propagated)."""
    return torch.sigmoid(logits.detach()).mean().item()


def discriminator_loss(
    discriminator: Discriminator, real: torch.Tensor, fake: torch.Tensor, task: torch.Tensor | int
) -> tuple[torch.Tensor, float, float]:
    """Standard GAN D loss on its task head; also the mean realness of real and fake batches."""
    real_logits = discriminator(real, task)
    fake_logits = discriminator(fake.detach(), task)
    loss = F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return loss, mean_realness(real_logits), mean_realness(fake_logits)


def real_loss(discriminator: Discriminator, real: torch.Tensor, task: torch.Tensor | int) -> tuple[torch.Tensor, float]:
    """The real-data half of the D loss (computable before the generator has arrived)."""
    logits = discriminator(real, task)
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)), mean_realness(logits)


def fake_loss(discriminator: Discriminator, fake: torch.Tensor, task: torch.Tensor | int) -> tuple[torch.Tensor, float]:
    """The fake-data half of the D loss."""
    logits = discriminator(fake.detach(), task)
    return fake_loss_from_logits(logits), mean_realness(logits)


def fake_loss_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """The fake-data half of the D loss, from D's logits on the fakes."""
    return F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))


def generator_loss(
    discriminator: nn.Module, fakes: torch.Tensor, tasks: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Non-saturating G loss against `discriminator`; also the mean realness D gives the fakes."""
    logits = discriminator(fakes, tasks)
    loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    return loss, mean_realness(logits)

