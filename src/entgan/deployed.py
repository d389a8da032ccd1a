"""What `entgan generate`, `evaluate` and `serve` read: a run directory or a job's deployed version,
resolved to one checkpoint and loaded as (config, generator, version label).

    model = load_model("runs/demo")            # a run directory: its newest complete checkpoint
    model = load_model("digits", jobs_root=…)  # a lifelong job: the version deployed now
    images = model.sample("digits-5-9", 16, seed=0)

A reference that is an existing directory is a run directory (a job's `deployed/` folder is one
too); anything else is taken as a job name in the jobs database (`--root` / `--db`, default
$ENTGAN_JOBS_DIR or ./entgan-jobs). A job resolves to the version its database marks deployed, and
that version's own checkpoint, which nothing rewrites; a `deployed/` folder resolves through its
`version.json` to the same file. So a version label and the weights it names always belong together.

Completeness: every checkpoint is written by `rundir.atomic_write` (temporary file, fsync, rename),
so a file found under a checkpoint's name is whole; the temporary names never match. Loading goes
through `warmstart.load_checkpoint`, which also checks that the file holds an EntGAN generator
matching its stored config, and raises ConfigError naming the file otherwise.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from entgan.config import ConfigError, RunConfig

if TYPE_CHECKING:
    import torch

    from entgan.lifelong.store import JobStore
    from entgan.models.generator import Generator

VERSION_FILE = "version.json"
"""Written last into a job's `deployed/` folder by `lifelong.controller.publish`."""

_ROUND_FILE = re.compile(r"round-(\d+)\.pt")


@dataclass(frozen=True)
class ResolvedModel:
    """Which checkpoint a reference names now (cheap to compute: no weights are read)."""

    reference: str
    """The run directory or job name as the user gave it."""
    checkpoint: Path
    label: str
    """The model version in words: `JOB v3` for a job's version, `RUN round 40` for a run."""
    run_dir: Path | None = None
    job: str | None = None
    job_version: int | None = None

    def key(self) -> tuple[str, str, int, int]:
        """Changes whenever a different checkpoint becomes current (new version, new round)."""
        stat = self.checkpoint.stat()
        return self.label, str(self.checkpoint), stat.st_mtime_ns, stat.st_size


@dataclass
class LoadedModel:
    """A resolved checkpoint's config and generator (eval mode, CPU), ready to sample."""

    resolved: ResolvedModel
    config: RunConfig
    generator: Generator

    @property
    def label(self) -> str:
        return self.resolved.label

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.config.tasks]

    def task_index(self, task: str) -> int:
        """The task's index in the generator; ConfigError naming the known tasks otherwise."""
        try:
            return self.config.task_index(task)
        except KeyError as error:
            raise ConfigError(f"{self.label}: {error.args[0]}") from None

    def sample(self, task: str, n: int, seed: int | None = None) -> torch.Tensor:
        """`n` images (N, C, H, W) in [-1, 1] of `task`: the first `n` that `entgan generate` writes
        for the same seed (a fresh random seed when None)."""
        import secrets

        from entgan.export import generate_batch

        return generate_batch(self, task, secrets.randbits(31) if seed is None else seed, 0, n)


# ------------------------------------------------------------------------------------ resolution
def resolve(
    reference: str | Path,
    *,
    jobs_root: str | Path | None = None,
    db: str | Path | None = None,
    store: JobStore | None = None,
) -> ResolvedModel:
    """The checkpoint `reference` names now: a run directory's newest complete checkpoint, or a
    job's deployed version (see the module doc). Raises ConfigError saying what is missing."""
    path = Path(reference)
    if path.is_dir():
        return resolve_run_dir(path, str(reference))
    if path.exists():
        raise ConfigError(f"{reference}: is a file; expected a run directory or a job name")
    if store is not None:
        return resolve_job(store, str(reference))
    from entgan.lifelong.api import Jobs, default_jobs_root

    root = Path(jobs_root) if jobs_root is not None else default_jobs_root()
    database = Path(db) if db is not None else None
    if not _looks_like_job_name(str(reference)) or not (database or root / _db_file()).is_file():
        raise ConfigError(
            f"{reference}: no such run directory, and no jobs database at {database or root / _db_file()} "
            f"to look it up as a job (see --root/--db)"
        )
    with Jobs(root, database, must_exist=True) as jobs:
        return resolve_job(jobs.store, str(reference))


def _db_file() -> str:
    from entgan.lifelong.store import DB_FILE

    return DB_FILE


def _looks_like_job_name(text: str) -> bool:
    from entgan.lifelong.spec import NAME_PATTERN

    return re.fullmatch(NAME_PATTERN, text) is not None


def resolve_job(store: JobStore, name: str) -> ResolvedModel:
    """The version of job `name` that its database marks deployed."""
    store.job(name)  # UnknownJob (a ConfigError) names the jobs there are
    version = store.deployed_version(name)
    if version is None:
        raise ConfigError(f"job '{name}' has no deployed version yet (`entgan job status {name}` says where it is)")
    checkpoint = Path(version.checkpoint)
    if not checkpoint.is_file():
        raise ConfigError(f"job '{name}' v{version.version}: its checkpoint {checkpoint} is missing")
    return ResolvedModel(
        reference=name,
        checkpoint=checkpoint,
        label=f"{name} v{version.version}",
        run_dir=Path(version.run_dir),
        job=name,
        job_version=version.version,
    )


def resolve_run_dir(run_dir: Path, reference: str | None = None) -> ResolvedModel:
    """A run directory's newest complete server checkpoint (a job's `deployed/` folder: the
    checkpoint its `version.json` names)."""
    from entgan.rundir import CONFIG_FILE, RunDirectory

    reference = reference or str(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir}: not an EntGAN run directory (no {CONFIG_FILE})")
    published = _read_version_file(run_dir)
    if published is not None:
        origin = Path(published["checkpoint"])
        checkpoint = origin if origin.is_file() else run_dir / "checkpoints" / "latest.pt"
        if not checkpoint.is_file():
            raise ConfigError(f"{run_dir}: no checkpoint yet ({checkpoint} is missing)")
        return ResolvedModel(
            reference=reference,
            checkpoint=checkpoint,
            label=f"{published['job']} v{published['version']}",
            run_dir=run_dir,
            job=published["job"],
            job_version=int(published["version"]),
        )
    try:
        checkpoint = RunDirectory(run_dir).latest_checkpoint()
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None
    match = _ROUND_FILE.fullmatch(checkpoint.name)
    label = f"{run_dir.name} round {int(match[1])}" if match else f"{run_dir.name} {checkpoint.name}"
    return ResolvedModel(reference=reference, checkpoint=checkpoint, label=label, run_dir=run_dir)


def _read_version_file(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / VERSION_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: unreadable ({error})") from None
    if not isinstance(data, dict) or not {"job", "version", "checkpoint"} <= set(data):
        raise ConfigError(f"{path}: expected the keys job, version and checkpoint")
    return data


# --------------------------------------------------------------------------------------- loading
def load_resolved(resolved: ResolvedModel) -> LoadedModel:
    """Read the checkpoint's config and generator (ConfigError naming the file if it is not a
    whole EntGAN checkpoint)."""
    from entgan.algorithms.entgan.warmstart import load_checkpoint

    checkpoint = load_checkpoint(resolved.checkpoint)
    checkpoint.generator.eval().requires_grad_(False)
    return LoadedModel(resolved=resolved, config=checkpoint.config, generator=checkpoint.generator)


def load_model(
    reference: str | Path, *, jobs_root: str | Path | None = None, db: str | Path | None = None
) -> LoadedModel:
    """Resolve `reference` (run directory or job name) and load its generator."""
    return load_resolved(resolve(reference, jobs_root=jobs_root, db=db))
