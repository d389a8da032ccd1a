"""Multi-head discriminators: one shared trunk, one linear real/fake head per task.

The split is what the aggregation code works on: parameters named `trunk.*` are shared by every
task and averaged across all workers, while `heads.<t>.*` belong to task t and are averaged only
among the workers that serve task t. Nothing else may own parameters or buffers in a
discriminator, so the two prefixes below partition its `state_dict` exactly.

No BatchNorm anywhere: running statistics would be averaged meaninglessly across workers with
different data, batch statistics leak information across samples (which breaks per-sample
gradient clipping), and Opacus refuses BatchNorm outright. LeakyReLU(0.2), dropout and plain
strided convolutions are all Opacus-compatible; activations are not in-place, because in-place
ops clash with the backward hooks Opacus installs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from entgan.models._common import (
    DCGAN_SEED_SIZES,
    ImageShape,
    as_task_tensor,
    dcgan_num_resamples,
    dcgan_widths,
)

SHARED_PREFIX = "trunk."
"""Name prefix of every parameter shared by all tasks."""

HEADS_PREFIX = "heads."
"""Name prefix of every task-specific parameter (followed by the task index)."""


def head_prefix(task: int) -> str:
    """Name prefix of task `task`'s head parameters, e.g. `heads.3.` (note the trailing dot, so
    that `heads.1.` does not also match `heads.10.`)."""
    return f"{HEADS_PREFIX}{task}."


def is_shared(name: str) -> bool:
    """Whether a discriminator parameter/state_dict name belongs to the shared trunk."""
    return name.startswith(SHARED_PREFIX)


def head_task(name: str) -> int | None:
    """The task index owning parameter `name`, or None for a shared (trunk) parameter."""
    if not name.startswith(HEADS_PREFIX):
        return None
    return int(name[len(HEADS_PREFIX) :].split(".", 1)[0])


class Discriminator(nn.Module):
    """Shared `trunk` (images -> (N, feature_dim) features) plus one `nn.Linear(feature_dim, 1)`
    head per task."""

    trunk: nn.Module
    heads: nn.ModuleList
    feature_dim: int
    image_shape: ImageShape

    def __init__(self, trunk: nn.Module, feature_dim: int, num_tasks: int, image_shape: ImageShape) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"a discriminator needs at least 1 task, found num_tasks={num_tasks}")
        self.trunk = trunk
        self.feature_dim = feature_dim
        self.image_shape = tuple(image_shape)  # type: ignore[assignment]
        self.heads = nn.ModuleList(nn.Linear(feature_dim, 1) for _ in range(num_tasks))

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def features(self, x: Tensor) -> Tensor:
        """Shared features (N, feature_dim) of images (N, C, H, W)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            expected = ", ".join(map(str, self.image_shape))
            raise ValueError(f"images must have shape (N, {expected}), found {tuple(x.shape)}")
        return self.trunk(x)

    def _heads_on(self, features: Tensor) -> Tensor:
        return torch.cat([head(features) for head in self.heads], dim=1)

    def all_heads(self, x: Tensor) -> Tensor:
        """Logits of every task head for every image: (N, num_tasks)."""
        return self._heads_on(self.features(x))

    def forward(self, x: Tensor, task: Tensor | int) -> Tensor:
        """Real/fake logits (N,), each image scored by its own task's head.

        Every head runs on the full batch and the right column is gathered, rather than running
        each head on its own subset: each head module is then called exactly once per forward on
        the whole batch, which is what per-sample-gradient tools (Opacus) require, and the cost
        is negligible next to the trunk. Heads of tasks absent from the batch get zero gradient.
        """
        logits = self.all_heads(x)
        task_ids = as_task_tensor(task, x.shape[0], x.device)
        return logits.gather(1, task_ids.unsqueeze(1)).squeeze(1)

    @torch.no_grad()
    def add_task(self) -> int:
        """Append a head for a new task and return its index.

        The new head's weight and bias are the mean of the existing heads': a reasonable "generic
        real/fake" starting point on the shared features, rather than a random direction. Existing
        heads and the trunk are untouched, so old tasks' logits are unchanged. Optimizers must be
        told about the new head's parameters by the caller.
        """
        reference = self.heads[0]
        head = nn.Linear(
            self.feature_dim, 1, device=reference.weight.device, dtype=reference.weight.dtype
        )
        head.weight.copy_(torch.stack([h.weight for h in self.heads]).mean(dim=0))
        head.bias.copy_(torch.stack([h.bias for h in self.heads]).mean(dim=0))
        self.heads.append(head)
        return self.num_tasks - 1


class MLPDiscriminator(Discriminator):
    """Fully connected D: flatten -> 4*hidden -> 2*hidden -> hidden features, LeakyReLU(0.2) + dropout."""

    def __init__(
        self, image_shape: ImageShape, num_tasks: int, hidden_dim: int, dropout: float = 0.3
    ) -> None:
        channels, height, width = image_shape
        trunk = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * height * width, 4 * hidden_dim),
            nn.LeakyReLU(0.2),
            nn.Dropout(dropout),
            nn.Linear(4 * hidden_dim, 2 * hidden_dim),
            nn.LeakyReLU(0.2),
            nn.Dropout(dropout),
            nn.Linear(2 * hidden_dim, hidden_dim),
            nn.LeakyReLU(0.2),
            nn.Dropout(dropout),
        )
        super().__init__(trunk, hidden_dim, num_tasks, image_shape)


class DCGANDiscriminator(Discriminator):
    """Convolutional D mirroring `DCGANGenerator`, without normalisation layers.

    Stride-2 4x4 convolutions halve the image down to the seed map (7x7 for 28 px, 4x4 for 32 and
    64 px) while widening to `hidden_dim` channels; a final convolution covering the whole seed
    map produces the `hidden_dim` feature vector the task heads read.
    """

    def __init__(
        self, image_shape: ImageShape, num_tasks: int, hidden_dim: int, dropout: float = 0.0
    ) -> None:
        channels, height, width = image_shape
        if height != width:
            raise ValueError(f"the DCGAN discriminator needs square images, found {height}x{width}")
        num_downsamples = dcgan_num_resamples(height)
        widths = list(reversed(dcgan_widths(hidden_dim, num_downsamples)))  # shallow (wide image) -> deep
        seed_size = DCGAN_SEED_SIZES[height]

        layers: list[nn.Module] = []
        in_channels = channels
        for out_channels in widths:
            layers += [nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_channels = out_channels
        layers += [
            nn.Conv2d(in_channels, hidden_dim, seed_size),
            nn.Flatten(),
            nn.LeakyReLU(0.2),
        ]
        super().__init__(nn.Sequential(*layers), hidden_dim, num_tasks, image_shape)
