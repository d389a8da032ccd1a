"""`entgan generate`: a trained generator written out as an image folder, one sub-folder per task.

    OUT/
      export.json                 what was written: model version, seed, tasks, counts; `complete`
      <task>/000000.png ...       N images per task, PNG, the run's size and channels

EntGAN reads the result back as an `image-folder` data source (`data: {source: image-folder,
path: OUT}`): the sorted task folders become labels 0..T-1.

Streaming: images are generated `batch_size` at a time and each batch is written before the next
is made, so memory does not grow with N.

Reproducible: image i of task T always comes from the same latent code for a given seed, whatever
the batch size and whichever other tasks are exported (`task_latents`). Same seed, same model,
same machine: the same bytes.

Interruptions: each PNG is written under a dot-name (which the image-folder reader ignores) and
renamed into place, so a file with a finished name is a whole image. `export.json` says
`"complete": false` until the last image is in place. `--overwrite` only ever replaces a folder
that holds an earlier export (an `export.json`), never an arbitrary folder.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from entgan.config import ConfigError

if TYPE_CHECKING:
    import torch

    from entgan.deployed import LoadedModel

MANIFEST = "export.json"
LATENT_BLOCK = 1024
"""Latent codes are drawn in blocks of this many, each block from its own seed, so that image i's
code does not depend on how the images are batched."""


# ------------------------------------------------------------------------------------ sampling
def task_latents(latent_dim: int, task: str, seed: int, start: int, count: int) -> torch.Tensor:
    """Latent codes of images `start .. start+count-1` of `task` for `seed`, shape (count, latent_dim).

    Block b of a task's codes is drawn from a generator seeded with (seed, crc32(task), b): a task's
    images do not depend on the other tasks (or their order), nor on the batch size.
    """
    import torch

    if count <= 0:
        return torch.empty(0, latent_dim)
    first, last = start // LATENT_BLOCK, (start + count - 1) // LATENT_BLOCK
    blocks = []
    for block in range(first, last + 1):
        state = np.random.SeedSequence([seed, zlib.crc32(task.encode()), block]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state) & (2**63 - 1))
        blocks.append(torch.randn(LATENT_BLOCK, latent_dim, generator=generator))
    codes = torch.cat(blocks)
    offset = start - first * LATENT_BLOCK
    return codes[offset : offset + count]


def generate_batch(model: LoadedModel, task: str, seed: int, start: int, count: int) -> torch.Tensor:
    """Images `start .. start+count-1` of `task` (N, C, H, W) in [-1, 1]."""
    import torch

    index = model.task_index(task)
    latents = task_latents(model.generator.latent_dim, task, seed, start, count)
    with torch.no_grad():
        return model.generator(latents, index)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images (N, C, H, W) as uint8 (N, H, W, C), the inverse of the image reader's scaling."""
    import torch

    pixels = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def png_bytes(pixels: np.ndarray) -> bytes:
    """One (H, W, C) uint8 image as PNG: greyscale for one channel, RGB for three."""
    from PIL import Image

    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -------------------------------------------------------------------------------------- export
@dataclass
class ExportReport:
    """What an export wrote (also `OUT/export.json`)."""

    out: str
    model: str
    """The model version the images come from."""
    checkpoint: str
    seed: int
    images_per_task: int
    batch_size: int
    image_shape: list[int]
    tasks: list[str]
    labels: dict[str, int] = field(default_factory=dict)
    """The label EntGAN's image-folder reader gives each task folder (sorted names)."""
    complete: bool = False
    seconds: float = 0.0


def check_output_dir(out: Path, overwrite: bool) -> bool:
    """Raise ConfigError unless `out` may be written; True if an earlier export must be removed."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: output path is a file")
    if not out.exists() or not any(out.iterdir()):
        return False
    if not overwrite:
        raise ConfigError(f"{out}: output folder is not empty (pass --overwrite to replace an earlier export)")
    if not (out / MANIFEST).is_file():
        raise ConfigError(f"{out}: is not empty and holds no {MANIFEST} (not an EntGAN export); refusing to overwrite it")
    return True


def select_tasks(model: LoadedModel, tasks: Sequence[str] | None) -> list[str]:
    """The tasks asked for (all of the model's when none), each known to the model, without repeats."""
    if not tasks:
        return model.task_names
    chosen: list[str] = []
    for task in tasks:
        model.task_index(task)  # ConfigError naming the known tasks
        if task not in chosen:
            chosen.append(task)
    return chosen


def export_images(
    model: LoadedModel,
    out: Path,
    n: int,
    *,
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 256,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ExportReport:
    """Write `n` images of each task to `out/<task>/NNNNNN.png` (see the module doc).

    `progress(k)` is called after every batch with the number of images just written.
    """
    if n < 1:
        raise ConfigError(f"-n must be at least 1, found {n}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, found {batch_size}")
    chosen = select_tasks(model, tasks)
    out = Path(out)
    if check_output_dir(out, overwrite):
        shutil.rmtree(out)
    started = time.monotonic()
    report = ExportReport(
        out=str(out), model=model.label, checkpoint=str(model.resolved.checkpoint.resolve()), seed=seed,
        images_per_task=n, batch_size=batch_size, image_shape=list(model.config.image_shape), tasks=chosen,
        labels={task: label for label, task in enumerate(sorted(chosen))},
    )
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(out, report)
    width = max(6, len(str(n - 1)))
    for task in chosen:
        folder = out / task
        folder.mkdir(exist_ok=True)
        for start, count in batches(n, batch_size):
            pixels = to_uint8(generate_batch(model, task, seed, start, count))
            for offset, image in enumerate(pixels):
                write_file_atomically(folder / f"{start + offset:0{width}d}.png", png_bytes(image))
            if progress is not None:
                progress(count)
    report.complete = True
    report.seconds = round(time.monotonic() - started, 3)
    _write_manifest(out, report, durable=True)
    return report


def write_file_atomically(path: Path, data: bytes) -> None:
    """Write `data` under a dot-name in the same folder and rename it to `path`.

    Not fsynced (that would cost more than the PNG itself for 100,000 small files): an interrupted
    process never leaves a partial file under a finished name; the manifest, written last, is
    fsynced.
    """
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _write_manifest(out: Path, report: ExportReport, durable: bool = False) -> None:
    text = json.dumps(asdict(report), indent=2, sort_keys=True).encode()
    if durable:
        from entgan.rundir import atomic_write

        atomic_write(out / MANIFEST, lambda handle: handle.write(text))
    else:
        write_file_atomically(out / MANIFEST, text)


def read_manifest(out: Path) -> dict[str, Any] | None:
    """An export folder's `export.json`, or None if there is none."""
    try:
        return json.loads((Path(out) / MANIFEST).read_text())
    except FileNotFoundError:
        return None


def batches(total: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """(start, count) of each batch of `total` items."""
    for start in range(0, total, batch_size):
        yield start, min(batch_size, total - start)
