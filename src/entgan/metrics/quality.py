"""Per-task sample quality: FID in the domain classifier's feature space, and task fidelity.

FID is computed with torchmetrics' `FrechetInceptionDistance` given our own feature module, so
the (tested) statistics code is reused rather than rewritten. Real-image statistics are
accumulated once at construction (one metric per task plus one over all tasks, all with
`reset_real_features=False`); each `evaluate` only resets and refills the fake side, which is
what makes frequent evaluation during training affordable.

Fidelity answers a question FID cannot: did the generator of task "A" produce images of task A's
classes at all, or drift into another task's classes (a failure mode of multi-task GANs)?
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from entgan.metrics.classifier import DomainClassifier

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance

__all__ = ["ClassifierFeatures", "QualityEvaluator", "QualityReport"]

_EVAL_BATCH = 500
_OVERALL = "overall"


class ClassifierFeatures(nn.Module):
    """Adapter presenting a `DomainClassifier` as a torchmetrics FID feature extractor.

    torchmetrics needs an integer `num_features` attribute (otherwise it probes the module with
    a 299x299 dummy image, which our inputs never look like) and passes images through unchanged
    when `normalize=True` with a custom module, so inputs stay float in [-1, 1] as trained.
    """

    def __init__(self, classifier: DomainClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features: int = classifier.num_features

    def forward(self, x: Tensor) -> Tensor:
        """Features (N, num_features) as float32, without autograd.

        A 2-D input of width `num_features` is taken to be features already extracted by
        `extract` and is passed through unchanged: the evaluator runs the CNN once per batch and
        feeds the result to several FID metrics and to the fidelity count.
        """
        if x.dim() == 2 and x.shape[1] == self.num_features:
            return x.float()
        return self.extract(x)

    def extract(self, images: Tensor) -> Tensor:
        """Run the classifier's feature layers on images (N, C, H, W)."""
        with torch.no_grad():
            return self.classifier.features(images.float()).float()


@dataclass
class QualityReport:
    """Result of one evaluation; `to_dict` flattens it for loggers."""

    fid: dict[str, float] = field(default_factory=dict)
    fid_overall: float = float("nan")
    fidelity: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, float]:
        """Flat mapping such as {"fid/A": .., "fid/overall": .., "fidelity/A": ..}."""
        flat: dict[str, float] = {f"fid/{task}": value for task, value in self.fid.items()}
        flat[f"fid/{_OVERALL}"] = self.fid_overall
        flat.update({f"fidelity/{task}": value for task, value in self.fidelity.items()})
        return flat


class NonFiniteSamplesError(ValueError):
    """The generator's samples hold NaN or inf: FID is undefined and training has diverged."""


def _batches(images: Tensor, batch_size: int) -> Sequence[Tensor]:
    return [images[i : i + batch_size] for i in range(0, images.shape[0], batch_size)]


class QualityEvaluator:
    """Scores generated images per task against fixed real-image statistics.

    `real_by_task` maps task name -> real images (N, C, H, W) in [-1, 1]; `task_classes` maps the
    same names to the classifier labels that belong to each task. At most `max_real_per_task`
    real images per task (a seeded random subset, so sorted data does not bias it) are used, which
    bounds construction time; `None` uses all of them. The overall FID compares the union of the
    evaluated fakes with the union of all tasks' (subsampled) reals, so it is meaningful when
    every task is evaluated with a comparable number of fakes.
    """

    def __init__(
        self,
        classifier: DomainClassifier,
        real_by_task: Mapping[str, Tensor],
        task_classes: Mapping[str, Sequence[int]],
        max_real_per_task: int | None = 2000,
        *,
        batch_size: int = _EVAL_BATCH,
        subsample_seed: int = 0,
    ) -> None:
        if not real_by_task:
            raise ValueError("real_by_task is empty: at least one task is needed")
        if _OVERALL in real_by_task:
            raise ValueError(f"task name {_OVERALL!r} is reserved: it would collide with fid/{_OVERALL}")
        missing = sorted(set(real_by_task) - set(task_classes))
        if missing:
            raise KeyError(f"task_classes has no entry for task(s) {missing}")
        if max_real_per_task is not None and max_real_per_task < 2:
            raise ValueError(f"max_real_per_task must be >= 2 or None, got {max_real_per_task}")
        self.classifier = classifier.eval()
        self.batch_size = batch_size
        self.task_classes: dict[str, list[int]] = {
            task: [int(c) for c in classes] for task, classes in task_classes.items()
        }
        self._device = next(classifier.parameters()).device
        features = ClassifierFeatures(classifier)
        self._features = features
        self._fid_by_task: dict[str, FrechetInceptionDistance] = {}
        self._fid_overall = self._new_fid(features)
        generator = torch.Generator().manual_seed(subsample_seed)
        for task, images in real_by_task.items():
            self._check_images(task, images)
            if images.shape[0] < 2:
                raise ValueError(f"task {task!r} needs at least 2 real images, got {images.shape[0]}")
            if max_real_per_task is not None and images.shape[0] > max_real_per_task:
                keep = torch.randperm(images.shape[0], generator=generator)[:max_real_per_task]
                images = images[keep]
            fid = self._new_fid(features)
            with torch.no_grad():
                for batch in _batches(images, batch_size):
                    batch_features = features.extract(batch.to(self._device, torch.float32))
                    fid.update(batch_features, real=True)
                    self._fid_overall.update(batch_features, real=True)
            self._fid_by_task[task] = fid

    def _new_fid(self, features: ClassifierFeatures) -> FrechetInceptionDistance:
        # Imported here: torchmetrics pulls in scipy and matplotlib (over a second per process),
        # and only the rank that evaluates needs it.
        from torchmetrics.image.fid import FrechetInceptionDistance

        # sync_on_compute=False: the evaluator runs on one rank of a live process group, and
        # torchmetrics would otherwise try to gather its state from every rank (a deadlock).
        fid = FrechetInceptionDistance(
            feature=features, reset_real_features=False, normalize=True, sync_on_compute=False
        )
        return fid.to(self._device)

    def _check_images(self, task: str, images: Tensor) -> None:
        shape = tuple(images.shape[1:])
        if images.dim() != 4 or shape != tuple(self.classifier.image_shape):
            raise ValueError(
                f"task {task!r}: images must be (N, {', '.join(map(str, self.classifier.image_shape))})"
                f" to match the classifier, got {tuple(images.shape)}"
            )

    @property
    def tasks(self) -> list[str]:
        """Task names with real statistics, in construction order."""
        return list(self._fid_by_task)

    def evaluate(self, fakes_by_task: Mapping[str, Tensor]) -> QualityReport:
        """FID per task, overall FID and fidelity for generated images (each task >= 2 images).

        Raises KeyError naming the task if a task has no real statistics.
        """
        if not fakes_by_task:
            raise ValueError("fakes_by_task is empty: nothing to evaluate")
        for task, fakes in fakes_by_task.items():
            if task not in self._fid_by_task:
                raise KeyError(f"no real statistics for task {task!r}; known tasks: {self.tasks}")
            self._check_images(task, fakes)
            if fakes.shape[0] < 2:
                raise ValueError(f"task {task!r} needs at least 2 generated images, got {fakes.shape[0]}")
            if not bool(torch.isfinite(fakes).all()):  # LAPACK's eigensolver would crash the process on them
                raise NonFiniteSamplesError(
                    f"task {task!r}: the generator produced non-finite values (NaN or inf) in "
                    f"{int((~torch.isfinite(fakes)).flatten(1).any(dim=1).sum())} of {fakes.shape[0]} images; "
                    "training diverged"
                )

        report = QualityReport()
        self._fid_overall.reset()  # keeps the real statistics (reset_real_features=False)
        with torch.no_grad():
            for task, fakes in fakes_by_task.items():
                fid = self._fid_by_task[task]
                fid.reset()
                allowed = torch.tensor(self.task_classes[task], dtype=torch.long)
                in_task = 0
                for batch in _batches(fakes, self.batch_size):
                    # One CNN pass per batch serves both FIDs and the fidelity count.
                    batch_features = self._features.extract(batch.to(self._device, torch.float32))
                    fid.update(batch_features, real=False)
                    self._fid_overall.update(batch_features, real=False)
                    predicted = self.classifier.logits_from_features(batch_features).argmax(dim=1)
                    in_task += int(torch.isin(predicted.cpu(), allowed).sum())
                report.fid[task] = float(fid.compute())
                report.fidelity[task] = in_task / fakes.shape[0]
            report.fid_overall = float(self._fid_overall.compute())
        return report
