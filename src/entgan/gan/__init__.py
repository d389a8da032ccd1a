"""GAN mechanics shared by every method and by the engine's warm-up: losses, the optimizer, model
construction, real batches, and the server's memory layout for G steps.

Nothing here knows about processes or messages; the engine (`entgan.engine`) and the methods
(`entgan.algorithms`) both build on it."""

from entgan.gan.losses import discriminator_loss, fake_loss, fake_loss_from_logits, generator_loss, real_loss
from entgan.gan.training import RealBatches, adam, balanced_tasks, build_models, model_digest

__all__ = [
    "RealBatches",
    "adam",
    "balanced_tasks",
    "build_models",
    "discriminator_loss",
    "fake_loss",
    "fake_loss_from_logits",
    "generator_loss",
    "model_digest",
    "real_loss",
]
