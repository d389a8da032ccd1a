"""Shape and range normalisation shared by every source.

Every source hands over float32 images in [0, 1] at their native size and channel count; these
helpers bring them to the run's `(channels, image_size, image_size)` and to the [-1, 1] range the
generators' `tanh` output lives in, so real and fake images are directly comparable.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# ITU-R 601-2 luma weights, the same ones Pillow uses for RGB -> L.
_LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(1, 3, 1, 1)

# Resizing is done in chunks so a large source never needs a second full-size float copy at once.
_RESIZE_CHUNK = 4096


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Bring (N, C, H, W) images to `channels` (1 or 3): grey->RGB repeats, RGB->grey uses luma."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        return (images * _LUMA).sum(dim=1, keepdim=True)
    raise ValueError(f"cannot convert {have}-channel images to {channels} channels")


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) images to (size, size); antialiased when shrinking.

    Antialiasing only matters when downsampling (it avoids aliasing thin strokes away); when the
    native size already matches, the tensor is returned untouched so no precision is lost.
    """
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    shrinking = height > size or width > size
    chunks = [
        F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)
        for chunk in images.split(_RESIZE_CHUNK)
    ]
    if not chunks:
        return images.new_empty((0, images.shape[1], size, size))
    return torch.cat(chunks).clamp_(0.0, 1.0)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Map [0, 1] images to [-1, 1]."""
    return (images * 2.0 - 1.0).clamp_(-1.0, 1.0)


def normalise(images: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """[0, 1] images of any shape -> (N, channels, size, size) in [-1, 1].

    Channel reduction runs before resizing and channel expansion after, so resizing always works
    on the fewer channels.
    """
    if images.shape[1] > channels:
        images = convert_channels(images, channels)
    images = resize(images, size)
    images = convert_channels(images, channels)
    return to_model_range(images.to(torch.float32))


def first_per_class(labels: np.ndarray, max_per_class: int | None) -> np.ndarray:
    """Indices of the first `max_per_class` items of each class, in their original order.

    Deterministic on purpose: every rank must arrive at the same capped dataset without talking.
    """
    if max_per_class is None:
        return np.arange(len(labels), dtype=np.int64)
    keep = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        keep[np.flatnonzero(labels == label)[:max_per_class]] = True
    return np.flatnonzero(keep).astype(np.int64)
