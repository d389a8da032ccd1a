"""Local steps shared by the baselines whose workers train locally and upload to a server
(MD-GAN, FL-GAN, DANCE), kept here once so that `mdgan.py`, `flgan.py` and `dance.py` read like
their papers:

- one local D step and one local G step, on the shared losses of `entgan.gan`, and the two as one
  round of the game (`local_game_step`, also EntGAN's worker with G_k steps at the edge);
- the error feedback dL_G/dx a worker returns for the server's fakes (MD-GAN, DANCE).

Reports, uploads and their figures are the engine's (`engine.rounds`, `engine.reports`).
"""

from __future__ import annotations

import torch
from torch import nn

from entgan.gan import discriminator_loss, generator_loss
from entgan.models.discriminator import Discriminator


def discriminator_step(
    discriminator: Discriminator,
    optimizer: torch.optim.Optimizer,
    real: torch.Tensor,
    fake: torch.Tensor,
    task: int,
) -> tuple[float, float, float]:
    """One D update on real vs. fake on `task`'s head; returns (loss, real realness, fake realness)."""
    loss, real_realness, fake_realness = discriminator_loss(discriminator, real, fake, task)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), real_realness, fake_realness


def generator_step(
    optimizer: torch.optim.Optimizer, discriminator: Discriminator, fakes: torch.Tensor, task: int
) -> tuple[float, float]:
    """One G update (non-saturating loss against `discriminator`) through `fakes`' graph.

    The gradients this leaves on D's parameters are cleared by the next D step's `zero_grad`.
    Returns (loss, mean realness D gives the fakes).
    """
    loss, realness = generator_loss(discriminator, fakes, task)  # type: ignore[arg-type]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), realness


def local_game_step(
    generator: nn.Module,
    discriminator: Discriminator,
    optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
    real: torch.Tensor,
    latents: torch.Tensor,
    fake_tasks: torch.Tensor | int,
    task: int,
) -> tuple[tuple[float, float, float], tuple[float, float], torch.Tensor]:
    """One round of the game on a worker (FL-GAN's local step, EntGAN's with G_k steps at the
    edge): a D step on `real` against G(latents, fake_tasks), then a G step through the same fakes'
    graph, so one forward of G serves both (the textbook GAN loop).

    `optimizers` is (G's, D's). `fake_tasks` may mix tasks (other tasks' fakes as negatives for
    D's `task` head); only `task`'s samples carry G's loss, on that head, since this worker's D
    knows nothing of what the other tasks should look like. Returns the D step's figures, the G
    step's and the fakes (detached).
    """
    g_optimizer, d_optimizer = optimizers
    fakes = generator(latents, fake_tasks)
    d_figures = discriminator_step(discriminator, d_optimizer, real, fakes, task)
    own = fakes if isinstance(fake_tasks, int) else fakes[fake_tasks == task]
    g_figures = generator_step(g_optimizer, discriminator, own, task)
    return d_figures, g_figures, fakes.detach()


def error_feedback(discriminator: Discriminator, fakes: torch.Tensor, task: int) -> tuple[torch.Tensor, float, float]:
    """Worker: F = dL_G/dx for every image x of `fakes` (the generator loss on D's `task` head).

    Only the images get gradients; D is not updated by this pass. D is in eval mode for it
    (dropout off, then restored): F is what the server back-propagates into G, and dropout's
    random masks would only add noise to it; D's own training steps keep their dropout.
    Returns (F, loss, realness).
    """
    images = fakes.detach().requires_grad_(True)
    was_training = discriminator.training
    discriminator.eval()
    try:
        loss, realness = generator_loss(discriminator, images, task)  # type: ignore[arg-type]
        (feedback,) = torch.autograd.grad(loss, images)
    finally:
        discriminator.train(was_training)
    return feedback, loss.item(), realness


def named_state(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs `model_tensors` sends, for an update envelope's layout."""
    return [(name, tensor.data) for name, tensor in module.state_dict(keep_vars=True).items()]
