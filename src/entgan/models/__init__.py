"""Task-conditioned generators and multi-head discriminators, and builders from `ModelConfig`.

`build_generator` / `build_discriminator` are the entry points the rest of EntGAN uses: they check
that the model family can handle the image shape (with an error naming the config field) and
apply DCGAN weight initialisation. They do not seed: every rank that must start from identical
weights has to seed identically (or receive a broadcast) before calling them.
"""

from __future__ import annotations

from entgan.config import ModelConfig
from entgan.models._common import DCGAN_SEED_SIZES, ImageShape
from entgan.models.discriminator import (
    HEADS_PREFIX,
    SHARED_PREFIX,
    DCGANDiscriminator,
    Discriminator,
    MLPDiscriminator,
    head_prefix,
    head_task,
    is_shared,
)
from entgan.models.generator import DCGANGenerator, Generator, MLPGenerator
from entgan.models.init import init_dcgan_weights

FAMILIES: tuple[str, ...] = ("mlp", "dcgan")
DCGAN_IMAGE_SIZES: tuple[int, ...] = tuple(sorted(DCGAN_SEED_SIZES))

__all__ = [
    "DCGAN_IMAGE_SIZES",
    "FAMILIES",
    "HEADS_PREFIX",
    "SHARED_PREFIX",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "Discriminator",
    "Generator",
    "ImageShape",
    "MLPDiscriminator",
    "MLPGenerator",
    "build_discriminator",
    "build_generator",
    "check_model_supports",
    "head_prefix",
    "head_task",
    "init_dcgan_weights",
    "is_shared",
]


def check_model_supports(cfg: ModelConfig, image_shape: ImageShape, num_tasks: int) -> None:
    """Raise ValueError, naming the config field, if `cfg.family` cannot build nets for this shape.

    Exposed so that launch-time validation can run the same check before any process is spawned.
    """
    if cfg.family not in FAMILIES:
        raise ValueError(f"model.family must be one of {list(FAMILIES)}, found {cfg.family!r}")
    if len(image_shape) != 3 or any(int(d) < 1 for d in image_shape):
        raise ValueError(
            f"image_shape must be (channels, height, width) of positive ints, found {image_shape}"
        )
    channels, height, width = image_shape
    if channels not in (1, 3):
        raise ValueError(f"data.channels must be one of [1, 3], found {channels}")
    if cfg.family == "dcgan":
        if height != width:
            raise ValueError(f"model.family 'dcgan' needs square images, found {height}x{width}")
        if height not in DCGAN_SEED_SIZES:
            raise ValueError(
                f"data.image_size must be one of {list(DCGAN_IMAGE_SIZES)} for model.family 'dcgan', "
                f"found {height}"
            )
    if num_tasks < 1:
        raise ValueError(f"need at least 1 task (tasks), found {num_tasks}")


def build_generator(cfg: ModelConfig, image_shape: ImageShape, num_tasks: int) -> Generator:
    """The task-conditioned generator of family `cfg.family`, DCGAN-initialised."""
    check_model_supports(cfg, image_shape, num_tasks)
    shape: ImageShape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))
    generator_cls = MLPGenerator if cfg.family == "mlp" else DCGANGenerator
    generator = generator_cls(
        latent_dim=cfg.latent_dim,
        num_tasks=num_tasks,
        task_embedding_dim=cfg.task_embedding_dim,
        image_shape=shape,
        hidden_dim=cfg.hidden_dim,
    )
    init_dcgan_weights(generator)
    return generator


def build_discriminator(cfg: ModelConfig, image_shape: ImageShape, num_tasks: int) -> Discriminator:
    """The multi-head discriminator of family `cfg.family`, DCGAN-initialised."""
    check_model_supports(cfg, image_shape, num_tasks)
    shape: ImageShape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))
    discriminator_cls = MLPDiscriminator if cfg.family == "mlp" else DCGANDiscriminator
    discriminator = discriminator_cls(image_shape=shape, num_tasks=num_tasks, hidden_dim=cfg.hidden_dim)
    init_dcgan_weights(discriminator)
    return discriminator
