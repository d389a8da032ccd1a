"""Task-conditioned generators.

One generator serves every task: a learned task embedding is concatenated to the latent code, so
tasks share almost all parameters (what lets the server train one G against the averaged
per-task discriminator heads) while still producing task-specific images. New tasks are added
with `add_task`, which grows the embedding and leaves every existing task's mapping untouched.
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


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class Generator(nn.Module):
    """Base class: maps (latent z, task id) to an image in [-1, 1].

    Subclasses implement `_decode`, which turns the concatenated [z, task embedding] vector into
    pre-activation images; the base applies `tanh` so every family honours the [-1, 1] image range
    that the data pipeline normalises real images to.
    """

    latent_dim: int
    image_shape: ImageShape
    task_embedding: nn.Embedding

    def __init__(
        self, latent_dim: int, num_tasks: int, task_embedding_dim: int, image_shape: ImageShape
    ) -> None:
        super().__init__()
        if latent_dim < 1 or task_embedding_dim < 1:
            raise ValueError(
                f"latent_dim and task_embedding_dim must be >= 1, found {latent_dim} and {task_embedding_dim}"
            )
        if num_tasks < 1:
            raise ValueError(f"a generator needs at least 1 task, found num_tasks={num_tasks}")
        self.latent_dim = latent_dim
        self.image_shape = tuple(image_shape)  # type: ignore[assignment]
        self.task_embedding = nn.Embedding(num_tasks, task_embedding_dim)

    @property
    def num_tasks(self) -> int:
        """Number of tasks; read from the embedding so it can never drift from it after `add_task`."""
        return self.task_embedding.num_embeddings

    @property
    def task_embedding_dim(self) -> int:
        return self.task_embedding.embedding_dim

    @property
    def normalises_over_batch(self) -> bool:
        """Whether a sample depends on the others in its batch (BatchNorm while training).

        Then where G runs matters as much as its weights: every place that draws samples for the
        same training (the server's G step, a worker's G_k) must draw batches alike."""
        return any(isinstance(module, _BATCH_NORMS) for module in self.modules())

    @property
    def conditioning_dim(self) -> int:
        """Width of the [z, task embedding] vector fed to `_decode`."""
        return self.latent_dim + self.task_embedding_dim

    def _decode(self, conditioned: Tensor) -> Tensor:
        """Map (N, conditioning_dim) to pre-tanh images (N, C, H, W); implemented by each family."""
        raise NotImplementedError(f"{type(self).__name__} must implement _decode")

    def forward(self, z: Tensor, task: Tensor | int) -> Tensor:
        """Generate images (N, C, H, W) in [-1, 1] for latent codes `z` (N, latent_dim) and task ids (N,)."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (N, {self.latent_dim}), found {tuple(z.shape)}")
        task_ids = as_task_tensor(task, z.shape[0], z.device)
        conditioned = torch.cat([z, self.task_embedding(task_ids)], dim=1)
        return torch.tanh(self._decode(conditioned))

    def _device(self) -> torch.device:
        return self.task_embedding.weight.device

    def sample_latent(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Draw `n` standard-normal latent codes (n, latent_dim), on the model's device by default.

        An explicit `torch.Generator` makes evaluation samples reproducible; if it lives on a
        different device than the target (a CPU generator for a CUDA model), the codes are drawn
        on the generator's device and moved, so the same seed gives the same codes everywhere.
        """
        target = torch.device(device) if device is not None else self._device()
        draw_on = generator.device if generator is not None else target
        z = torch.randn(n, self.latent_dim, generator=generator, device=draw_on)
        return z.to(target)

    @torch.no_grad()
    def sample(self, task: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Generate `n` images of `task` for evaluation or grids: no autograd graph, eval mode.

        The model is put in eval mode for the call (BatchNorm in the DCGAN generator then uses its
        running statistics, so a small sample batch is not normalised by its own noisy statistics,
        and sampling leaves those statistics untouched) and restored to its previous mode after.
        """
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be in [0, {self.num_tasks}), found {task}")
        was_training = self.training
        self.eval()
        try:
            return self(self.sample_latent(n, generator=generator), task)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def add_task(self) -> int:
        """Grow the task embedding by one row and return the new task's index.

        Existing rows are copied exactly, so every old task's images are unchanged. The new row is
        the mean of the existing rows: it starts as an "average task", which is a better starting
        point for fine-tuning than a random row far from anything the decoder has seen.

        The embedding parameter is replaced by a new tensor: optimizers holding the old one must be
        rebuilt (or have the new parameter added) by the caller.
        """
        old = self.task_embedding
        grown = nn.Embedding(
            old.num_embeddings + 1,
            old.embedding_dim,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
        grown.weight.copy_(torch.cat([old.weight, old.weight.mean(dim=0, keepdim=True)], dim=0))
        grown.weight.requires_grad_(old.weight.requires_grad)
        self.task_embedding = grown
        return grown.num_embeddings - 1


class MLPGenerator(Generator):
    """Fully connected generator, as in the classic MNIST MLP GANs.

    [z, emb] -> hidden -> 2*hidden -> 4*hidden -> C*H*W with LeakyReLU(0.2). No BatchNorm: a copy
    of this G (sent to a worker, restored from a checkpoint) behaves identically in train and eval
    mode and for any batch size, which keeps the distributed protocol free of running statistics.
    """

    def __init__(
        self,
        latent_dim: int,
        num_tasks: int,
        task_embedding_dim: int,
        image_shape: ImageShape,
        hidden_dim: int,
    ) -> None:
        super().__init__(latent_dim, num_tasks, task_embedding_dim, image_shape)
        channels, height, width = self.image_shape
        self.net = nn.Sequential(
            nn.Linear(self.conditioning_dim, hidden_dim),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden_dim, 2 * hidden_dim),
            nn.LeakyReLU(0.2),
            nn.Linear(2 * hidden_dim, 4 * hidden_dim),
            nn.LeakyReLU(0.2),
            nn.Linear(4 * hidden_dim, channels * height * width),
        )

    def _decode(self, conditioned: Tensor) -> Tensor:
        return self.net(conditioned).view(conditioned.shape[0], *self.image_shape)


class DCGANGenerator(Generator):
    """Convolutional generator (Radford et al. 2016), sized for 28, 32 or 64 pixel images.

    [z, emb] is projected to a `hidden_dim` x S x S seed map (S = 7 for 28 px, 4 for 32 and 64 px),
    then stride-2 transposed convolutions double the size (and halve the width) until the image
    size is reached. BatchNorm + ReLU after every layer but the last, as in the paper.
    """

    def __init__(
        self,
        latent_dim: int,
        num_tasks: int,
        task_embedding_dim: int,
        image_shape: ImageShape,
        hidden_dim: int,
    ) -> None:
        super().__init__(latent_dim, num_tasks, task_embedding_dim, image_shape)
        channels, height, width = self.image_shape
        if height != width:
            raise ValueError(f"the DCGAN generator needs square images, found {height}x{width}")
        num_upsamples = dcgan_num_resamples(height)
        widths = dcgan_widths(hidden_dim, num_upsamples)
        self.seed_size = DCGAN_SEED_SIZES[height]
        self.seed_channels = widths[0]

        self.project = nn.Sequential(
            nn.Linear(self.conditioning_dim, self.seed_channels * self.seed_size**2, bias=False),
            nn.Unflatten(1, (self.seed_channels, self.seed_size, self.seed_size)),
            nn.BatchNorm2d(self.seed_channels),
            nn.ReLU(),
        )
        layers: list[nn.Module] = []
        for level in range(num_upsamples - 1):
            layers += [
                nn.ConvTranspose2d(widths[level], widths[level + 1], 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(widths[level + 1]),
                nn.ReLU(),
            ]
        layers.append(nn.ConvTranspose2d(widths[-1], channels, 4, stride=2, padding=1))
        self.upsample = nn.Sequential(*layers)

    def _decode(self, conditioned: Tensor) -> Tensor:
        return self.upsample(self.project(conditioned))
