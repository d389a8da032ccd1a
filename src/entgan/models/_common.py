"""Small helpers shared by the generator and discriminator modules.

Kept private: the public surface is re-exported from `entgan.models`.
"""

from __future__ import annotations

import torch
from torch import Tensor

ImageShape = tuple[int, int, int]
"""(channels, height, width) of one image, as in `RunConfig.image_shape`."""

#: Spatial sizes the DCGAN nets can produce/consume, mapped to the seed map size they grow from.
#: 28 = 7 * 2**2 (MNIST), 32 = 4 * 2**3 (CIFAR-like), 64 = 4 * 2**4 (classic DCGAN).
DCGAN_SEED_SIZES: dict[int, int] = {28: 7, 32: 4, 64: 4}


def dcgan_num_resamples(image_size: int) -> int:
    """How many stride-2 (de)convolutions separate the seed map from an `image_size` image."""
    if image_size not in DCGAN_SEED_SIZES:
        raise ValueError(
            f"data.image_size must be one of {sorted(DCGAN_SEED_SIZES)} for model.family 'dcgan', "
            f"found {image_size}"
        )
    seed = DCGAN_SEED_SIZES[image_size]
    steps = 0
    while seed < image_size:
        seed *= 2
        steps += 1
    return steps


def dcgan_widths(hidden_dim: int, num_levels: int) -> list[int]:
    """Channel widths from the deepest (smallest) map outward, halving per resolution level.

    `hidden_dim` is the width at the deepest level, so the parameter count stays bounded by
    `hidden_dim` whatever the image size (edge workers are small machines); widths never fall
    below min(8, hidden_dim) so the high-resolution layers keep some capacity.
    """
    floor = min(8, hidden_dim)
    return [max(hidden_dim >> level, floor) for level in range(num_levels)]


def as_task_tensor(task: Tensor | int, batch_size: int, device: torch.device) -> Tensor:
    """Normalise a task argument to a LongTensor of shape (batch_size,) on `device`.

    Accepting a plain int lets single-task callers (an edge worker serves one task) skip building
    the index tensor by hand; a tensor is checked so that a shape slip fails loudly here rather
    than broadcasting silently inside an embedding lookup or gather.
    """
    if isinstance(task, int):
        return torch.full((batch_size,), task, dtype=torch.long, device=device)
    if task.dtype != torch.long:
        raise TypeError(f"task ids must be a LongTensor (torch.long), found {task.dtype}")
    if task.shape != (batch_size,):
        raise ValueError(f"task ids must have shape ({batch_size},), found {tuple(task.shape)}")
    return task
