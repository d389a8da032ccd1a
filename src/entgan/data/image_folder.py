"""Reader for a class-per-sub-folder tree of PNG/JPEG images.

Sorted sub-folder names define labels 0..n-1, so the mapping is the same on every machine.
Images are converted to the run's channel count by Pillow and resized one by one, since a folder
may mix sizes; the stacked result is then already at the target shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from entgan.data.errors import DataError, image_size_mismatch
from entgan.data.transforms import resize

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


def class_folders(root: Path) -> list[Path]:
    """Visible sub-folders of `root`, sorted by name: their position is the class label."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: image-folder source needs one sub-folder per class, found none")
    return folders


def image_files(folder: Path) -> list[Path]:
    """Image files of one class folder, sorted by name; other files are ignored."""
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise DataError(
            f"{folder}: class folder holds no images (expected files ending in {sorted(IMAGE_SUFFIXES)})"
        )
    return files


def read_image(path: Path, channels: int, size: int, allow_resize: bool = True) -> torch.Tensor:
    """One image as a (channels, size, size) float32 tensor in [0, 1]."""
    try:
        with Image.open(path) as image:
            converted = image.convert("RGB" if channels == 3 else "L")
            array = np.asarray(converted, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable image: {error}") from None
    if not allow_resize and array.shape[:2] != (size, size):
        raise image_size_mismatch(path, f"image is {array.shape[1]}x{array.shape[0]}", size)
    tensor = torch.from_numpy(array.copy()).to(torch.float32).div_(255.0)
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return resize(tensor.unsqueeze(0), size)[0]


def read_image_folder(
    root: Path, channels: int, size: int, max_per_class: int | None, allow_resize: bool = True
) -> tuple[torch.Tensor, np.ndarray]:
    """All images under `root` as (N, channels, size, size) in [0, 1], with int64 labels.

    `max_per_class` is applied while listing, so capped runs never open the files they drop.
    """
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for label, folder in enumerate(class_folders(root)):
        files = image_files(folder)[:max_per_class]
        images.extend(read_image(path, channels, size, allow_resize) for path in files)
        labels.extend([label] * len(files))
    return torch.stack(images), np.asarray(labels, dtype=np.int64)
