"""The work of the train, eval and measure stages, as the stage process runs it (see `stage_process`).

Train: freeze the edge data into a snapshot, build the run's config from the job spec (tasks in the
knowledge base's order, new tasks last; warm start from the deployed version), and run the real
engine with `launch_local`. Eval: measure the candidate and the deployed model on the snapshot's
held-out images, per task, with the same domain classifier and the same latents for both. Measure:
the deployed model alone, on a fresh snapshot of its tasks' data at the edge (for a metric trigger
whose figures are too old).

Every stage measures FID with the job's own domain classifier for the snapshot's tasks and classes
(its *label space*): the one in the job's knowledge-base folder when the job has one for that label
space, else one trained now on the snapshot's training images and written there, named by its
sha256. The controller registers it in the knowledge base; so a job's classifier changes only when
its set of tasks (or a task's classes) changes, and the figures of its versions are on one scale.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from entgan.config import ConfigError
from entgan.data.errors import DataError
from entgan.lifelong.edge import Snapshot, SnapshotTask, build_snapshot
from entgan.lifelong.spec import JobSpec, TaskLocation

SNAPSHOT_DIR = "data"
RUN_DIR = "run"
KB_DIR = "knowledge-base"
"""The job's knowledge-base folder, inside the job's folder (its domain classifiers live there)."""
CLASSIFIERS_DIR = "classifiers"
SUMMARY_KEYS = ("rounds", "train_clock_s", "wall_clock_s", "first_eval", "final_eval")

# Files of an attempt's folder (see `stage_process`).
REQUEST_FILE = "request.json"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
LOG_FILE = "stage.log"
EXIT_USER_ERROR = 3


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file, fsync, rename): readers see all of it or nothing."""
    from entgan.rundir import atomic_write

    atomic_write(path, lambda handle: handle.write(json.dumps(data, indent=2, sort_keys=True).encode()))


def read_json(path: Path) -> Any | None:
    """The JSON in `path`, or None if there is no such file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Message):
    version: int
    checkpoint: Path


class ClassifierRef(_Message):
    """One of the job's domain classifiers, as the knowledge base records it."""

    version: int
    key: str
    """Its label space (see `label_space`)."""
    file: Path
    sha256: str


class TrainRequest(_Message):
    stage: Literal["train"] = "train"
    job: str
    cycle: int
    spec: JobSpec
    tasks: list[TaskLocation]
    """The tasks to train, in order: known tasks first (first-seen order), new tasks last."""
    parent: ModelRef | None
    """The deployed version the run warm-starts from (None: trained from scratch)."""
    cache_dir: Path | None = None
    classifiers: list[ClassifierRef] = []
    """The job's classifiers; the one for the snapshot's label space is used (see module doc)."""
    kb_dir: Path | None = None
    """The job's knowledge-base folder, where a new classifier is written."""


class CandidateRef(ModelRef):
    snapshot: dict[str, Any]


class EvalRequest(_Message):
    stage: Literal["eval"] = "eval"
    job: str
    cycle: int
    spec: JobSpec
    candidate: CandidateRef
    deployed: ModelRef | None
    cache_dir: Path | None = None
    classifiers: list[ClassifierRef] = []
    kb_dir: Path | None = None


class MeasureRequest(_Message):
    stage: Literal["measure"] = "measure"
    job: str
    cycle: int
    spec: JobSpec
    deployed: ModelRef
    tasks: list[TaskLocation]
    """The deployed model's tasks, as they are at the edge now, in its order."""
    cache_dir: Path | None = None
    classifiers: list[ClassifierRef] = []
    kb_dir: Path | None = None


class StageRequest(_Message):
    """What the controller writes into an attempt's folder for the stage process to do."""

    request: Annotated[Union[TrainRequest, EvalRequest, MeasureRequest], Field(discriminator="stage")]


# ------------------------------------------------------------------------------- the job's classifier
def label_space(snapshot: Snapshot) -> tuple[str, list[dict[str, Any]]]:
    """The snapshot's tasks with their classes and labels, in label order, and a key naming them:
    two snapshots with the same key number the same classes the same way, so one classifier
    serves both."""
    classes = []
    for task in snapshot.tasks:
        names = [folder.split("-", 1)[1][len(task.name) + 1:] for folder in task.folders]  # NNN-<task>-<class>
        classes.append({"task": task.name, "classes": names, "labels": list(task.labels)})
    key = hashlib.sha256(json.dumps(classes, sort_keys=True).encode()).hexdigest()[:16]
    return key, classes


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def job_classifier(
    known: list[ClassifierRef], snapshot: Snapshot, config: Any, cache_dir: Path | None, kb_dir: Path | None
) -> dict[str, Any]:
    """The job's classifier for `snapshot`'s label space: a known one (its file checked against the
    recorded sha256), or a new one trained on the snapshot's training images (`config`'s data) and
    written to `kb_dir/classifiers/classifier-<sha256>.pt`. Returns what the controller records:
    version (None when new), key, classes, file, sha256."""
    from entgan.engine.launch import domain_classifier
    from entgan.metrics.classifier import save_domain_classifier

    key, classes = label_space(snapshot)
    for ref in known:
        if ref.key == key:
            if not ref.file.is_file():
                raise ConfigError(f"{ref.file}: the job's classifier c{ref.version} is missing (restore the file; "
                                  f"figures measured with another one would not compare with the job's others)")
            found = file_sha256(ref.file)
            if found != ref.sha256:
                raise ConfigError(f"{ref.file}: sha256 {found[:12]}, but the knowledge base records "
                                  f"{ref.sha256[:12]} for classifier c{ref.version}: the file was changed")
            return {"version": ref.version, "key": key, "classes": classes, "file": str(ref.file), "sha256": ref.sha256}
    if kb_dir is None:
        raise ConfigError("the stage request names no knowledge-base folder for the job's classifier")
    folder = kb_dir / CLASSIFIERS_DIR
    incoming = folder / f".incoming-{os.getpid()}.pt"
    save_domain_classifier(domain_classifier(config, cache_dir), incoming)
    sha256 = file_sha256(incoming)
    target = folder / f"classifier-{sha256[:16]}.pt"
    os.replace(incoming, target)  # named by its content: a rerun that trains the same weights finds it there
    return {"version": None, "key": key, "classes": classes, "file": str(target), "sha256": sha256}


def run_train(request: TrainRequest, workdir: Path) -> dict[str, Any]:
    from entgan.engine.launch import launch_local
    from entgan.algorithms.entgan.warmstart import check_compatible, load_checkpoint
    from entgan.rundir import RunDirectory

    spec = request.spec
    snapshot = build_snapshot(
        request.tasks, spec.edge.holdout, spec.training.image_size, spec.training.channels, workdir / SNAPSHOT_DIR
    )
    config = spec.training.run_config(
        name=f"{request.job}-cycle{request.cycle:04d}",
        tasks=[(task.name, task.labels) for task in snapshot.tasks],
        data_path=snapshot.train_dir,
        warm_start_from=None if request.parent is None else request.parent.checkpoint,
    )
    if config.warm_start is not None:  # a missing or unsuitable parent is the user's to fix: say so here
        check_compatible(load_checkpoint(config.warm_start.checkpoint).config, config, config.warm_start.checkpoint)
    classifier = job_classifier(request.classifiers, snapshot, config, request.cache_dir, request.kb_dir)
    run_dir = workdir / RUN_DIR
    summary = launch_local(
        config, run_dir, cache_dir=request.cache_dir, show_progress=False, classifier_file=Path(classifier["file"])
    )
    return {
        "checkpoint": str(RunDirectory(run_dir).latest_checkpoint()),
        "run_dir": str(run_dir),
        "snapshot": snapshot.as_dict(),
        "summary": {key: summary[key] for key in SUMMARY_KEYS},
        "classifier": classifier,
    }


def read_holdout(snapshot: Snapshot, task: SnapshotTask, image_size: int, channels: int) -> Any:
    """A task's held-out images as (N, C, H, W) in [-1, 1]."""
    import torch

    from entgan.data.image_folder import image_files, read_image
    from entgan.data.transforms import to_model_range

    images = []
    for folder in task.folders:
        path = snapshot.holdout_dir / folder
        if path.is_dir():
            images.extend(read_image(file, channels, image_size) for file in image_files(path))
    if len(images) < 2:
        raise DataError(
            f"task '{task.name}' has {len(images)} held-out image(s); eval needs at least 2 "
            f"(add images at its edge location or raise edge.holdout)"
        )
    return to_model_range(torch.stack(images))


def latent_seed(base: int, task: str) -> int:
    """The eval latents of one task: the same for every model, whatever the task's index."""
    return base + zlib.crc32(task.encode())


def measure(evaluator: Any, checkpoint: Any, tasks: list[str], samples: int, seed: int) -> dict[str, dict[str, float]]:
    """FID and task fidelity of a checkpoint's generator for `tasks`."""
    import torch

    generator = checkpoint.generator.eval()
    fakes = {}
    for task in tasks:
        latents = torch.Generator().manual_seed(latent_seed(seed, task))
        fakes[task] = generator.sample(checkpoint.config.task_index(task), samples, generator=latents)
    report = evaluator.evaluate(fakes)
    return {task: {"fid": report.fid[task], "fidelity": report.fidelity[task]} for task in tasks}


def _evaluator(spec: JobSpec, snapshot: Snapshot, classifier: Any) -> Any:
    from entgan.metrics import QualityEvaluator

    reals = {
        task.name: read_holdout(snapshot, task, spec.training.image_size, spec.training.channels)
        for task in snapshot.tasks
    }
    labels = {task.name: task.labels for task in snapshot.tasks}
    return QualityEvaluator(classifier, reals, labels, max_real_per_task=None), reals


def run_eval(request: EvalRequest, workdir: Path) -> dict[str, Any]:
    from entgan.engine.launch import domain_classifier
    from entgan.algorithms.entgan.warmstart import load_checkpoint

    spec = request.spec
    candidate = load_checkpoint(request.candidate.checkpoint)
    snapshot = Snapshot.from_dict(request.candidate.snapshot)
    identity = job_classifier(request.classifiers, snapshot, candidate.config, request.cache_dir, request.kb_dir)
    classifier = domain_classifier(candidate.config, classifier_file=Path(identity["file"]))
    evaluator, reals = _evaluator(spec, snapshot, classifier)
    samples, seed = spec.eval.samples_per_task, spec.eval.seed
    result: dict[str, Any] = {
        "candidate": measure(evaluator, candidate, candidate.task_names, samples, seed),
        "deployed": None,
        "deployed_tasks": None,
        "holdout": {name: int(images.shape[0]) for name, images in reals.items()},
        "classifier": identity,
    }
    deployed = None
    if request.deployed is not None:
        deployed = load_checkpoint(request.deployed.checkpoint)
        common = [task for task in candidate.task_names if task in deployed.task_names]
        result["deployed"] = measure(evaluator, deployed, common, samples, seed) if common else {}
        result["deployed_tasks"] = deployed.task_names
    if spec.cas is not None:
        result["cas"] = measure_cas(spec, candidate, deployed, reals, result)
    return result


def measure_cas(spec: JobSpec, candidate: Any, deployed: Any, reals: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Add each task's classification accuracy score to the figures in `result` (as "cas") and return
    the summary: both models' classifiers are tested on the same held-out images, trained with the
    same seed on as many images per task.

    Per-task scores depend on which tasks the classifier tells apart, so the deployed model and the
    candidate are compared on the tasks they share; a candidate's new task gets its score from the
    classifier over all of its tasks. A deployed model sharing fewer than 2 tasks has no score.
    """
    from entgan.deployed import LoadedModel, ResolvedModel
    from entgan.metrics.utility import classification_accuracy_score
    from entgan.utility import training_images

    settings, seed = spec.cas, spec.eval.seed
    assert settings is not None
    tasks = candidate.task_names
    if len(tasks) < 2:
        raise DataError(f"the classification accuracy score tells tasks apart; the candidate has one task {tasks}")

    def score(checkpoint: Any, names: list[str], real_train: Any = None) -> Any:
        model = LoadedModel(ResolvedModel(str(checkpoint.path), checkpoint.path, str(checkpoint.path)),
                            checkpoint.config, checkpoint.generator.eval())
        return classification_accuracy_score(
            lambda task, n: model.sample(task, n, seed=seed), {task: reals[task] for task in names},
            real_train=real_train, samples_per_task=settings.samples_per_task, epochs=settings.epochs,
            seed=seed, tasks=names,
        )

    full = score(candidate, tasks, training_images(candidate.config))
    candidate_scores = dict(full.synthetic_per_task)
    deployed_scores: dict[str, float] = {}
    if deployed is not None:
        common = [task for task in tasks if task in deployed.task_names]
        if len(common) >= 2:
            deployed_scores = score(deployed, common).synthetic_per_task
            if common != tasks:
                candidate_scores.update(score(candidate, common).synthetic_per_task)
    for task, value in candidate_scores.items():
        result["candidate"][task]["cas"] = value
    for task, value in deployed_scores.items():
        result["deployed"][task]["cas"] = value
    return {
        "candidate": full.synthetic,
        "real_reference": full.real,
        "train_per_task": full.train_per_task,
        "epochs": full.epochs,
        "test_per_task": full.test_per_task,
    }


def run_measure(request: MeasureRequest, workdir: Path) -> dict[str, Any]:
    """The deployed model on the held-out images at the edge now, with the job's classifier."""
    from entgan.engine.launch import domain_classifier
    from entgan.algorithms.entgan.warmstart import load_checkpoint

    spec = request.spec
    deployed = load_checkpoint(request.deployed.checkpoint)
    if not request.tasks:
        raise DataError(f"none of the deployed version's tasks {deployed.task_names} is at the edge now")
    snapshot = build_snapshot(
        request.tasks, spec.edge.holdout, spec.training.image_size, spec.training.channels, workdir / SNAPSHOT_DIR
    )
    config = spec.training.run_config(
        name=f"{request.job}-measure", tasks=[(task.name, task.labels) for task in snapshot.tasks],
        data_path=snapshot.train_dir, warm_start_from=None,
    )
    identity = job_classifier(request.classifiers, snapshot, config, request.cache_dir, request.kb_dir)
    evaluator, reals = _evaluator(spec, snapshot, domain_classifier(config, classifier_file=Path(identity["file"])))
    tasks = [task.name for task in snapshot.tasks if task.name in deployed.task_names]
    return {
        "deployed": measure(evaluator, deployed, tasks, spec.eval.samples_per_task, spec.eval.seed),
        "holdout": {name: int(images.shape[0]) for name, images in reals.items()},
        "snapshot": snapshot.as_dict(),
        "classifier": identity,
    }
