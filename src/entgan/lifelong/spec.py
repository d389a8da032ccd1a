"""A lifelong learning job, declared in YAML: where each task's data lives at the edge, how to train,
when to retrain, how to judge a candidate model.

    name: digits
    edge:
      root: /data/edge          # every sub-folder is a task (image-folder layout); new ones are new tasks
      tasks:                    # and/or tasks named one by one
        - {name: low, source: image-folder, path: /data/edge-low}
        - {name: high, source: mnist-subset, labels: [7, 8, 9]}
      holdout: 0.2              # share of each task's images kept out of training, for eval
    training: {rounds: 300, model: {hidden_dim: 128}}     # the run's settings (RunConfig sections)
    trigger:
      check_period_s: 60
      combine: or
      conditions:
        - {kind: samples, at_least: 500, scope: per-task}
        - {kind: group, combine: and, conditions: [
            {kind: window, start: "01:00", end: "05:00"},
            {kind: metric, metric: fid, task: any, operator: ">", threshold: 40, max_age_s: 86400}]}
      max_retry_delay_s: 3600   # back-off after failed stages: period * 2^failures, at most this
    eval: {samples_per_task: 500}
    deploy: {metric: fid, require: every-task, min_improvement: 0.0, tolerance: 0.1}

Strict like the run config: an unknown field, an unknown trigger metric, a bad operator, a missing
data location or a duplicated task name is an error that names the field. Relative paths are
resolved against the spec file's folder, once, when the job is created.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from entgan.config import (
    AggregationConfig,
    CheckpointConfig,
    ConfigError,
    ControlConfig,
    DataConfig,
    DataSourceKind,
    EngineConfig,
    EvalConfig,
    ModelConfig,
    OptimizerConfig,
    PositiveInt,
    RunConfig,
    TaskConfig,
    WarmStartConfig,
    check_unique_task_names,
    format_validation_error,
    moved_to_the_engine,
)

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=NAME_PATTERN)]
Metric = Literal["fid", "fidelity"]
DeployMetric = Literal["fid", "fidelity", "cas"]
"""What the deploy rule compares: the trigger metrics, or `cas` (`JobEvalSpec.cas`)."""
Operator = Literal[">", ">=", "<", "<=", "==", "!="]
RESERVED_TASK_SELECTORS = ("any", "every")
_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


class JobSpecError(ConfigError):
    """A job spec problem, phrased for the user (names the file and the field)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------- edge data
class TaskLocation(_Strict):
    """One task's data at the edge."""

    name: Name
    source: DataSourceKind = "image-folder"
    """`image-folder`: a folder with one sub-folder per class; new files appearing there are new data.
    `idx`, `mnist-subset`, `sklearn-digits`: a fixed source, cut to `labels`."""
    path: Path | None = None
    labels: list[int] | None = None
    """The source's class labels that make up this task (not for `image-folder`: its classes are
    its sub-folders)."""
    split: Literal["train", "test"] = "train"
    max_per_class: PositiveInt | None = None
    """Cap on images per class taken from a fixed source."""

    @model_validator(mode="after")
    def _fields_match_source(self) -> TaskLocation:
        if self.source in ("image-folder", "idx") and self.path is None:
            raise ValueError(f"path is required when source is '{self.source}'")
        if self.source == "image-folder" and self.labels is not None:
            raise ValueError("labels are not used with source 'image-folder' (its classes are its sub-folders)")
        if self.source != "image-folder" and not self.labels:
            raise ValueError(f"labels are required when source is '{self.source}'")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be unique, found {self.labels}")
        return self


class EdgeSpec(_Strict):
    """Where the tasks' data lives: tasks named one by one, and/or a root whose sub-folders are tasks."""

    tasks: list[TaskLocation] = []
    root: Path | None = None
    """Every visible sub-folder of `root` is a task named after it, in image-folder layout; a
    sub-folder that appears later is a new task. Names listed in `tasks` take precedence."""
    holdout: Annotated[float, Field(gt=0, lt=1)] = 0.2
    """Share of each task's images kept out of training and used by the eval stage. Chosen by a
    hash of each file's name, so an image never moves between training and held-out data."""

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks: list[TaskLocation]) -> list[TaskLocation]:
        check_unique_task_names([task.name for task in tasks])
        return tasks

    @model_validator(mode="after")
    def _has_a_location(self) -> EdgeSpec:
        if not self.tasks and self.root is None:
            raise ValueError("give edge.tasks, edge.root or both: the job has no data location")
        return self


# ----------------------------------------------------------------------------------------- training
class TrainingSpec(_Strict):
    """The settings of every training run of the job (the sections of a run config, minus the tasks
    and data, which the job fills from the edge locations)."""

    rounds: PositiveInt = 200
    seed: int = 0
    workers_per_task: PositiveInt = 1
    image_size: Literal[28, 32, 64] = 28
    channels: Literal[1, 3] = 1
    max_per_class: PositiveInt | None = None
    """Cap on training images per class (the first in file-name order)."""
    replay_weight: Annotated[float, Field(ge=0)] = 1.0
    """Weight of generative replay from the deployed model, which protects old tasks (0: off)."""
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    aggregation: AggregationConfig = AggregationConfig()
    control: ControlConfig = ControlConfig()
    eval: EvalConfig = EvalConfig()
    engine: EngineConfig = EngineConfig()
    checkpoint: CheckpointConfig = CheckpointConfig(every=0)

    @model_validator(mode="before")
    @classmethod
    def _moved_to_the_engine(cls, data: Any) -> Any:
        """Specs stored before participation and the memory layout moved to `engine`."""
        return moved_to_the_engine(data)

    def run_config(
        self,
        name: str,
        tasks: list[tuple[str, list[int]]],
        data_path: Path,
        warm_start_from: Path | None,
    ) -> RunConfig:
        """The run of one train stage: `tasks` as (name, labels) over an image-folder at `data_path`."""
        return RunConfig(
            name=name,
            seed=self.seed,
            rounds=self.rounds,
            data=DataConfig(
                source="image-folder",
                path=data_path,
                image_size=self.image_size,
                channels=self.channels,
                max_per_class=self.max_per_class,
            ),
            tasks=[TaskConfig(name=task, labels=labels, workers=self.workers_per_task) for task, labels in tasks],
            model=self.model,
            optimizer=self.optimizer,
            aggregation=self.aggregation,
            control=self.control,
            eval=self.eval,
            engine=self.engine,
            checkpoint=self.checkpoint,
            warm_start=(
                None
                if warm_start_from is None
                else WarmStartConfig(checkpoint=warm_start_from, replay_weight=self.replay_weight)
            ),
        )


# ----------------------------------------------------------------------------------------- triggers
class SamplesCondition(_Strict):
    """New samples since the last training run, per task (any task reaching the count) or in total.
    A task never trained before counts all of its samples as new."""

    kind: Literal["samples"]
    at_least: PositiveInt
    scope: Literal["per-task", "total"] = "per-task"


class WindowCondition(_Strict):
    """A daily time window, `start` to `end` ("HH:MM", local time unless `utc`); may span midnight."""

    kind: Literal["window"]
    start: str
    end: str
    utc: bool = False

    @field_validator("start", "end")
    @classmethod
    def _clock_time(cls, value: str) -> str:
        if not _CLOCK.match(value):
            raise ValueError(f"expected a time of day as HH:MM (00:00 to 23:59), found {value!r}")
        return value

    @model_validator(mode="after")
    def _not_empty(self) -> WindowCondition:
        if self.start == self.end:
            raise ValueError(f"start and end must differ, both are {self.start!r}")
        return self


class MetricCondition(_Strict):
    """A condition on the deployed model's most recent evaluation, e.g. FID above a threshold.
    `task`: a task name, `any` (some task satisfies it) or `every` (all tasks do)."""

    kind: Literal["metric"]
    metric: Metric
    operator: Operator
    threshold: float
    task: str = "any"
    max_age_s: Annotated[float, Field(gt=0)] | None = None
    """Figures older than this are not trusted: the controller measures the deployed model again
    (on the edge's held-out images of now, with the job's classifier) before the trigger decides,
    whenever the answer could change the decision. None: the last figures, however old."""


class NewTaskCondition(_Strict):
    """True when an edge location holds a task the knowledge base has never trained."""

    kind: Literal["new-task"]


class GroupCondition(_Strict):
    """Conditions combined with `and` / `or` (groups nest)."""

    kind: Literal["group"]
    combine: Literal["and", "or"] = "or"
    conditions: Annotated[list[Condition], Field(min_length=1)]


Condition = Annotated[
    Union[SamplesCondition, WindowCondition, MetricCondition, NewTaskCondition, GroupCondition],
    Field(discriminator="kind"),
]
CONDITION_KINDS = ("samples", "window", "metric", "new-task", "group")
GroupCondition.model_rebuild()


class TriggerSpec(_Strict):
    """When the train stage moves from Waiting to Ready. Checked every `check_period_s` seconds,
    whatever the controller's own loop period."""

    check_period_s: Annotated[float, Field(gt=0)] = 60.0
    combine: Literal["and", "or"] = "or"
    conditions: Annotated[list[Condition], Field(min_length=1)]
    max_retry_delay_s: Annotated[float, Field(gt=0)] = 3600.0
    """Back-off after failures: when a stage has failed `n` times in a row, the next trigger check
    (hence the next attempt) waits `check_period_s * 2**n` after the failure, at most this long
    (and never less than `check_period_s`)."""


# --------------------------------------------------------------------------------- eval and deploy
class CasSpec(_Strict):
    """The classification accuracy score (train on synthetic, test on real; `metrics.utility`): a small
    classifier trained on a model's generated images, labelled by task, is tested on the held-out
    real images; per task, the share of that task's real images it recognises (higher is better)."""

    samples_per_task: Annotated[int, Field(ge=2)] = 500
    """Generated images per task the classifier trains on (at most as many as the smallest task has
    real training images, so the real-data reference trains on as many)."""
    epochs: PositiveInt = 4
    """Classifier training epochs (more for small sets: at least 150 steps)."""


class JobEvalSpec(_Strict):
    samples_per_task: Annotated[int, Field(ge=2)] = 500
    """Generated images per task that FID and task fidelity are computed on."""
    seed: int = 0
    """Seed of the latents: candidate and deployed model are sampled from the same latents."""
    cas: CasSpec | None = None
    """Also measure the classification accuracy score of both models (on by itself, with these
    defaults, when `deploy.metric` is `cas`). It needs at least two tasks."""


class DeploySpec(_Strict):
    """When a candidate replaces the deployed model.

    A task is *better* when the candidate improves `metric` by at least `min_improvement` (relative,
    and strictly), *within tolerance* when it is worse by at most `tolerance` (relative), else *worse*.
    `every-task`: deploy only if every task is better. `any-task`: deploy if some task is better and
    none is worse. A candidate that adds tasks is deployed when no old task is worse (its purpose is
    the new task; the old ones must not be forgotten). The first candidate is deployed as it is.

    `metric`: `fid` (lower is better), `fidelity` or `cas` (higher is better; see `CasSpec`).
    """

    metric: DeployMetric = "fid"
    require: Literal["every-task", "any-task"] = "every-task"
    min_improvement: Annotated[float, Field(ge=0)] = 0.0
    tolerance: Annotated[float, Field(ge=0)] = 0.1


# -------------------------------------------------------------------------------------------- job
class JobSpec(_Strict):
    name: Name
    edge: EdgeSpec
    training: TrainingSpec = TrainingSpec()
    trigger: TriggerSpec
    eval: JobEvalSpec = JobEvalSpec()
    deploy: DeploySpec = DeploySpec()

    @model_validator(mode="after")
    def _metric_tasks_are_not_selectors(self) -> JobSpec:
        for task in self.edge.tasks:
            if task.name in RESERVED_TASK_SELECTORS:
                raise ValueError(f"task name {task.name!r} is reserved (trigger conditions use it)")
        return self

    @model_validator(mode="after")
    def _cas_has_tasks_to_tell_apart(self) -> JobSpec:
        if (self.deploy.metric == "cas" or self.eval.cas is not None) and self.edge.root is None \
                and len(self.edge.tasks) < 2:
            raise ValueError("the classification accuracy score (deploy.metric: cas, eval.cas) tells tasks apart: "
                             f"it needs at least 2 tasks, edge.tasks lists {len(self.edge.tasks)} and there is no edge.root")
        return self

    @property
    def cas(self) -> CasSpec | None:
        """The score's settings if the eval stage measures it (asked for, or the deploy metric)."""
        if self.eval.cas is not None:
            return self.eval.cas
        return CasSpec() if self.deploy.metric == "cas" else None

    def resolved(self, base: Path) -> JobSpec:
        """This spec with every relative path made absolute against `base` (the spec's folder)."""

        def absolute(path: Path | None) -> Path | None:
            return None if path is None else (base / path.expanduser()).resolve()

        edge = self.edge.model_copy(
            update={
                "root": absolute(self.edge.root),
                "tasks": [task.model_copy(update={"path": absolute(task.path)}) for task in self.edge.tasks],
            }
        )
        return self.model_copy(update={"edge": edge})


def _format_errors(error: ValidationError, origin: str) -> str:
    """The run config's error format, without the tag pydantic puts into the path of a condition
    (`trigger.conditions.1.metric.operator` reads better as `trigger.conditions.1.operator`)."""
    text = format_validation_error(error, origin).replace(": invalid configuration", ": invalid job spec", 1)
    kinds = "|".join(re.escape(kind) for kind in CONDITION_KINDS)
    return re.sub(rf"(conditions\.\d+)\.(?:{kinds})(?=[.:])", r"\1", text)


def check_locations(spec: JobSpec) -> list[str]:
    """Problems with the data locations of a resolved spec, one line each, naming the field."""
    problems = []
    if spec.edge.root is not None and not spec.edge.root.is_dir():
        problems.append(f"edge.root: {spec.edge.root}: {_what_is_there(spec.edge.root)}, expected a folder")
    for index, task in enumerate(spec.edge.tasks):
        if task.path is not None and not task.path.is_dir():
            problems.append(f"edge.tasks.{index}.path: {task.path}: {_what_is_there(task.path)}, expected a folder")
    return problems


def _what_is_there(path: Path) -> str:
    return "a file" if path.exists() else "does not exist"


def check_training(spec: JobSpec, origin: str) -> None:
    """Build a trial run config from `training`, so cross-field problems surface at create time."""
    from entgan.models import check_model_supports

    trial = spec.training.run_config("trial", [("trial", [0])], Path("."), None)
    try:
        check_model_supports(trial.model, trial.image_shape, 1)
    except ValueError as error:
        raise JobSpecError(f"{origin}: invalid job spec\n  - training.{error}") from None


def parse_job_spec(data: object, origin: str = "<job spec>", base: Path | None = None) -> JobSpec:
    """Validate a mapping into a resolved `JobSpec` whose data locations exist, or raise JobSpecError."""
    if not isinstance(data, dict):
        raise JobSpecError(f"{origin}: expected a mapping at the top level, found {type(data).__name__}")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as error:
        raise JobSpecError(_format_errors(error, origin)) from None
    spec = spec.resolved(base or Path.cwd())
    problems = check_locations(spec)
    if problems:
        raise JobSpecError("\n".join([f"{origin}: missing data location", *(f"  - {p}" for p in problems)]))
    check_training(spec, origin)
    return spec


def load_job_spec(path: str | Path) -> JobSpec:
    """Read a job spec file; relative paths in it are taken from the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise JobSpecError(f"{path}: job spec file not found")
    try:
        data: Any = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise JobSpecError(f"{path}: not valid YAML: {error}") from None
    return parse_job_spec(data, origin=str(path), base=path.resolve().parent)


def spec_from_json(text: str) -> JobSpec:
    """A spec stored by the job store (already validated and resolved when the job was created)."""
    return JobSpec.model_validate_json(text)
