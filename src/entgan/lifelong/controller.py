"""The job controller: a loop that moves every job through its stages, one small step per tick.

Each tick, for each job, according to its recorded (stage, state):

- train/Waiting: if the job's check period has passed (and, after failed stages, its back-off),
  look at the edge locations and the knowledge base and evaluate the trigger; store the verdict; if
  it fired, a new cycle starts (-> Ready). When a metric condition would read deployed figures
  older than its `max_age_s` and they could change the verdict, the deployed model is measured
  again first (-> measure/Waiting), and the trigger decides when that measurement is recorded;
- eval/Waiting, deploy/Waiting, measure/Waiting: -> Ready (these follow the previous stage);
- Ready: start an attempt (-> Starting), in a fresh folder; train, eval and measure run in a stage
  process of their own (-> Running); deploy is a file copy done here;
- Running: poll the stage process; when it ends, record its outputs and the stage's completion
  (or failure, with the reason and the end of its log) in one transaction, and hand over to the
  next stage's Waiting. A failure sends the job back to train/Waiting with a back-off: after `n`
  failures in a row the trigger is not checked again before `check_period_s * 2**n` (capped at
  `trigger.max_retry_delay_s`); the count and the time are in the database, so they survive a
  restart, and a cycle (or measurement) that ends without failure clears them.

Every stage measures with the job's own domain classifier (see `stages`); the controller passes the
job's classifiers to each attempt, registers a new one when an attempt trained it, and records
with every figure which classifier it was measured with.

The database is the only state: a controller that starts first looks for attempts a previous
controller left Starting or Running, stops what may be left of their processes, and either adopts a
finished result (the stage process wrote `result.json` before the controller died) or sends the
stage back to Ready so it starts again, from its start, in a new folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from entgan.config import ConfigError
from entgan.data.errors import DataError
from entgan.lifelong.decision import decide
from entgan.lifelong.edge import count_samples, edge_tasks, ignored_folders
from entgan.lifelong.spec import NAME_PATTERN
from entgan.lifelong.stages import (
    ERROR_FILE,
    KB_DIR,
    LOG_FILE,
    REQUEST_FILE,
    RESULT_FILE,
    CandidateRef,
    ClassifierRef,
    EvalRequest,
    MeasureRequest,
    ModelRef,
    StageRequest,
    TrainRequest,
    read_json,
    write_json,
)
from entgan.lifelong.states import ACTIVE_STATES, Reason, Stage, State
from entgan.lifelong.store import JobRecord, JobStore, StageRunRecord, StaleState, VersionRecord
from entgan.lifelong.triggers import (
    Observation,
    Verdict,
    check_due,
    evaluate_trigger,
    remeasure_reason,
    retry_delay,
)

PROCESS_FILE = "process.json"
DEPLOYED_DIR = "deployed"
_LOG_TAIL_LINES = 15


# ------------------------------------------------------------------------------------ processes
class StageProcess(Protocol):
    """A running attempt: started by a `StageLauncher`, polled by the controller."""

    pid: int
    started: float

    def poll(self) -> int | None:
        """The exit status, or None while it runs."""

    def kill(self) -> None:
        """Stop it and everything it started."""


class StageLauncher(Protocol):
    def start(self, workdir: Path) -> StageProcess:
        """Start the stage process for the attempt prepared in `workdir`."""


class SubprocessStage:
    def __init__(self, process: subprocess.Popen[bytes], started: float) -> None:
        self.process = process
        self.pid = process.pid
        self.started = started

    def poll(self) -> int | None:
        return self.process.poll()

    def kill(self) -> None:
        kill_process_group(self.pid, self.started)
        self.process.wait()


class SubprocessLauncher:
    """Runs `python -m entgan.lifelong.stage_process WORKDIR` in a session of its own."""

    def __init__(self, python: str = sys.executable, environment: dict[str, str] | None = None) -> None:
        self.python = python
        self.environment = environment

    def start(self, workdir: Path) -> SubprocessStage:
        import psutil

        with open(workdir / LOG_FILE, "ab") as log:
            process = subprocess.Popen(
                [self.python, "-m", "entgan.lifelong.stage_process", str(workdir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                env=self.environment,
                start_new_session=True,  # its own process group: the attempt and its engine ranks
            )
        try:
            started = psutil.Process(process.pid).create_time()
        except psutil.Error:
            started = time.time()
        return SubprocessStage(process, started)


def kill_process_group(group: int, not_before: float) -> bool:
    """SIGKILL process group `group` if it is still the one an attempt started at `not_before`.

    A group id can be reused by the system once all its processes are gone, so the group is only
    killed when every process in it was created after the attempt started. Returns whether
    anything was killed.
    """
    import psutil

    members = []
    for process in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getpgid(process.pid) == group:
                members.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    if not members or any(member.info["create_time"] < not_before - 1.0 for member in members):
        return False
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    psutil.wait_procs(members, timeout=10)
    return True


@dataclass
class _Attempt:
    run: StageRunRecord
    process: StageProcess


# ----------------------------------------------------------------------------------- controller
class Controller:
    def __init__(
        self,
        store: JobStore,
        *,
        launcher: StageLauncher | None = None,
        clock: Callable[[], float] = time.time,
        max_concurrent: int = 1,
        cache_dir: Path | None = None,
    ) -> None:
        """`max_concurrent`: train / eval attempts running at once (they compete for the same CPUs).
        `cache_dir`: where stage processes cache domain classifiers (default: ENTGAN_CACHE_DIR)."""
        self.store = store
        self.launcher = launcher or SubprocessLauncher()
        self.clock = clock
        self.max_concurrent = max_concurrent
        self.cache_dir = cache_dir
        self._attempts: dict[str, _Attempt] = {}
        self._looking_since = clock()

    # ------------------------------------------------------------------------------- the loop
    def run(
        self,
        *,
        until_idle: bool = False,
        once: bool = False,
        tick_s: float = 1.0,
        timeout_s: float | None = None,
    ) -> None:
        """Recover, then tick until stopped (Ctrl-C), until idle, once, or until `timeout_s`.

        On the way out, stage processes still running are stopped; their jobs stay Running in the
        database, and the next controller starts those stages again.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._exclusive():
            self._looking_since = self.clock()
            self.recover()
            try:
                while True:
                    self.tick()
                    if once or (until_idle and self.is_idle()):
                        return
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"the controller did not become idle within {timeout_s} s")
                    time.sleep(tick_s)
            finally:
                self.stop_attempts()

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the database's controller lock: a second controller would take the first one's
        attempts for interrupted ones. The system releases the lock when the process dies, however
        it dies, so a killed controller never blocks the next one."""
        import fcntl

        path = self.store.path.with_name(self.store.path.name + ".controller.lock")
        with open(path, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                raise ConfigError(
                    f"{self.store.path}: another controller is running ({lock.read().strip() or 'pid unknown'})"
                ) from None
            lock.seek(0)
            lock.truncate()
            lock.write(f"pid {os.getpid()}")
            lock.flush()
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def stop_attempts(self) -> None:
        for attempt in self._attempts.values():
            attempt.process.kill()
        self._attempts.clear()

    def is_idle(self) -> bool:
        """Nothing running, every job waiting for its trigger, and every trigger checked (and not
        fired) by this controller since its job started waiting: data that arrived before this
        controller started is always looked at."""
        if self._attempts:
            return False
        for job in self.store.jobs():
            if (job.stage, job.state) != (Stage.TRAIN, State.WAITING):
                return False
            if job.last_check_at is None or job.last_check_at < max(job.state_since, self._looking_since):
                return False
        return True

    def recover(self) -> None:
        """Deal with attempts a previous controller left Starting or Running (see module doc)."""
        for run in self.store.active_runs():
            if run.job in self._attempts:
                continue
            job = self.store.job(run.job)
            workdir = Path(run.workdir)
            process = read_json(workdir / PROCESS_FILE) if run.stage is not Stage.DEPLOY else None
            if process is not None:
                kill_process_group(int(process["pid"]), float(process["started"]))
            result = read_json(workdir / RESULT_FILE) if run.stage is not Stage.DEPLOY else None
            if result is not None and (job.stage, job.state) == (run.stage, State.RUNNING):
                self._complete(job, run, result)
                continue
            with self.store.transaction() as db:
                self.store.finish_run(db, run.id, "interrupted", self.clock())
                if job.state in ACTIVE_STATES and job.stage is run.stage:
                    self.store.transition(
                        db, job, job.stage, State.READY, Reason.CONTROLLER_RESTARTED,
                        f"{run.stage.value} attempt {run.attempt} was {job.state.value} when the controller "
                        f"stopped; the stage starts again in a fresh folder (the old one, {workdir}, is left as it is)",
                        self.clock(),
                    )

    def tick(self) -> None:
        """One step for every job."""
        jobs = self.store.jobs()
        present = {job.name for job in jobs}
        for name in [name for name in self._attempts if name not in present]:  # deleted meanwhile
            self._attempts.pop(name).process.kill()
        for job in jobs:
            try:
                self._step(job)
            except StaleState:
                continue  # changed by someone else meanwhile (e.g. deleted); seen afresh next tick

    def _step(self, job: JobRecord) -> None:
        if job.state in ACTIVE_STATES:
            self._poll(job)
        elif job.state is State.WAITING:
            if job.stage is Stage.TRAIN:
                self._check_trigger(job)
            else:
                self._follow_previous_stage(job)
        elif job.state is State.READY:
            self._start(job)

    # ---------------------------------------------------------------------------- triggers
    def observe(self, job: JobRecord, now: float) -> Observation:
        samples = {location.name: count_samples(location) for location in edge_tasks(job.spec.edge)}
        self.store.note_tasks(job.name, [task for task, count in samples.items() if count > 0], now)
        deployed = self.store.deployed_version(job.name)
        latest = {} if deployed is None else self.store.latest_evaluations(job.name, deployed.version)
        return Observation(
            now=now,
            samples=samples,
            trained_samples={task.name: task.samples for task in self.store.tasks(job.name)},
            deployed_figures=None if deployed is None else {
                task: {"fid": record.fid, "fidelity": record.fidelity} for task, record in latest.items()},
            deployed_measured_at=None if deployed is None else {task: record.at for task, record in latest.items()},
            deployed_tasks=() if deployed is None else tuple(deployed.task_names),
        )

    def _check_trigger(self, job: JobRecord, *, now_due: bool = False) -> None:
        """Evaluate the trigger when due (`now_due`: at once, e.g. on figures just measured)."""
        now = self.clock()
        if not now_due:
            if not check_due(job.last_check_at, job.spec.trigger.check_period_s, now):
                return
            if job.retry_at is not None and now < job.retry_at:
                return  # backing off after failed stages
        remeasure = None
        try:
            observation = self.observe(job, now)
            verdict = evaluate_trigger(job.spec.trigger, observation)
            remeasure = remeasure_reason(job.spec.trigger, observation)
        except (DataError, ConfigError, OSError) as error:
            verdict = Verdict(False, f"could not read the edge data: {error}")
        ignored = ignored_folders(job.spec.edge)
        if ignored:  # say so where the user looks, rather than skip them in silence
            note = Verdict(False, f"not tasks (names must match {NAME_PATTERN} and not be any/every): {ignored}")
            verdict = Verdict(verdict.fired, verdict.detail, (*verdict.parts, note))
        with self.store.transaction() as db:
            if remeasure is not None:
                deployed = self.store.deployed_version(job.name)
                assert deployed is not None  # only deployed figures can be stale
                waiting = Verdict(False, f"not decided yet: {remeasure}; measuring version "
                                         f"{deployed.version} again first", (verdict,))
                self.store.record_check(db, job.name, now, waiting.as_dict())
                self.store.transition(
                    db, job, Stage.MEASURE, State.WAITING, Reason.FIGURES_STALE,
                    f"{remeasure}; deployed version {deployed.version} is measured again before the trigger decides",
                    now,
                )
                return
            self.store.record_check(db, job.name, now, verdict.as_dict())
            if verdict.fired:
                self.store.transition(
                    db, job, Stage.TRAIN, State.READY, Reason.TRIGGER_FIRED, verdict.describe(), now, new_cycle=True
                )

    def _follow_previous_stage(self, job: JobRecord) -> None:
        if job.stage is Stage.MEASURE:
            deployed = self.store.deployed_version(job.name)
            if deployed is None:
                raise StaleState(f"job '{job.name}' has no deployed version to measure")
            message = f"deployed version {deployed.version} is ready to be measured again"
        else:
            candidate = self._candidate(job)
            message = f"version {candidate.version} is ready to be {'evaluated' if job.stage is Stage.EVAL else 'deployed'}"
        with self.store.transaction() as db:
            self.store.transition(db, job, job.stage, State.READY, Reason.STAGE_READY, message, self.clock())

    def _candidate(self, job: JobRecord) -> VersionRecord:
        """The version trained in the job's current cycle."""
        versions = [version for version in self.store.versions(job.name) if version.cycle == job.cycle]
        if not versions:
            raise StaleState(f"job '{job.name}' has no version trained in cycle {job.cycle}")
        return versions[-1]

    # ------------------------------------------------------------------------------ starting
    def _start(self, job: JobRecord) -> None:
        if job.stage is Stage.DEPLOY:
            self._deploy(job)
            return
        if len(self._attempts) >= self.max_concurrent:
            return
        now = self.clock()
        cycle_dir = job.workdir / f"cycle-{job.cycle:04d}"
        with self.store.transaction() as db:
            run = self.store.start_run(
                db, job, job.stage, lambda attempt: cycle_dir / f"{job.stage.value}-{attempt}", now
            )
            job = self.store.transition(
                db, job, job.stage, State.STARTING, Reason.LAUNCHING, f"attempt {run.attempt} in {run.workdir}", now
            )
        workdir = Path(run.workdir)
        try:
            workdir.mkdir(parents=True, exist_ok=False)  # never reuse a folder, whatever is in it
            write_json(workdir / REQUEST_FILE, StageRequest(request=self._request(job)).model_dump(mode="json"))
            process = self.launcher.start(workdir)
        except (OSError, ConfigError, DataError) as error:
            self._fail(job, run, Reason.LAUNCH_FAILED, f"could not start the {job.stage.value} stage: {error}")
            return
        write_json(workdir / PROCESS_FILE, {"pid": process.pid, "started": process.started})
        with self.store.transaction() as db:
            self.store.set_run_process(db, run.id, process.pid, process.started)
            self.store.transition(
                db, job, job.stage, State.RUNNING, Reason.PROCESS_STARTED,
                f"stage process {process.pid} started; its log is {workdir / LOG_FILE}", self.clock(),
            )
        self._attempts[job.name] = _Attempt(run, process)

    def _request(self, job: JobRecord) -> TrainRequest | EvalRequest | MeasureRequest:
        deployed = self.store.deployed_version(job.name)
        parent = None if deployed is None else ModelRef(version=deployed.version, checkpoint=Path(deployed.checkpoint))
        classifiers, kb_dir = self.classifier_refs(job.name), job.workdir / KB_DIR
        if job.stage is Stage.TRAIN:
            return TrainRequest(
                job=job.name, cycle=job.cycle, spec=job.spec, tasks=self._training_tasks(job),
                parent=parent, cache_dir=self.cache_dir, classifiers=classifiers, kb_dir=kb_dir,
            )
        if job.stage is Stage.MEASURE:
            if deployed is None or parent is None:
                raise StaleState(f"job '{job.name}' has no deployed version to measure")
            at_edge = {location.name: location for location in edge_tasks(job.spec.edge)}
            return MeasureRequest(
                job=job.name, cycle=job.cycle, spec=job.spec, deployed=parent,
                tasks=[at_edge[name] for name in deployed.task_names if name in at_edge],
                cache_dir=self.cache_dir, classifiers=classifiers, kb_dir=kb_dir,
            )
        candidate = self._candidate(job)
        return EvalRequest(
            job=job.name,
            cycle=job.cycle,
            spec=job.spec,
            candidate=CandidateRef(
                version=candidate.version, checkpoint=Path(candidate.checkpoint), snapshot=candidate.data["snapshot"]
            ),
            deployed=parent,
            cache_dir=self.cache_dir,
            classifiers=classifiers,
            kb_dir=kb_dir,
        )

    def classifier_refs(self, name: str) -> list[ClassifierRef]:
        """The job's domain classifiers, as a stage request carries them."""
        return [
            ClassifierRef(version=record.version, key=record.key, file=Path(record.file), sha256=record.sha256)
            for record in self.store.classifiers(name)
        ]

    def _training_tasks(self, job: JobRecord) -> list[Any]:
        """The edge tasks in the knowledge base's order (first seen first), unseen ones last."""
        order = {task.name: position for position, task in enumerate(self.store.tasks(job.name))}
        locations = edge_tasks(job.spec.edge)
        return sorted(locations, key=lambda location: (order.get(location.name, len(order)), location.name))

    # ------------------------------------------------------------------------------- running
    def _poll(self, job: JobRecord) -> None:
        attempt = self._attempts.get(job.name)
        if attempt is None:
            return  # only after a crash, and `recover` deals with those before the first tick
        status = attempt.process.poll()
        if status is None:
            return
        del self._attempts[job.name]
        workdir = Path(attempt.run.workdir)
        result = read_json(workdir / RESULT_FILE)
        if status == 0 and result is not None:
            self._complete(job, attempt.run, result)
            return
        error = read_json(workdir / ERROR_FILE)
        if error is not None:
            self._fail(job, attempt.run, error["reason"], error["message"])
        else:
            self._fail(job, attempt.run, Reason.PROCESS_FAILED,
                       f"the {job.stage.value} stage process exited with status {status}; "
                       f"end of {workdir / LOG_FILE}:\n{_tail(workdir / LOG_FILE)}")

    def _complete(self, job: JobRecord, run: StageRunRecord, result: dict[str, Any]) -> None:
        try:
            if run.stage is Stage.TRAIN:
                self._complete_train(job, run, result)
            elif run.stage is Stage.MEASURE:
                self._complete_measure(job, run, result)
            else:
                self._complete_eval(job, run, result)
        except ConfigError as error:  # e.g. a classifier that contradicts the knowledge base
            self._fail(job, run, type(error).__name__, f"could not record the {run.stage.value} stage's result: {error}")

    def _register_classifier(
        self, db: Any, job: JobRecord, result: dict[str, Any], stage: Stage, now: float
    ) -> int | None:
        """The version of the job's classifier the attempt measured with (registered if new);
        None for a result written by an EntGAN that did not record classifiers."""
        identity = result.get("classifier")
        if identity is None:
            return None
        return self.store.add_classifier(
            db, job, identity["key"], identity["classes"], identity["file"], identity["sha256"], stage, now
        )

    def _complete_train(self, job: JobRecord, run: StageRunRecord, result: dict[str, Any]) -> None:
        request = StageRequest.model_validate(read_json(Path(run.workdir) / REQUEST_FILE)).request
        parent = None if request.parent is None else request.parent.version
        tasks = result["snapshot"]["tasks"]
        now = self.clock()
        with self.store.transaction() as db:
            self.store.finish_run(db, run.id, "completed", now)
            classifier = self._register_classifier(db, job, result, Stage.TRAIN, now)
            version = self.store.add_version(
                db, job, parent, result["checkpoint"], result["run_dir"], tasks,
                {"snapshot": result["snapshot"], "summary": result["summary"]}, now, classifier,
            )
            counts = ", ".join(f"{task['name']} {task['train']}+{task['holdout']}" for task in tasks)
            origin = "from scratch" if parent is None else f"from version {parent}"
            job = self.store.transition(
                db, job, Stage.TRAIN, State.COMPLETED, Reason.SUCCEEDED,
                f"version {version} trained {origin} in {result['summary']['train_clock_s']:.1f} s "
                f"(train+held-out images: {counts})", now,
            )
            self.store.transition(db, job, Stage.EVAL, State.WAITING, Reason.MODEL_TRAINED,
                                  f"version {version} waits for its evaluation", now)

    def _complete_eval(self, job: JobRecord, run: StageRunRecord, result: dict[str, Any]) -> None:
        candidate = self._candidate(job)
        request = StageRequest.model_validate(read_json(Path(run.workdir) / REQUEST_FILE)).request
        deployed = None if request.deployed is None else request.deployed.version
        deployed_figures = None
        if deployed is not None:
            deployed_figures = {task: result["deployed"].get(task, {}) for task in result["deployed_tasks"]}
        decision = decide(job.spec.deploy, result["candidate"], deployed_figures)
        now = self.clock()
        with self.store.transaction() as db:
            self.store.finish_run(db, run.id, "completed", now)
            classifier = self._register_classifier(db, job, result, Stage.EVAL, now)
            self.store.add_evaluation(db, job, candidate.version, "candidate", result["candidate"], now, classifier)
            if deployed is not None:
                self.store.add_evaluation(db, job, deployed, "deployed", result["deployed"], now, classifier)
            self.store.add_decision(db, job, candidate.version, deployed, decision.deploy, decision.rule,
                                    decision.message, {**decision.figures(), "holdout": result["holdout"],
                                                       "classifier": classifier,
                                                       **({"cas": result["cas"]} if "cas" in result else {})}, now)
            against = "" if deployed is None else f" and deployed version {deployed}"
            job = self.store.transition(
                db, job, Stage.EVAL, State.COMPLETED, Reason.SUCCEEDED,
                f"measured version {candidate.version}{against} on held-out images {result['holdout']}"
                f"{_with_classifier(classifier)}", now,
            )
            if decision.deploy:
                self.store.transition(db, job, Stage.DEPLOY, State.WAITING, Reason.CANDIDATE_ACCEPTED,
                                      decision.message, now)
            else:
                self.store.set_outcome(db, job.name, candidate.version, "rejected")
                self.store.clear_failures(db, job.name)  # the cycle ran to its end
                self.store.transition(db, job, Stage.TRAIN, State.WAITING, Reason.CANDIDATE_REJECTED,
                                      decision.message, now)

    def _complete_measure(self, job: JobRecord, run: StageRunRecord, result: dict[str, Any]) -> None:
        request = StageRequest.model_validate(read_json(Path(run.workdir) / REQUEST_FILE)).request
        assert isinstance(request, MeasureRequest)
        version = request.deployed.version
        figures = ", ".join(f"{task} fid {values['fid']:.4g}" for task, values in result["deployed"].items())
        now = self.clock()
        with self.store.transaction() as db:
            self.store.finish_run(db, run.id, "completed", now)
            classifier = self._register_classifier(db, job, result, Stage.MEASURE, now)
            self.store.add_evaluation(db, job, version, "deployed", result["deployed"], now, classifier)
            self.store.clear_failures(db, job.name)
            job = self.store.transition(
                db, job, Stage.MEASURE, State.COMPLETED, Reason.SUCCEEDED,
                f"measured deployed version {version} on held-out images {result['holdout']}"
                f"{_with_classifier(classifier)}: {figures or 'no task'}", now,
            )
            job = self.store.transition(db, job, Stage.TRAIN, State.WAITING, Reason.DEPLOYED_MEASURED,
                                        f"the trigger decides on version {version}'s fresh figures", now)
        self._check_trigger(job, now_due=True)

    def _fail(self, job: JobRecord, run: StageRunRecord, reason: str, message: str) -> None:
        now = self.clock()
        failures = job.failures + 1
        delay = retry_delay(job.spec.trigger.check_period_s, failures, job.spec.trigger.max_retry_delay_s)
        with self.store.transaction() as db:
            self.store.finish_run(db, run.id, "failed", now)
            if job.stage in (Stage.EVAL, Stage.DEPLOY):
                outcome = "eval-failed" if job.stage is Stage.EVAL else "deploy-failed"
                self.store.set_outcome(db, job.name, self._candidate(job).version, outcome)
            self.store.record_failure(db, job.name, failures, now + delay)
            job = self.store.transition(db, job, job.stage, State.FAILED, reason, message, now)
            self.store.transition(
                db, job, Stage.TRAIN, State.WAITING, Reason.STAGE_FAILED,
                f"the {run.stage.value} stage failed ({reason}); {failures} failure{'s' if failures != 1 else ''} "
                f"in a row, so the trigger is checked again in {delay:g} s at the earliest", now,
            )

    # -------------------------------------------------------------------------------- deploy
    def _deploy(self, job: JobRecord) -> None:
        """Publish the candidate as a run directory at `<job>/deployed` (so `entgan sample` reads
        it), then mark it deployed. Quick and idempotent, so it runs here, not in a process."""
        candidate = self._candidate(job)
        target = job.workdir / DEPLOYED_DIR
        now = self.clock()
        with self.store.transaction() as db:
            run = self.store.start_run(db, job, Stage.DEPLOY, lambda _: target, now)
            job = self.store.transition(db, job, Stage.DEPLOY, State.STARTING, Reason.LAUNCHING,
                                        f"attempt {run.attempt}: publishing version {candidate.version}", now)
            job = self.store.transition(db, job, Stage.DEPLOY, State.RUNNING, Reason.PROCESS_STARTED,
                                        f"copying {candidate.checkpoint} to {target}", now)
        try:
            publish(candidate, target)
        except OSError as error:
            self._fail(job, run, Reason.DEPLOY_FAILED, f"could not publish version {candidate.version}: {error}")
            return
        now = self.clock()
        with self.store.transaction() as db:
            self.store.finish_run(db, run.id, "completed", now)
            self.store.mark_deployed(db, job.name, candidate.version, now)
            self.store.clear_failures(db, job.name)  # the cycle ran to its end
            job = self.store.transition(db, job, Stage.DEPLOY, State.COMPLETED, Reason.SUCCEEDED,
                                        f"version {candidate.version} is deployed at {target}", now)
            self.store.transition(db, job, Stage.TRAIN, State.WAITING, Reason.MODEL_DEPLOYED,
                                  f"version {candidate.version} deployed; the train stage waits for its trigger", now)


def publish(version: VersionRecord, target: Path) -> None:
    """Copy a version's checkpoint and config into `target` as a run directory, atomically file by
    file; `version.json` is written last and names what is there."""
    from entgan.rundir import CONFIG_FILE, atomic_write

    def copy_from(origin: Path) -> Callable[[BinaryIO], None]:
        def copy(handle: BinaryIO) -> None:
            with open(origin, "rb") as source:
                shutil.copyfileobj(source, handle)

        return copy

    atomic_write(target / CONFIG_FILE, copy_from(Path(version.run_dir) / CONFIG_FILE))
    atomic_write(target / "checkpoints" / "latest.pt", copy_from(Path(version.checkpoint)))
    write_json(target / "version.json", {"job": version.job, "version": version.version,
                                         "checkpoint": version.checkpoint, "tasks": version.task_names})


def next_check_at(job: JobRecord) -> float | None:
    """When the controller next evaluates the job's trigger (None: at its next tick): one check
    period after the last check, and not before the back-off after failed stages ends."""
    times = [time for time in (
        None if job.last_check_at is None else job.last_check_at + job.spec.trigger.check_period_s,
        job.retry_at,
    ) if time is not None]
    return max(times) if times else None


def _with_classifier(version: int | None) -> str:
    return "" if version is None else f" with the job's classifier c{version}"


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
