"""The jobs database: one embedded SQLite file (no server to start), written in transactions.

What it holds, per job:
- the job (its resolved spec, current stage and state, cycle number, last trigger check);
- `transitions`: every state change with its reason and message (the job's log);
- `stage_runs`: every attempt at a stage (its directory, its process), so a restarted controller
  knows what was under way; a partial unique index lets at most one attempt per (cycle, stage)
  be `completed`, so "completed exactly once" is enforced by the database itself;
- the knowledge base: `tasks` (name, data fingerprint, sample count, first seen), `versions`
  (checkpoint, parent, tasks, outcome, deployed flag), `evaluations` (per-task figures of every
  model measured) and `decisions` (each deploy / reject verdict with its figures);
  `classifiers`: the job's domain classifiers (one per set of tasks and classes, a file in the
  job's knowledge-base folder with its sha256), so that every figure names the classifier it was
  measured with and the figures of a job's versions are on one scale;
- back-off: failures in a row and the time before which the trigger is not checked again.

Schema versions (`PRAGMA user_version`): 1, the first; 2 adds `classifiers`, the classifier of
every version and figure, the back-off columns, and lets the `measure` stage complete more than
once per cycle. A database of an older schema is migrated when it is opened, in one transaction,
after a copy of it is written next to it (`<file>.schema-<n>.bak`); rows from before have no
classifier (shown as unknown).

Crash safety: a stage's completion, its outputs' records and the move to the next stage are written
in one `BEGIN IMMEDIATE ... COMMIT`; WAL journaling with `synchronous=FULL` makes a commit durable
when it returns, and a process killed mid-transaction leaves no trace of it.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entgan.config import ConfigError
from entgan.lifelong.spec import JobSpec, spec_from_json
from entgan.lifelong.states import InvalidTransition, Reason, Stage, State, check_transition

DB_FILE = "entgan-jobs.sqlite"
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    name         TEXT PRIMARY KEY,
    spec         TEXT NOT NULL,
    spec_path    TEXT,
    workdir      TEXT NOT NULL,
    created_at   REAL NOT NULL,
    stage        TEXT NOT NULL,
    state        TEXT NOT NULL,
    state_since  REAL NOT NULL,
    cycle        INTEGER NOT NULL DEFAULT 0,
    last_check_at REAL,
    last_check   TEXT,
    failures     INTEGER NOT NULL DEFAULT 0,
    retry_at     REAL
);
CREATE TABLE IF NOT EXISTS transitions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job         TEXT NOT NULL REFERENCES jobs(name) ON DELETE CASCADE,
    at          REAL NOT NULL,
    cycle       INTEGER NOT NULL,
    from_stage  TEXT,
    from_state  TEXT,
    stage       TEXT NOT NULL,
    state       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    message     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS stage_runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job         TEXT NOT NULL REFERENCES jobs(name) ON DELETE CASCADE,
    cycle       INTEGER NOT NULL,
    stage       TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('starting', 'running', 'completed', 'failed', 'interrupted')),
    workdir     TEXT NOT NULL,
    pid         INTEGER,
    process_started REAL,
    started_at  REAL NOT NULL,
    finished_at REAL,
    UNIQUE (job, cycle, stage, attempt)
);
CREATE UNIQUE INDEX IF NOT EXISTS stage_completed_once ON stage_runs (job, cycle, stage)
    WHERE status = 'completed' AND stage != 'measure';
CREATE TABLE IF NOT EXISTS tasks (
    job          TEXT NOT NULL REFERENCES jobs(name) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    first_seen   REAL NOT NULL,
    samples      INTEGER,
    fingerprint  TEXT,
    last_version INTEGER,
    trained_at   REAL,
    PRIMARY KEY (job, name)
);
CREATE TABLE IF NOT EXISTS versions (
    job         TEXT NOT NULL REFERENCES jobs(name) ON DELETE CASCADE,
    version     INTEGER NOT NULL,
    cycle       INTEGER NOT NULL,
    parent      INTEGER,
    checkpoint  TEXT NOT NULL,
    run_dir     TEXT NOT NULL,
    tasks       TEXT NOT NULL,
    data        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    outcome     TEXT NOT NULL CHECK (outcome IN ('candidate', 'deployed', 'rejected', 'eval-failed', 'deploy-failed')),
    deployed    INTEGER NOT NULL DEFAULT 0,
    deployed_at REAL,
    classifier  INTEGER,
    PRIMARY KEY (job, version)
);
CREATE UNIQUE INDEX IF NOT EXISTS one_deployed_version ON versions (job) WHERE deployed = 1;
CREATE TABLE IF NOT EXISTS evaluations (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    job       TEXT NOT NULL REFERENCES jobs(name) ON DELETE CASCADE,
    cycle     INTEGER NOT NULL,
    version   INTEGER NOT NULL,
    role      TEXT NOT NULL CHECK (role IN ('candidate', 'deployed')),
    task      TEXT NOT NULL,
    fid       REAL,
    fidelity  REAL,
    at        REAL NOT NULL,
    classifier INTEGER
);
CREATE TABLE IF NOT EXISTS decisions (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    job        TEXT NOT NULL REFERENCES jobs(name) ON DELETE CASCADE,
    cycle      INTEGER NOT NULL,
    candidate  INTEGER NOT NULL,
    deployed   INTEGER,
    deploy     INTEGER NOT NULL,
    rule       TEXT NOT NULL,
    message    TEXT NOT NULL,
    figures    TEXT NOT NULL,
    at         REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS classifiers (
    job        TEXT NOT NULL REFERENCES jobs(name) ON DELETE CASCADE,
    version    INTEGER NOT NULL,
    key        TEXT NOT NULL,
    classes    TEXT NOT NULL,
    file       TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    cycle      INTEGER NOT NULL,
    stage      TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (job, version),
    UNIQUE (job, key)
);
"""

_MIGRATIONS: dict[int, str] = {
    1: """
ALTER TABLE jobs ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN retry_at REAL;
ALTER TABLE versions ADD COLUMN classifier INTEGER;
ALTER TABLE evaluations ADD COLUMN classifier INTEGER;
DROP INDEX stage_completed_once;
CREATE UNIQUE INDEX stage_completed_once ON stage_runs (job, cycle, stage)
    WHERE status = 'completed' AND stage != 'measure';
CREATE TABLE classifiers (
    job        TEXT NOT NULL REFERENCES jobs(name) ON DELETE CASCADE,
    version    INTEGER NOT NULL,
    key        TEXT NOT NULL,
    classes    TEXT NOT NULL,
    file       TEXT NOT NULL,
    sha256     TEXT NOT NULL,
    cycle      INTEGER NOT NULL,
    stage      TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (job, version),
    UNIQUE (job, key)
);
""",
}
"""The statements that take a database from schema `n` to `n + 1`."""


class UnknownJob(ConfigError):
    """No job of that name in the database."""


class StaleState(InvalidTransition):
    """The job is no longer in the state the caller expected (changed or deleted meanwhile)."""


# ------------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class JobRecord:
    name: str
    spec: JobSpec
    spec_path: str | None
    workdir: Path
    """The job's own folder: one sub-folder per cycle, one per stage attempt, and `deployed/`."""
    created_at: float
    stage: Stage
    state: State
    state_since: float
    cycle: int
    last_check_at: float | None
    last_check: dict[str, Any] | None
    failures: int = 0
    """Stages failed in a row (reset when a cycle or a measurement ends without failure)."""
    retry_at: float | None = None
    """After a failure: the trigger is not checked (no stage starts) before this time."""

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> JobRecord:
        return cls(
            name=row["name"],
            spec=spec_from_json(row["spec"]),
            spec_path=row["spec_path"],
            workdir=Path(row["workdir"]),
            created_at=row["created_at"],
            stage=Stage(row["stage"]),
            state=State(row["state"]),
            state_since=row["state_since"],
            cycle=row["cycle"],
            last_check_at=row["last_check_at"],
            last_check=json.loads(row["last_check"]) if row["last_check"] else None,
            failures=row["failures"],
            retry_at=row["retry_at"],
        )


@dataclass(frozen=True)
class TransitionRecord:
    id: int
    job: str
    at: float
    cycle: int
    from_stage: str | None
    from_state: str | None
    stage: str
    state: str
    reason: str
    message: str


@dataclass(frozen=True)
class StageRunRecord:
    id: int
    job: str
    cycle: int
    stage: Stage
    attempt: int
    status: str
    workdir: str
    pid: int | None
    process_started: float | None
    started_at: float
    finished_at: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> StageRunRecord:
        values = dict(row)
        values["stage"] = Stage(values["stage"])
        return cls(**values)


@dataclass(frozen=True)
class TaskRecord:
    job: str
    name: str
    first_seen: float
    samples: int | None
    """Samples the task had when it was last trained (None: never trained)."""
    fingerprint: str | None
    last_version: int | None
    trained_at: float | None


@dataclass(frozen=True)
class VersionRecord:
    job: str
    version: int
    cycle: int
    parent: int | None
    checkpoint: str
    run_dir: str
    tasks: list[dict[str, Any]]
    data: dict[str, Any]
    created_at: float
    outcome: str
    deployed: bool
    deployed_at: float | None
    classifier: int | None = None
    """The job's classifier its train stage measured with (None: before schema 2)."""

    @property
    def task_names(self) -> list[str]:
        return [task["name"] for task in self.tasks]

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> VersionRecord:
        values = dict(row)
        values["tasks"] = json.loads(values["tasks"])
        values["data"] = json.loads(values["data"])
        values["deployed"] = bool(values["deployed"])
        return cls(**values)


@dataclass(frozen=True)
class EvaluationRecord:
    id: int
    job: str
    cycle: int
    version: int
    role: str
    task: str
    fid: float | None
    fidelity: float | None
    at: float
    classifier: int | None = None
    """The job's classifier (version) the figures were measured with (None: before schema 2)."""


@dataclass(frozen=True)
class ClassifierRecord:
    """One of a job's domain classifiers: trained once for a set of tasks and classes."""

    job: str
    version: int
    key: str
    """Identifies the tasks and their classes, in label order (see `stages.label_space`)."""
    classes: list[dict[str, Any]]
    """[{"task": .., "classes": [..], "labels": [..]}] in label order."""
    file: str
    sha256: str
    cycle: int
    stage: str
    """The stage that trained it (`train`, or `measure` for a re-measurement on new classes)."""
    created_at: float

    @property
    def identity(self) -> str:
        return f"c{self.version} ({self.sha256[:12]})"

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ClassifierRecord:
        values = dict(row)
        values["classes"] = json.loads(values["classes"])
        return cls(**values)


@dataclass(frozen=True)
class DecisionRecord:
    id: int
    job: str
    cycle: int
    candidate: int
    deployed: int | None
    deploy: bool
    rule: str
    message: str
    figures: dict[str, Any]
    at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> DecisionRecord:
        values = dict(row)
        values["deploy"] = bool(values["deploy"])
        values["figures"] = json.loads(values["figures"])
        return cls(**values)


# ------------------------------------------------------------------------------------------- store
class JobStore:
    """Access to the jobs database. Reads run outside transactions (WAL readers never block the
    writer); every write goes through `transaction()`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as error:
            raise ConfigError(f"{self.path}: not a usable jobs database ({error})") from None

    def _migrate(self) -> None:
        """Create the schema in a new database, or bring an older one up to `SCHEMA_VERSION`."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"{self.path}: written by a newer EntGAN (schema {version}, this one knows {SCHEMA_VERSION})"
            )
        if version == SCHEMA_VERSION:
            return
        backup = None
        if version > 0:
            backup = self.path.with_name(f"{self.path.name}.schema-{version}.bak")
            if not backup.exists():  # written whole under another name first: a copy is complete or absent
                partial = backup.with_name(backup.name + ".partial")
                partial.unlink(missing_ok=True)
                copy = sqlite3.connect(partial)
                try:
                    self._db.backup(copy)
                finally:
                    copy.close()
                os.replace(partial, backup)
        try:
            with self.transaction() as db:
                found = db.execute("PRAGMA user_version").fetchone()[0]  # another process may have done it
                if found == 0:
                    for statement in _statements(_SCHEMA):
                        db.execute(statement)
                else:
                    for step in range(found, SCHEMA_VERSION):
                        for statement in _statements(_MIGRATIONS[step]):
                            db.execute(statement)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as error:
            raise ConfigError(
                f"{self.path}: could not migrate the jobs database from schema {version} to {SCHEMA_VERSION} "
                f"({error}); it is left as it was (a copy is at {backup}); run an EntGAN that knows schema "
                f"{version}, or report this with the file"
            ) from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: everything inside commits together or not at all."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _one(self, sql: str, *args: Any) -> sqlite3.Row | None:
        return self._db.execute(sql, args).fetchone()

    def _all(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        return self._db.execute(sql, args).fetchall()

    # ---------------------------------------------------------------------------------- jobs
    def create_job(self, spec: JobSpec, spec_path: str | None, workdir: Path, now: float) -> JobRecord:
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM jobs WHERE name = ?", (spec.name,)).fetchone():
                raise ConfigError(f"a job named '{spec.name}' already exists (delete it first)")
            db.execute(
                "INSERT INTO jobs (name, spec, spec_path, workdir, created_at, stage, state, state_since)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (spec.name, spec.model_dump_json(), spec_path, str(workdir), now,
                 Stage.TRAIN.value, State.WAITING.value, now),
            )
            self._log(db, spec.name, now, 0, None, None, Stage.TRAIN, State.WAITING, Reason.JOB_CREATED,
                      f"job created from {spec_path or 'a spec'}; the train stage waits for its trigger")
        return self.job(spec.name)

    def job(self, name: str) -> JobRecord:
        row = self._one("SELECT * FROM jobs WHERE name = ?", name)
        if row is None:
            known = [r["name"] for r in self._all("SELECT name FROM jobs ORDER BY name")]
            raise UnknownJob(f"no job named '{name}' (jobs: {', '.join(known) or 'none'})")
        return JobRecord.from_row(row)

    def jobs(self) -> list[JobRecord]:
        return [JobRecord.from_row(row) for row in self._all("SELECT * FROM jobs ORDER BY name")]

    def delete_job(self, name: str) -> None:
        self.job(name)  # raises UnknownJob
        with self.transaction() as db:
            db.execute("DELETE FROM jobs WHERE name = ?", (name,))

    def record_check(self, db: sqlite3.Connection, name: str, at: float, explanation: dict[str, Any]) -> None:
        """Store when the job's trigger was last evaluated and what it found."""
        db.execute(
            "UPDATE jobs SET last_check_at = ?, last_check = ? WHERE name = ?",
            (at, json.dumps(explanation), name),
        )

    def record_failure(self, db: sqlite3.Connection, name: str, failures: int, retry_at: float) -> None:
        """Store the job's failures in a row and when it may try again (the back-off)."""
        db.execute("UPDATE jobs SET failures = ?, retry_at = ? WHERE name = ?", (failures, retry_at, name))

    def clear_failures(self, db: sqlite3.Connection, name: str) -> None:
        """A cycle (or measurement) ended without failure: no more back-off."""
        db.execute("UPDATE jobs SET failures = 0, retry_at = NULL WHERE name = ?", (name,))

    def transition(
        self,
        db: sqlite3.Connection,
        job: JobRecord,
        stage: Stage,
        state: State,
        reason: str,
        message: str,
        now: float,
        *,
        new_cycle: bool = False,
    ) -> JobRecord:
        """Move `job` (as the caller last saw it) to (stage, state), inside transaction `db`.

        Raises StaleState if the job changed meanwhile and InvalidTransition if the state machine
        forbids the move, so the enclosing transaction rolls back with everything else in it.
        """
        row = db.execute("SELECT stage, state, cycle FROM jobs WHERE name = ?", (job.name,)).fetchone()
        if row is None:
            raise StaleState(f"job '{job.name}' was deleted")
        current = (Stage(row["stage"]), State(row["state"]))
        if current != (job.stage, job.state) or row["cycle"] != job.cycle:
            found, expected = "/".join(s.value for s in current), f"{job.stage.value}/{job.state.value}"
            raise StaleState(f"job '{job.name}' is {found}, expected {expected}")
        check_transition(job.stage, job.state, stage, state)
        cycle = job.cycle + 1 if new_cycle else job.cycle
        db.execute(
            "UPDATE jobs SET stage = ?, state = ?, state_since = ?, cycle = ? WHERE name = ?",
            (stage.value, state.value, now, cycle, job.name),
        )
        self._log(db, job.name, now, cycle, job.stage, job.state, stage, state, reason, message)
        return JobRecord(**{**job.__dict__, "stage": stage, "state": state, "state_since": now, "cycle": cycle})

    @staticmethod
    def _log(
        db: sqlite3.Connection,
        job: str,
        at: float,
        cycle: int,
        from_stage: Stage | None,
        from_state: State | None,
        stage: Stage,
        state: State,
        reason: str,
        message: str,
    ) -> None:
        db.execute(
            "INSERT INTO transitions (job, at, cycle, from_stage, from_state, stage, state, reason, message)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job, at, cycle, from_stage and from_stage.value, from_state and from_state.value,
             stage.value, state.value, reason, message),
        )

    def transitions(self, name: str, limit: int | None = None) -> list[TransitionRecord]:
        """The job's log, oldest first (the last `limit` entries when given)."""
        rows = self._all(
            "SELECT * FROM (SELECT * FROM transitions WHERE job = ? ORDER BY id DESC LIMIT ?) ORDER BY id",
            name, -1 if limit is None else limit,
        )
        return [TransitionRecord(**dict(row)) for row in rows]

    # ---------------------------------------------------------------------------- stage runs
    def start_run(
        self, db: sqlite3.Connection, job: JobRecord, stage: Stage, workdir_for: Any, now: float
    ) -> StageRunRecord:
        """A new attempt at `stage` of the job's current cycle; `workdir_for(attempt)` names its folder."""
        attempt = db.execute(
            "SELECT COALESCE(MAX(attempt), 0) + 1 FROM stage_runs WHERE job = ? AND cycle = ? AND stage = ?",
            (job.name, job.cycle, stage.value),
        ).fetchone()[0]
        cursor = db.execute(
            "INSERT INTO stage_runs (job, cycle, stage, attempt, status, workdir, started_at)"
            " VALUES (?, ?, ?, ?, 'starting', ?, ?)",
            (job.name, job.cycle, stage.value, attempt, str(workdir_for(attempt)), now),
        )
        return self._run(db, cursor.lastrowid)

    @staticmethod
    def _run(db: sqlite3.Connection, run_id: int | None) -> StageRunRecord:
        return StageRunRecord.from_row(db.execute("SELECT * FROM stage_runs WHERE id = ?", (run_id,)).fetchone())

    def set_run_process(self, db: sqlite3.Connection, run_id: int, pid: int, process_started: float) -> None:
        db.execute(
            "UPDATE stage_runs SET status = 'running', pid = ?, process_started = ? WHERE id = ?",
            (pid, process_started, run_id),
        )

    def finish_run(self, db: sqlite3.Connection, run_id: int, status: str, now: float) -> None:
        db.execute("UPDATE stage_runs SET status = ?, finished_at = ? WHERE id = ?", (status, now, run_id))

    def active_runs(self, name: str | None = None) -> list[StageRunRecord]:
        """Attempts still marked starting/running (after a crash: the ones that were interrupted)."""
        sql = "SELECT * FROM stage_runs WHERE status IN ('starting', 'running')"
        rows = self._all(sql + " AND job = ? ORDER BY id", name) if name else self._all(sql + " ORDER BY id")
        return [StageRunRecord.from_row(row) for row in rows]

    def runs(self, name: str) -> list[StageRunRecord]:
        rows = self._all("SELECT * FROM stage_runs WHERE job = ? ORDER BY id", name)
        return [StageRunRecord.from_row(row) for row in rows]

    # ---------------------------------------------------------------------- knowledge base
    def note_tasks(self, name: str, task_names: list[str], now: float) -> None:
        """Record the first sighting of tasks (known ones keep their first-seen time)."""
        known = {task.name for task in self.tasks(name)}
        unseen = [task for task in task_names if task not in known]
        if unseen:
            with self.transaction() as db:
                db.executemany(
                    "INSERT OR IGNORE INTO tasks (job, name, first_seen) VALUES (?, ?, ?)",
                    [(name, task, now) for task in unseen],
                )

    def tasks(self, name: str | None = None) -> list[TaskRecord]:
        if name is None:
            rows = self._all("SELECT * FROM tasks ORDER BY job, first_seen, name")
        else:
            rows = self._all("SELECT * FROM tasks WHERE job = ? ORDER BY first_seen, name", name)
        return [TaskRecord(**dict(row)) for row in rows]

    def add_version(
        self,
        db: sqlite3.Connection,
        job: JobRecord,
        parent: int | None,
        checkpoint: str,
        run_dir: str,
        tasks: list[dict[str, Any]],
        data: dict[str, Any],
        now: float,
        classifier: int | None = None,
    ) -> int:
        """Record a trained candidate, what it was trained on (tasks' counts and fingerprints) and
        the job's classifier its run measured with."""
        version = db.execute(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM versions WHERE job = ?", (job.name,)
        ).fetchone()[0]
        db.execute(
            "INSERT INTO versions (job, version, cycle, parent, checkpoint, run_dir, tasks, data, created_at, outcome,"
            " classifier) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'candidate', ?)",
            (job.name, version, job.cycle, parent, checkpoint, run_dir, json.dumps(tasks), json.dumps(data), now,
             classifier),
        )
        for task in tasks:
            db.execute(
                "INSERT INTO tasks (job, name, first_seen, samples, fingerprint, last_version, trained_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job, name) DO UPDATE SET samples = excluded.samples,"
                " fingerprint = excluded.fingerprint, last_version = excluded.last_version,"
                " trained_at = excluded.trained_at",
                (job.name, task["name"], now, task["samples"], task["fingerprint"], version, now),
            )
        return version

    def versions(self, name: str | None = None) -> list[VersionRecord]:
        if name is None:
            rows = self._all("SELECT * FROM versions ORDER BY job, version")
        else:
            rows = self._all("SELECT * FROM versions WHERE job = ? ORDER BY version", name)
        return [VersionRecord.from_row(row) for row in rows]

    def version(self, name: str, version: int) -> VersionRecord:
        row = self._one("SELECT * FROM versions WHERE job = ? AND version = ?", name, version)
        if row is None:
            raise ConfigError(f"job '{name}' has no model version {version}")
        return VersionRecord.from_row(row)

    def deployed_version(self, name: str) -> VersionRecord | None:
        row = self._one("SELECT * FROM versions WHERE job = ? AND deployed = 1", name)
        return None if row is None else VersionRecord.from_row(row)

    def set_outcome(self, db: sqlite3.Connection, name: str, version: int, outcome: str) -> None:
        db.execute("UPDATE versions SET outcome = ? WHERE job = ? AND version = ?", (outcome, name, version))

    def mark_deployed(self, db: sqlite3.Connection, name: str, version: int, now: float) -> None:
        """`version` becomes the one deployed version of the job (the previous one keeps its outcome)."""
        db.execute("UPDATE versions SET deployed = 0 WHERE job = ? AND deployed = 1", (name,))
        db.execute(
            "UPDATE versions SET deployed = 1, deployed_at = ?, outcome = 'deployed' WHERE job = ? AND version = ?",
            (now, name, version),
        )

    def add_evaluation(
        self, db: sqlite3.Connection, job: JobRecord, version: int, role: str,
        figures: dict[str, dict[str, float]], now: float, classifier: int | None = None,
    ) -> None:
        """Per-task figures of `version`, measured with the job's classifier `classifier`."""
        db.executemany(
            "INSERT INTO evaluations (job, cycle, version, role, task, fid, fidelity, at, classifier)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(job.name, job.cycle, version, role, task, values.get("fid"), values.get("fidelity"), now, classifier)
             for task, values in figures.items()],
        )

    def evaluations(self, name: str, version: int | None = None) -> list[EvaluationRecord]:
        if version is None:
            rows = self._all("SELECT * FROM evaluations WHERE job = ? ORDER BY id", name)
        else:
            rows = self._all("SELECT * FROM evaluations WHERE job = ? AND version = ? ORDER BY id", name, version)
        return [EvaluationRecord(**dict(row)) for row in rows]

    def latest_evaluations(self, name: str, version: int) -> dict[str, EvaluationRecord]:
        """The most recent evaluation of each task of `version` (whatever the role)."""
        return {record.task: record for record in self.evaluations(name, version)}  # oldest first

    def latest_figures(self, name: str, version: int) -> dict[str, dict[str, float | None]]:
        """The most recent figures measured for each task of `version` (whatever the role)."""
        return {
            task: {"fid": record.fid, "fidelity": record.fidelity}
            for task, record in self.latest_evaluations(name, version).items()
        }

    # ---------------------------------------------------------------------------- classifiers
    def add_classifier(
        self, db: sqlite3.Connection, job: JobRecord, key: str, classes: list[dict[str, Any]],
        file: str, sha256: str, stage: Stage, now: float,
    ) -> int:
        """Register the job's classifier for the label space `key` (idempotent for the same file);
        returns its version. A different file for a known key is refused: the job's figures would
        no longer be on one scale."""
        row = db.execute("SELECT version, sha256, file FROM classifiers WHERE job = ? AND key = ?",
                         (job.name, key)).fetchone()
        if row is not None:
            if row["sha256"] != sha256:
                raise ConfigError(
                    f"job '{job.name}': a second classifier ({file}, sha256 {sha256[:12]}) for the tasks and "
                    f"classes of classifier c{row['version']} ({row['file']}, sha256 {row['sha256'][:12]})"
                )
            return int(row["version"])
        version = db.execute(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM classifiers WHERE job = ?", (job.name,)
        ).fetchone()[0]
        db.execute(
            "INSERT INTO classifiers (job, version, key, classes, file, sha256, cycle, stage, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job.name, version, key, json.dumps(classes), file, sha256, job.cycle, stage.value, now),
        )
        return int(version)

    def classifiers(self, name: str | None = None) -> list[ClassifierRecord]:
        if name is None:
            rows = self._all("SELECT * FROM classifiers ORDER BY job, version")
        else:
            rows = self._all("SELECT * FROM classifiers WHERE job = ? ORDER BY version", name)
        return [ClassifierRecord.from_row(row) for row in rows]

    def classifier(self, name: str, version: int) -> ClassifierRecord:
        row = self._one("SELECT * FROM classifiers WHERE job = ? AND version = ?", name, version)
        if row is None:
            raise ConfigError(f"job '{name}' has no classifier c{version}")
        return ClassifierRecord.from_row(row)

    def add_decision(
        self, db: sqlite3.Connection, job: JobRecord, candidate: int, deployed: int | None,
        deploy: bool, rule: str, message: str, figures: dict[str, Any], now: float,
    ) -> None:
        db.execute(
            "INSERT INTO decisions (job, cycle, candidate, deployed, deploy, rule, message, figures, at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (job.name, job.cycle, candidate, deployed, int(deploy), rule, message, json.dumps(figures), now),
        )

    def decisions(self, name: str) -> list[DecisionRecord]:
        rows = self._all("SELECT * FROM decisions WHERE job = ? ORDER BY id", name)
        return [DecisionRecord.from_row(row) for row in rows]


def _statements(script: str) -> list[str]:
    """The schema's statements one by one (`executescript` would commit our transaction)."""
    return [statement.strip() for statement in script.split(";") if statement.strip()]
