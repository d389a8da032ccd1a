"""How useful generated data is downstream: the classification accuracy score (CAS, "train on
synthetic, test on real", Ravuri & Vinyals 2019), beside the same classifier trained on real data.

The downstream task is telling the run's tasks apart: a small CNN (the `DomainClassifier` recipe)
is trained on generated images labelled by the task they were generated for, then asked which task
each held-out *real* image belongs to. Its accuracy says whether the generator's images carry what
distinguishes the tasks in real data; a generator that draws one task's images for another, or
images that look like no real task, scores low. The same classifier trained on as many real images
per task gives the reference (what real data of that size buys); CAS close to it means the
synthetic data is about as useful as real data of the same size for this task.

Accuracy is balanced: the mean over tasks of the share of that task's real images classified as
that task (so a large task does not dominate). Both classifiers see the same number of images per
task, train with the same seed and recipe, and are tested on the same real images. Deterministic
for given inputs, seed and thread count. It needs at least two tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from entgan.metrics.classifier import train_domain_classifier

__all__ = ["UtilityReport", "classification_accuracy_score", "per_task_accuracy", "training_epochs"]

BATCH_SIZE = 64
MIN_STEPS = 150
"""Fewest optimizer steps either classifier takes: with few images per task, `epochs` passes alone
would leave the classifier barely trained and the score would measure that, not the data."""

Sampler = Callable[[str, int], Tensor]
"""`sampler(task, n)`: n generated images (N, C, H, W) in [-1, 1] of `task`, deterministically."""


@dataclass
class UtilityReport:
    """Train-on-synthetic / test-on-real accuracy beside train-on-real / test-on-real."""

    tasks: list[str]
    synthetic: float
    """CAS: balanced accuracy on real held-out images of the classifier trained on generated ones."""
    real: float | None
    """The same classifier trained on as many real images per task (None: not measured)."""
    synthetic_per_task: dict[str, float]
    real_per_task: dict[str, float] | None
    train_per_task: int
    """Training images per task, for both classifiers."""
    test_per_task: dict[str, int]
    epochs: int
    """Passes over the training images (at least the asked-for number; more for small sets)."""
    seed: int
    test_data: str = ""
    """What the real test images are, in words (and whether the generator ever saw them)."""
    test_disjoint: bool = True
    """False when the test images are among those the generator was trained on."""
    model: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        """CAS relative to the real-data reference (1.0: as useful as real data of the same size)."""
        if self.real is None or self.real <= 0:
            return None
        return self.synthetic / self.real

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def per_task_accuracy(predicted: Tensor, labels: Tensor, tasks: Sequence[str]) -> dict[str, float]:
    """For each task, the share of its images (label = its index) predicted as that task."""
    return {
        task: float((predicted[labels == index] == index).float().mean())
        for index, task in enumerate(tasks)
        if bool((labels == index).any())
    }


def training_epochs(images: int, epochs: int, min_steps: int = MIN_STEPS) -> int:
    """`epochs`, raised so that training on `images` images takes at least `min_steps` steps."""
    per_epoch = max(1, -(-images // BATCH_SIZE))
    return max(epochs, -(-min_steps // per_epoch))


def _train_and_test(
    train: Mapping[str, Tensor], test: Mapping[str, Tensor], tasks: Sequence[str], epochs: int, seed: int
) -> dict[str, float]:
    images = torch.cat([train[task] for task in tasks])
    labels = torch.cat([torch.full((train[task].shape[0],), index, dtype=torch.int64) for index, task in enumerate(tasks)])
    classifier = train_domain_classifier(
        images, labels, num_classes=len(tasks), epochs=epochs, seed=seed, batch_size=BATCH_SIZE
    )
    test_images = torch.cat([test[task] for task in tasks])
    test_labels = torch.cat(
        [torch.full((test[task].shape[0],), index, dtype=torch.int64) for index, task in enumerate(tasks)]
    )
    return per_task_accuracy(classifier.predict(test_images), test_labels, tasks)


def classification_accuracy_score(
    sampler: Sampler,
    real_test: Mapping[str, Tensor],
    *,
    real_train: Mapping[str, Tensor] | None = None,
    samples_per_task: int = 1000,
    epochs: int = 4,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    min_steps: int = MIN_STEPS,
) -> UtilityReport:
    """CAS of `sampler` on `real_test` (images per task), and the real-data reference if
    `real_train` is given (per task, at least as many images as are used).

    With `real_train`, each task uses min(`samples_per_task`, the smallest task's real training
    images) images for both classifiers, drawn from the real ones with `seed`.
    """
    tasks = list(tasks if tasks is not None else real_test)
    if len(tasks) < 2:
        raise ValueError(f"the classification accuracy score needs at least 2 tasks to tell apart, found {tasks}")
    missing = [task for task in tasks if task not in real_test or real_test[task].shape[0] == 0]
    if missing:
        raise ValueError(f"no real test images for tasks {missing}")
    per_task = samples_per_task
    if real_train is not None:
        per_task = min(per_task, *(int(real_train[task].shape[0]) for task in tasks))
    if per_task < 1:
        raise ValueError("no real training images to compare with")
    epochs = training_epochs(per_task * len(tasks), epochs, min_steps)
    synthetic = {task: sampler(task, per_task).detach().float().cpu() for task in tasks}
    synthetic_scores = _train_and_test(synthetic, real_test, tasks, epochs, seed)
    real_scores = None
    if real_train is not None:
        draw = torch.Generator().manual_seed(seed)
        chosen = {
            task: real_train[task][torch.randperm(real_train[task].shape[0], generator=draw)[:per_task]]
            for task in tasks
        }
        real_scores = _train_and_test(chosen, real_test, tasks, epochs, seed)
    return UtilityReport(
        tasks=tasks,
        synthetic=sum(synthetic_scores.values()) / len(synthetic_scores),
        real=None if real_scores is None else sum(real_scores.values()) / len(real_scores),
        synthetic_per_task=synthetic_scores,
        real_per_task=real_scores,
        train_per_task=per_task,
        test_per_task={task: int(real_test[task].shape[0]) for task in tasks},
        epochs=epochs,
        seed=seed,
    )
