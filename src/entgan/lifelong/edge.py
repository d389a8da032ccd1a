"""Edge data locations: which tasks exist, how many samples each holds, and the frozen snapshot a
training run reads.

"New data arrives" means new image files appear in a task's folder (image-folder layout: one
sub-folder per class). Write a file under a name starting with "." and rename it into place when
it is complete: dot-files are never read, so a half-written image is never counted or trained on.

A training run never reads the edge folders directly: every rank must see the same images while
files keep arriving. The train stage first builds a *snapshot*: a class-per-folder tree that
hard-links (or copies) each task's files, split into `train/` and `holdout/` by a hash of each
file's name (so an image stays on its side forever), with one folder per (task, class):
`NNN-<task>-<class>`. Fixed sources (IDX, the shipped subsets) are written into the same layout
as PNG files, so every run reads one `image-folder` source whatever the tasks' sources are.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from entgan.config import DataConfig
from entgan.data.errors import DataError
from entgan.data.image_folder import IMAGE_SUFFIXES
from entgan.lifelong.spec import NAME_PATTERN, RESERVED_TASK_SELECTORS, EdgeSpec, TaskLocation

TRAIN_DIR = "train"
HOLDOUT_DIR = "holdout"
_NAME = re.compile(NAME_PATTERN)


# ------------------------------------------------------------------------------- tasks and counts
def edge_tasks(edge: EdgeSpec) -> list[TaskLocation]:
    """The job's tasks now: those named in the spec, then each valid sub-folder of `edge.root`
    that no named task claims (sorted by name)."""
    tasks = list(edge.tasks)
    if edge.root is not None:
        named = {task.name for task in tasks}
        for folder in _visible_folders(edge.root):
            if folder.name not in named and is_task_name(folder.name):
                tasks.append(TaskLocation(name=folder.name, source="image-folder", path=folder))
    return tasks


def is_task_name(name: str) -> bool:
    return bool(_NAME.match(name)) and name not in RESERVED_TASK_SELECTORS


def ignored_folders(edge: EdgeSpec) -> list[str]:
    """Sub-folders of `edge.root` that cannot be tasks (their names are not valid task names)."""
    if edge.root is None:
        return []
    return [folder.name for folder in _visible_folders(edge.root) if not is_task_name(folder.name)]


def _visible_folders(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _visible_images(folder: Path) -> list[Path]:
    try:
        return sorted(
            p for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
    except OSError:
        return []


def class_files(location: TaskLocation) -> dict[str, list[Path]]:
    """An image-folder task's image files by class folder name (classes without images omitted)."""
    assert location.path is not None
    listing = {folder.name: _visible_images(folder) for folder in _visible_folders(location.path)}
    return {name: files for name, files in listing.items() if files}


def count_samples(location: TaskLocation) -> int:
    """Images a task holds now: a directory listing for image folders (cheap enough for every
    trigger check); fixed sources are loaded once per process and file modification time."""
    if location.source == "image-folder":
        return sum(len(files) for files in class_files(location).values())
    return _count_fixed(location.model_dump_json(), _modified(location.path))


def _modified(path: Path | None) -> float:
    if path is None:
        return 0.0
    try:
        return max([path.stat().st_mtime, *(child.stat().st_mtime for child in path.iterdir())])
    except OSError:
        return 0.0


@functools.lru_cache(maxsize=64)
def _count_fixed(location_json: str, modified: float) -> int:
    del modified  # part of the cache key only: a changed file is counted again
    return len(_load_fixed(TaskLocation.model_validate_json(location_json), image_size=28, channels=1))


def _load_fixed(location: TaskLocation, image_size: int, channels: int) -> Any:
    from entgan.data.sources import load_source

    data = DataConfig(
        source=location.source,
        path=location.path,
        split=location.split,
        image_size=image_size,
        channels=channels,
        max_per_class=location.max_per_class,
    )
    source = load_source(data)
    missing = sorted(set(location.labels or []) - set(source.classes()))
    if missing:
        raise DataError(f"task '{location.name}': labels {missing} are not in source '{source.name}'")
    return source.select_labels(location.labels or [], name=location.name)


# --------------------------------------------------------------------------------------- snapshot
def held_out(key: str, share: float) -> bool:
    """Whether the item named `key` belongs to the held-out side: a hash, so it never changes."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


@dataclass
class SnapshotTask:
    """One task inside a snapshot."""

    name: str
    folders: list[str]
    """Its class folders in the snapshot (`NNN-<task>-<class>`), in label order."""
    labels: list[int] = field(default_factory=list)
    samples: int = 0
    """Images at the edge location when the snapshot was taken (what triggers count)."""
    train: int = 0
    holdout: int = 0
    fingerprint: str = ""
    skipped: list[str] = field(default_factory=list)
    """Files that could not be read as images (left out, listed for the user)."""


@dataclass
class Snapshot:
    root: Path
    tasks: list[SnapshotTask]

    @property
    def train_dir(self) -> Path:
        return self.root / TRAIN_DIR

    @property
    def holdout_dir(self) -> Path:
        return self.root / HOLDOUT_DIR

    def as_dict(self) -> dict[str, Any]:
        return {"root": str(self.root), "tasks": [asdict(task) for task in self.tasks]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Snapshot:
        return cls(Path(data["root"]), [SnapshotTask(**task) for task in data["tasks"]])


def build_snapshot(
    locations: list[TaskLocation], holdout: float, image_size: int, channels: int, destination: Path
) -> Snapshot:
    """Freeze the tasks' current data under `destination` (which must not exist yet).

    Tasks without any image are left out. Labels are assigned after all folders exist, in sorted
    folder order, exactly as the image-folder reader will number them.
    """
    destination.mkdir(parents=True, exist_ok=False)
    tasks: list[SnapshotTask] = []
    for index, location in enumerate(locations):
        prefix = f"{index:03d}-{location.name}-"
        if location.source == "image-folder":
            task = _snapshot_folder(location, prefix, holdout, destination)
        else:
            task = _snapshot_fixed(location, prefix, holdout, image_size, channels, destination)
        if task.train > 0:
            tasks.append(task)
    if not tasks:
        names = [location.name for location in locations]
        raise DataError(f"no task has training images at its edge location (tasks: {names})")
    label_of = {folder.name: label for label, folder in enumerate(sorted((destination / TRAIN_DIR).iterdir()))}
    for task in tasks:
        task.folders = [folder for folder in task.folders if folder in label_of]
        task.labels = [label_of[folder] for folder in task.folders]
    return Snapshot(destination, tasks)


def _place(source: Path, target: Path) -> None:
    """Hard-link `source` to `target` (no copy, no extra space), or copy where links are refused."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _readable_image(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False


def _snapshot_folder(location: TaskLocation, prefix: str, holdout: float, destination: Path) -> SnapshotTask:
    task = SnapshotTask(name=location.name, folders=[])
    digest = hashlib.sha256()
    for class_name, files in sorted(class_files(location).items()):
        folder = prefix + class_name
        task.folders.append(folder)
        for path in files:
            task.samples += 1
            key = f"{class_name}/{path.name}"
            if not _readable_image(path):
                task.skipped.append(str(path))
                continue
            side = HOLDOUT_DIR if held_out(key, holdout) else TRAIN_DIR
            _place(path, destination / side / folder / path.name)
            if side == TRAIN_DIR:
                task.train += 1
            else:
                task.holdout += 1
            digest.update(key.encode())
            digest.update(path.read_bytes())
    task.fingerprint = digest.hexdigest()[:16]
    return task


def _snapshot_fixed(
    location: TaskLocation, prefix: str, holdout: float, image_size: int, channels: int, destination: Path
) -> SnapshotTask:
    import numpy as np
    import torch
    from PIL import Image

    dataset = _load_fixed(location, image_size, channels)
    task = SnapshotTask(name=location.name, folders=[], samples=len(dataset), fingerprint=dataset.fingerprint())
    pixels = ((dataset.images + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    for label in dataset.classes():
        folder = prefix + str(label)
        task.folders.append(folder)
        for number, index in enumerate((dataset.labels == label).nonzero().flatten().tolist()):
            side = HOLDOUT_DIR if held_out(f"{label}/{number}", holdout) else TRAIN_DIR
            target = destination / side / folder / f"{number:06d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            array = pixels[index].permute(1, 2, 0).numpy()
            Image.fromarray(np.ascontiguousarray(array[:, :, 0] if channels == 1 else array)).save(target)
            if side == TRAIN_DIR:
                task.train += 1
            else:
                task.holdout += 1
    return task
