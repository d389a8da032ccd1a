"""`entgan evaluate`: how useful a trained generator's images are as training data
(`metrics.utility`: train on synthetic, test on real), measured on real images the run never
trained on wherever its config tells which those are.

Which real images are the test set, in this order (`held_out_reals`):

1. a lifelong job's version: the snapshot's `holdout/` images (`edge.holdout` of the job spec),
   kept out of training by the train stage;
2. `data.source: idx` with `split: train`: the IDX test split (t10k files) beside it, if present;
3. `data.max_per_class: N`: the source's images beyond the first N of each class (the run
   trained on the first N only);
4. otherwise the run trained on every image of its source, and none is unseen: a seeded 20% of
   each task's images is used as the test set and the report says that the generator saw them
   (`test_disjoint: false`), so the score is optimistic.

The real-data reference classifier trains on the run's own training images (never on test ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from entgan.config import RunConfig
from entgan.data.errors import DataError
from entgan.deployed import LoadedModel
from entgan.metrics.utility import MIN_STEPS, UtilityReport, classification_accuracy_score

FALLBACK_TEST_SHARE = 0.2
SNAPSHOT_TRAIN, SNAPSHOT_HOLDOUT = "train", "holdout"  # lifelong.edge.TRAIN_DIR / HOLDOUT_DIR


@dataclass
class RealData:
    """Real images per task: what the reference classifier trains on and what both are tested on."""

    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    description: str
    disjoint: bool
    """Whether the test images are outside the generator's training data."""


def _by_task(config: RunConfig, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    grouped = {}
    for task in config.tasks:
        keep = torch.isin(labels, torch.as_tensor(task.labels, dtype=torch.int64))
        grouped[task.name] = images[keep]
    return grouped


def training_images(config: RunConfig) -> dict[str, torch.Tensor]:
    """Each task's images exactly as the run's workers loaded them (all shards together)."""
    from entgan.data import build_tasks, load_source

    return {task.name: task.dataset.images for task in build_tasks(config, load_source(config.data))}


def _snapshot_holdout(config: RunConfig) -> torch.Tensor | None:
    data = config.data
    if data.source != "image-folder" or data.path is None or Path(data.path).name != SNAPSHOT_TRAIN:
        return None
    holdout = Path(data.path).parent / SNAPSHOT_HOLDOUT
    return holdout if holdout.is_dir() else None


def _read_snapshot_holdout(config: RunConfig, holdout: Path) -> dict[str, torch.Tensor]:
    """Held-out images labelled as the train side's reader labels them (by class folder name)."""
    from entgan.data.image_folder import class_folders, image_files, read_image
    from entgan.data.transforms import to_model_range

    data = config.data
    label_of = {folder.name: label for label, folder in enumerate(class_folders(Path(data.path)))}
    images, labels = [], []
    for folder in sorted(p for p in holdout.iterdir() if p.is_dir() and p.name in label_of):
        try:
            files = image_files(folder)
        except DataError:  # a class none of whose images fell on the held-out side
            continue
        for path in files:
            images.append(read_image(path, data.channels, data.image_size))
            labels.append(label_of[folder.name])
    if not images:
        return {}
    return _by_task(config, to_model_range(torch.stack(images)), torch.as_tensor(labels, dtype=torch.int64))


def held_out_reals(config: RunConfig, seed: int = 0) -> RealData:
    """The real test images of a run and the reference's training images (see the module doc)."""
    from entgan.data import load_source
    from entgan.data.transforms import first_per_class

    train = training_images(config)
    data = config.data
    holdout = _snapshot_holdout(config)
    if holdout is not None:
        test = _read_snapshot_holdout(config, holdout)
        return RealData(train, test, f"the job's held-out images in {holdout} (never trained on)", True)
    if data.source == "idx" and data.split == "train":
        try:
            source = load_source(data.model_copy(update={"split": "test", "max_per_class": None}))
        except DataError:
            source = None
        if source is not None:
            return RealData(
                train, _by_task(config, source.images, source.labels),
                f"the IDX test split in {data.path} (the run trained on the train split)", True,
            )
    if data.max_per_class is not None:
        full = load_source(data.model_copy(update={"max_per_class": None}))
        seen = torch.zeros(len(full), dtype=torch.bool)
        seen[torch.from_numpy(first_per_class(full.labels.numpy(), data.max_per_class))] = True
        unseen = (~seen).nonzero().flatten()
        test = _by_task(config, full.images[unseen], full.labels[unseen])
        if all(images.shape[0] > 0 for images in test.values()):
            return RealData(
                train, test,
                f"{full.name} images beyond data.max_per_class={data.max_per_class} (the run trained on the "
                f"first {data.max_per_class} of each class)", True,
            )
    draw = torch.Generator().manual_seed(seed)
    kept, test = {}, {}
    for task, images in train.items():
        order = torch.randperm(images.shape[0], generator=draw)
        cut = max(1, int(round(images.shape[0] * FALLBACK_TEST_SHARE)))
        test[task], kept[task] = images[order[:cut]], images[order[cut:]]
    return RealData(
        kept, test,
        f"a seeded {FALLBACK_TEST_SHARE:.0%} of each task's training images: the run trained on every image of "
        f"its source, so the generator has seen these and the score is optimistic", False,
    )


def evaluate_utility(
    model: LoadedModel,
    *,
    samples_per_task: int = 1000,
    epochs: int = 4,
    seed: int = 0,
    max_test_per_task: int | None = 2000,
    min_steps: int = MIN_STEPS,
) -> UtilityReport:
    """The train-on-synthetic / test-on-real score of `model` on held-out real images, beside
    the same classifier trained on as many of the run's real training images.

    Deterministic for a given model, seed and thread count: generated images come from
    `model.sample(task, n, seed)`, real ones are chosen with `seed`.
    """
    if len(model.task_names) < 2:
        raise DataError(
            f"{model.label}: the classification accuracy score tells tasks apart; this model has one task "
            f"({model.task_names[0]})"
        )
    reals = held_out_reals(model.config, seed)
    empty = [task for task in model.task_names if reals.test.get(task) is None or reals.test[task].shape[0] == 0]
    if empty:
        raise DataError(f"{model.label}: no held-out real images for tasks {empty} ({reals.description})")
    test = dict(reals.test)
    if max_test_per_task is not None:
        draw = torch.Generator().manual_seed(seed + 1)
        for task, images in test.items():
            if images.shape[0] > max_test_per_task:
                test[task] = images[torch.randperm(images.shape[0], generator=draw)[:max_test_per_task]]
    report = classification_accuracy_score(
        lambda task, n: model.sample(task, n, seed=seed),
        test,
        real_train=reals.train,
        samples_per_task=samples_per_task,
        epochs=epochs,
        seed=seed,
        tasks=model.task_names,
        min_steps=min_steps,
    )
    report.test_data, report.test_disjoint, report.model = reals.description, reals.disjoint, model.label
    if report.train_per_task < samples_per_task:
        report.notes.append(
            f"{report.train_per_task} images per task for both classifiers (the smallest task has that many "
            f"real training images; asked for {samples_per_task})"
        )
    return report
