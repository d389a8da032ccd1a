"""Pictures a person looks at: sample grids (PNG) and training curves (losses and FID over time)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one uint8 array (H', W') or (H', W', 3)."""
    if images.ndim != 4:
        raise ValueError(f"expected images shaped (N, C, H, W), found {tuple(images.shape)}")
    count, channels, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    grid = np.zeros(
        (channels, rows * (height + padding) + padding, columns * (width + padding) + padding), dtype=np.uint8
    )
    for index in range(count):
        row, column = divmod(index, columns)
        top = padding + row * (height + padding)
        left = padding + column * (width + padding)
        grid[:, top : top + height, left : left + width] = pixels[index]
    return grid[0] if channels == 1 else grid.transpose(1, 2, 0)


def save_image_grid(images: torch.Tensor, path: Path, columns: int | None = None, scale: int = 2) -> Path:
    """Write a PNG grid of `images`, upscaled `scale` times (nearest) so small digits stay legible."""
    grid = Image.fromarray(image_grid(images, columns))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, imported on first use (it loads slowly)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path) -> Path:
    """Lay out `figure`, write it to `path` (folders made as needed) and free it."""
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot().close(figure)
    return path


def plot_training(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Losses per round (left) and FID per task against wall-clock (right)."""
    figure, (losses_axis, fid_axis) = pyplot().subplots(1, 2, figsize=(11, 4))
    rounds = [row["round"] for row in rows]
    for key, label in (("g_loss", "G loss"), ("d_loss", "D loss (mean over workers)")):
        values = [row.get(key) for row in rows]
        if any(v is not None for v in values):
            losses_axis.plot(rounds, [np.nan if v is None else v for v in values], label=label)
    losses_axis.set_xlabel("round")
    losses_axis.set_ylabel("loss")
    losses_axis.legend()
    losses_axis.grid(alpha=0.3)

    fid_keys = sorted({key for row in rows for key in row if key.startswith("fid/")})
    for key in fid_keys:
        points = [(row["train_clock_s"], row[key]) for row in rows if key in row]
        if points:
            xs, ys = zip(*points)
            fid_axis.plot(xs, ys, marker="o", label=key.removeprefix("fid/"))
    fid_axis.set_xlabel("training wall-clock (s)")
    fid_axis.set_ylabel("FID (domain-classifier features)")
    fid_axis.set_yscale("log")
    if fid_keys:
        fid_axis.legend()
    fid_axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    return save_figure(figure, path)
