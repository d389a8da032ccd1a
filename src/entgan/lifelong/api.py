"""Python API for lifelong learning jobs (the `entgan job` and `entgan kb` commands use it).

    from entgan.lifelong import Jobs

    jobs = Jobs("entgan-jobs")               # the folder holding the database and the jobs' files
    jobs.create("configs/jobs/digits.yaml")  # validated; a bad spec raises JobSpecError
    jobs.run_controller(until_idle=True)     # train -> eval -> deploy as the triggers say
    jobs.status("digits").deployed           # the deployed model version
    jobs.versions("digits")                  # the knowledge base's model versions
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entgan.config import ConfigError
from entgan.lifelong.controller import PROCESS_FILE, Controller, kill_process_group
from entgan.lifelong.spec import JobSpec, load_job_spec
from entgan.lifelong.stages import LOG_FILE, read_json
from entgan.lifelong.states import ACTIVE_STATES
from entgan.lifelong.store import (
    DB_FILE,
    ClassifierRecord,
    DecisionRecord,
    EvaluationRecord,
    JobRecord,
    JobStore,
    StageRunRecord,
    TaskRecord,
    TransitionRecord,
    VersionRecord,
)

JOBS_DIR_VARIABLE = "ENTGAN_JOBS_DIR"


def default_jobs_root() -> Path:
    """Where jobs live unless told otherwise: $ENTGAN_JOBS_DIR, else `./entgan-jobs`."""
    return Path(os.environ.get(JOBS_DIR_VARIABLE, "entgan-jobs"))


@dataclass(frozen=True)
class JobStatus:
    job: JobRecord
    deployed: VersionRecord | None
    attempt: StageRunRecord | None
    """The attempt under way (or left Starting/Running by a controller that stopped)."""
    recent: list[TransitionRecord]


@dataclass(frozen=True)
class VersionReport:
    version: VersionRecord
    evaluations: list[EvaluationRecord]
    decisions: list[DecisionRecord]
    """Decisions about this version, as candidate or as the deployed model it was compared with."""
    classifiers: list[ClassifierRecord]
    """The job's classifiers (those named by the version and its evaluations among them)."""


class Jobs:
    """Jobs and their knowledge base in one jobs folder (database: `<root>/entgan-jobs.sqlite`)."""

    def __init__(
        self,
        root: str | Path | None = None,
        db: str | Path | None = None,
        clock: Callable[[], float] = time.time,
        *,
        must_exist: bool = False,
    ) -> None:
        """`must_exist`: refuse to create the database (for commands that only read it, so that a
        mistyped `--root` is an error rather than a new, empty jobs folder)."""
        self.root = Path(root) if root is not None else default_jobs_root()
        path = Path(db) if db is not None else self.root / DB_FILE
        if must_exist and not path.is_file():
            raise ConfigError(f"{path}: no jobs database here (`entgan job create SPEC` makes one; see --root)")
        self.store = JobStore(path)
        self.clock = clock

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Jobs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------------------------- jobs
    def create(self, spec: str | Path | JobSpec, spec_path: str | Path | None = None) -> JobRecord:
        """Create a job from a spec file (or a spec validated from `spec_path`); it starts in
        train/Waiting."""
        if not isinstance(spec, JobSpec):
            spec_path = spec
            spec = load_job_spec(spec)
        origin = None if spec_path is None else str(Path(spec_path).resolve())
        return self.store.create_job(spec, origin, self._fresh_workdir(spec.name), self.clock())

    def _fresh_workdir(self, name: str) -> Path:
        """`<root>/<name>`, or `<root>/<name>-2`, ... when a folder of that name is already there
        (a deleted job's files are kept, and never reused)."""
        base = self.root.resolve() / name
        candidate, number = base, 1
        while candidate.exists():
            number += 1
            candidate = base.with_name(f"{name}-{number}")
        return candidate

    def jobs(self) -> list[JobRecord]:
        return self.store.jobs()

    def job(self, name: str) -> JobRecord:
        return self.store.job(name)

    def status(self, name: str) -> JobStatus:
        job = self.store.job(name)
        active = self.store.active_runs(name)
        return JobStatus(
            job=job,
            deployed=self.store.deployed_version(name),
            attempt=active[-1] if active else None,
            recent=self.store.transitions(name, limit=5),
        )

    def logs(self, name: str, limit: int | None = None) -> list[TransitionRecord]:
        self.store.job(name)
        return self.store.transitions(name, limit)

    def attempts(self, name: str) -> list[StageRunRecord]:
        self.store.job(name)
        return self.store.runs(name)

    def stage_log(self, name: str) -> tuple[Path, str] | None:
        """The output of the job's latest train or eval attempt, or None if none has run."""
        runs = [run for run in self.attempts(name) if (Path(run.workdir) / LOG_FILE).is_file()]
        if not runs:
            return None
        path = Path(runs[-1].workdir) / LOG_FILE
        return path, path.read_text(errors="replace")

    def delete(self, name: str, force: bool = False) -> None:
        """Remove a job and its records (its files stay on disk). A job with a stage under way is
        only deleted with `force`, which also stops the stage's processes."""
        job = self.store.job(name)
        if job.state in ACTIVE_STATES:
            if not force:
                raise ConfigError(
                    f"job '{name}' is {job.stage.value}/{job.state.value}; pass --force to stop the stage and delete it"
                )
            for run in self.store.active_runs(name):
                process = read_json(Path(run.workdir) / PROCESS_FILE)
                if process is not None:
                    kill_process_group(int(process["pid"]), float(process["started"]))
        self.store.delete_job(name)

    # --------------------------------------------------------------------------- controller
    def controller(self, **options: Any) -> Controller:
        """A controller over this jobs folder (options: see `Controller`)."""
        return Controller(self.store, clock=self.clock, **options)

    def run_controller(
        self, *, until_idle: bool = False, once: bool = False, tick_s: float = 1.0,
        timeout_s: float | None = None, **options: Any,
    ) -> None:
        self.controller(**options).run(until_idle=until_idle, once=once, tick_s=tick_s, timeout_s=timeout_s)

    # ------------------------------------------------------------------------ knowledge base
    def tasks(self, job: str | None = None) -> list[TaskRecord]:
        if job is not None:
            self.store.job(job)
        return self.store.tasks(job)

    def versions(self, job: str | None = None) -> list[VersionRecord]:
        if job is not None:
            self.store.job(job)
        return self.store.versions(job)

    def classifiers(self, job: str | None = None) -> list[ClassifierRecord]:
        """The jobs' domain classifiers (each job's figures are measured with one of its own)."""
        if job is not None:
            self.store.job(job)
        return self.store.classifiers(job)

    def decisions(self, job: str) -> list[DecisionRecord]:
        self.store.job(job)
        return self.store.decisions(job)

    def evaluations(self, job: str, version: int | None = None) -> list[EvaluationRecord]:
        self.store.job(job)
        return self.store.evaluations(job, version)

    def version(self, reference: str, job: str | None = None) -> VersionReport:
        """A model version by reference: `3`, `v3`, `JOB:3` or `JOB:v3` (the job may be omitted
        when there is only one)."""
        job_name, number = self.parse_version(reference, job)
        record = self.store.version(job_name, number)
        decisions = [d for d in self.store.decisions(job_name) if number in (d.candidate, d.deployed)]
        return VersionReport(
            record, self.store.evaluations(job_name, number), decisions, self.store.classifiers(job_name)
        )

    def parse_version(self, reference: str, job: str | None = None) -> tuple[str, int]:
        match = re.fullmatch(r"(?:(?P<job>[A-Za-z0-9_.-]+):)?v?(?P<number>\d+)", reference.strip())
        if match is None:
            raise ConfigError(f"version reference {reference!r}: expected N, vN, JOB:N or JOB:vN")
        name = match.group("job") or job
        if name is None:
            names = [record.name for record in self.store.jobs()]
            if len(names) != 1:
                raise ConfigError(f"version {reference!r}: name the job (--job or JOB:vN); jobs: {names or 'none'}")
            name = names[0]
        self.store.job(name)
        return name, int(match.group("number"))
