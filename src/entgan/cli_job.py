"""`entgan job ...` and `entgan kb ...`: lifelong learning jobs and their knowledge base.

    entgan job create configs/jobs/digits.yaml     # validate and store (bad spec: exit 2, field named)
    entgan job controller                          # the loop that runs every job (Ctrl-C stops it)
    entgan job list | status NAME | logs NAME | watch | delete NAME
    entgan kb tasks | models | classifiers | show VERSION

Every command takes `--root DIR` (the jobs folder; default $ENTGAN_JOBS_DIR or ./entgan-jobs)
and `--db FILE` (default `<root>/entgan-jobs.sqlite`). Handlers return the exit status; user errors
are raised as ConfigError, which `entgan.cli.main` turns into one message and exit status 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported by the handlers, so that building the parser stays light
    from entgan.lifelong.api import Jobs, JobStatus
    from entgan.lifelong.store import ClassifierRecord, JobRecord, TransitionRecord


def _jobs(args: argparse.Namespace, *, create: bool = False) -> Jobs:
    """The jobs folder of the command line; only `create` and the controller may start a new one."""
    from entgan.lifelong.api import Jobs

    return Jobs(root=args.root, db=args.db, must_exist=not create)


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(value) for value in row] for row in [headers, *rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    return "\n".join("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in cells)


def _first_line(text: str, width: int = 100) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= width else line[: width - 3] + "..."


def _transition_line(record: TransitionRecord) -> str:
    origin = f"{record.from_stage}/{record.from_state}" if record.from_stage else "(new)"
    return f"{_when(record.at)}  cycle {record.cycle}  {origin} -> {record.stage}/{record.state}  {record.reason}"


# ------------------------------------------------------------------------------------------- job
def _command_create(args: argparse.Namespace) -> int:
    from entgan.lifelong.spec import load_job_spec

    spec = load_job_spec(args.spec)  # before the database: a bad spec leaves nothing behind
    with _jobs(args, create=True) as jobs:
        job = jobs.create(spec, spec_path=args.spec)
    print(f"created job '{job.name}' ({job.stage.value}/{job.state.value}); its files go to {job.workdir}")
    return 0


def _jobs_table(jobs: Jobs, records: list[JobRecord]) -> str:
    rows = []
    for job in records:
        deployed = jobs.store.deployed_version(job.name)
        last = jobs.store.transitions(job.name, limit=1)
        rows.append([
            job.name, job.stage.value, job.state.value, job.cycle,
            f"v{deployed.version}" if deployed else "-", _when(job.state_since),
            last[-1].reason if last else "-",
        ])
    return _table(["JOB", "STAGE", "STATE", "CYCLE", "DEPLOYED", "SINCE", "LAST REASON"], rows)


def _command_list(args: argparse.Namespace) -> int:
    with _jobs(args) as jobs:
        records = jobs.jobs()
        print(_jobs_table(jobs, records) if records else f"no jobs in {jobs.store.path}")
    return 0


def _status_text(status: JobStatus, now: float) -> str:
    job = status.job
    lines = [f"job {job.name}: {job.stage.value}/{job.state.value} since {_when(job.state_since)} (cycle {job.cycle})"]
    if status.recent:
        last = status.recent[-1]
        lines.append(f"  last transition: {last.reason}: {_first_line(last.message, 200)}")
    if status.deployed is not None:
        lines.append(f"  deployed: version {status.deployed.version} (tasks {', '.join(status.deployed.task_names)}),"
                     f" since {_when(status.deployed.deployed_at)}")
    else:
        lines.append("  deployed: nothing yet")
    if status.attempt is not None:
        lines.append(f"  under way: {status.attempt.stage.value} attempt {status.attempt.attempt}, process "
                     f"{status.attempt.pid or '-'}, folder {status.attempt.workdir}")
    if job.failures:
        lines.append(f"  failures: {job.failures} in a row; next attempt (trigger check) not before "
                     f"{_when(job.retry_at)}{_from_now(job.retry_at, now)}")
    period = job.spec.trigger.check_period_s
    if job.last_check is None:
        lines.append(f"  trigger: not checked yet (checked every {period:g} s)")
    else:
        age = now - (job.last_check_at or now)
        outcome = "fired" if job.last_check["fired"] else "not fired"
        lines.append(f"  trigger: checked {age:.0f} s ago (every {period:g} s): {outcome}")
        lines.extend("    " + line for line in _verdict_lines(job.last_check))
    from entgan.lifelong.controller import next_check_at
    from entgan.lifelong.states import Stage, State

    upcoming = next_check_at(job)
    if (job.stage, job.state) == (Stage.TRAIN, State.WAITING) and upcoming is not None:
        lines.append(f"  next trigger check: {_when(upcoming)}{_from_now(upcoming, now)}")
    return "\n".join(lines)


def _from_now(moment: float | None, now: float) -> str:
    if moment is None:
        return ""
    return f" (in {moment - now:.0f} s)" if moment > now else " (due)"


def _verdict_lines(verdict: dict[str, Any], depth: int = 0) -> list[str]:
    lines = [f"{'  ' * depth}[{'yes' if verdict['fired'] else 'no'}] {verdict['detail']}"]
    for part in verdict.get("parts", []):
        lines.extend(_verdict_lines(part, depth + 1))
    return lines


def _command_status(args: argparse.Namespace) -> int:
    from entgan.lifelong.controller import next_check_at

    with _jobs(args) as jobs:
        status = jobs.status(args.name)
        if args.json:
            job = status.job
            print(json.dumps({
                "name": job.name, "stage": job.stage.value, "state": job.state.value, "cycle": job.cycle,
                "since": job.state_since, "deployed": status.deployed.version if status.deployed else None,
                "last_check": job.last_check, "last_check_at": job.last_check_at,
                "failures": job.failures, "retry_at": job.retry_at, "next_check_at": next_check_at(job),
                "recent": [vars(record) for record in status.recent],
            }, indent=2))
        else:
            print(_status_text(status, time.time()))
    return 0


def _command_logs(args: argparse.Namespace) -> int:
    with _jobs(args) as jobs:
        if args.stage_log:
            found = jobs.stage_log(args.name)
            if found is None:
                print(f"job '{args.name}' has not run a train or eval stage yet")
            else:
                path, text = found
                print(f"==> {path} <==")
                print("\n".join(text.splitlines()[-args.lines:] if args.lines else text.splitlines()))
            return 0
        for record in jobs.logs(args.name, args.lines):
            print(_transition_line(record))
            for line in record.message.splitlines():
                print(f"    {line}")
    return 0


def _command_delete(args: argparse.Namespace) -> int:
    with _jobs(args) as jobs:
        workdir = jobs.job(args.name).workdir
        jobs.delete(args.name, force=args.force)
    print(f"deleted job '{args.name}' and its records (its files in {workdir} are kept)")
    return 0


def _command_watch(args: argparse.Namespace) -> int:
    clear = sys.stdout.isatty()
    frames = 0
    with _jobs(args) as jobs:
        try:
            while args.count is None or frames < args.count:
                records = [jobs.job(args.name)] if args.name else jobs.jobs()
                text = [f"{_when(time.time())}  jobs in {jobs.store.path}", ""]
                text.append(_jobs_table(jobs, records) if records else "no jobs")
                for job in records:
                    text.append("")
                    text.append(f"{job.name}: latest transitions")
                    text.extend("  " + _transition_line(record) for record in jobs.store.transitions(job.name, 5))
                print(("\x1b[2J\x1b[H" if clear else "") + "\n".join(text), flush=True)
                frames += 1
                if args.count is None or frames < args.count:
                    time.sleep(args.interval)
        except KeyboardInterrupt:
            pass
    return 0


def _command_controller(args: argparse.Namespace) -> int:
    with _jobs(args, create=True) as jobs:
        mode = "once" if args.once else "until idle" if args.until_idle else "until stopped (Ctrl-C)"
        print(f"controller for {jobs.store.path}: running {mode}", flush=True)
        try:
            jobs.run_controller(
                until_idle=args.until_idle, once=args.once, tick_s=args.tick, timeout_s=args.timeout,
                max_concurrent=args.max_concurrent,
            )
        except KeyboardInterrupt:
            print("controller stopped; stages under way start again with the next controller")
        except TimeoutError as error:
            print(f"entgan: error: {error}", file=sys.stderr)
            return 1
    return 0


# -------------------------------------------------------------------------------- knowledge base
def _command_kb_tasks(args: argparse.Namespace) -> int:
    with _jobs(args) as jobs:
        rows = [
            [t.job, t.name, _when(t.first_seen), "-" if t.samples is None else t.samples, t.fingerprint or "-",
             "-" if t.last_version is None else f"v{t.last_version}"]
            for t in jobs.tasks(args.job)
        ]
    print(_table(["JOB", "TASK", "FIRST SEEN", "SAMPLES AT LAST TRAINING", "DATA FINGERPRINT", "LAST VERSION"], rows)
          if rows else "no tasks in the knowledge base yet")
    return 0


def _figures_text(figures: dict[str, tuple[float | None, float | None]]) -> str:
    return ", ".join(
        f"{task} {'-' if fid is None else f'{fid:.4g}'}/{'-' if fidelity is None else f'{fidelity:.2f}'}"
        for task, (fid, fidelity) in figures.items()
    ) or "-"


def _classifier_text(version: int | None, known: dict[tuple[str, int], ClassifierRecord], job: str) -> str:
    """A classifier as `c2 (sha256 prefix)`; `?` for figures recorded before classifiers were."""
    if version is None:
        return "?"
    record = known.get((job, version))
    return f"c{version}" if record is None else record.identity


def _command_kb_models(args: argparse.Namespace) -> int:
    with _jobs(args) as jobs:
        known = {(c.job, c.version): c for c in jobs.classifiers(args.job)}
        rows = []
        for version in jobs.versions(args.job):
            candidate = [e for e in jobs.store.evaluations(version.job, version.version) if e.role == "candidate"]
            measured = {e.task: (e.fid, e.fidelity) for e in candidate}
            used = sorted({e.classifier for e in candidate}, key=lambda c: -1 if c is None else c)
            rows.append([
                version.job, f"v{version.version}", version.cycle,
                "-" if version.parent is None else f"v{version.parent}", version.outcome,
                "yes" if version.deployed else "", ",".join(version.task_names), _figures_text(measured),
                ",".join(_classifier_text(c, known, version.job) for c in used) or "-",
            ])
    headers = ["JOB", "VERSION", "CYCLE", "PARENT", "OUTCOME", "DEPLOYED", "TASKS", "FID/FIDELITY AS CANDIDATE",
               "CLASSIFIER"]
    print(_table(headers, rows) if rows else "no model versions in the knowledge base yet")
    if rows:
        print("(figures compare across versions only when measured with the same classifier; `entgan kb classifiers`)")
    return 0


def _command_kb_classifiers(args: argparse.Namespace) -> int:
    with _jobs(args) as jobs:
        rows = [
            [c.job, f"c{c.version}", c.sha256[:12], f"cycle {c.cycle} ({c.stage})", _when(c.created_at),
             " ".join(f"{k['task']}({','.join(k['classes'])})" for k in c.classes), c.file]
            for c in jobs.classifiers(args.job)
        ]
    headers = ["JOB", "CLASSIFIER", "SHA256", "TRAINED IN", "AT", "TASKS(CLASSES)", "FILE"]
    print(_table(headers, rows) if rows else "no classifiers in the knowledge base yet")
    return 0


def _command_kb_show(args: argparse.Namespace) -> int:
    with _jobs(args) as jobs:
        report = jobs.version(args.version, args.job)
    version = report.version
    print(f"job {version.job}, version {version.version} (cycle {version.cycle}, created {_when(version.created_at)})")
    print(f"  parent: {'none (trained from scratch)' if version.parent is None else f'v{version.parent}'}")
    print(f"  outcome: {version.outcome}{' (deployed now)' if version.deployed else ''}")
    print(f"  checkpoint: {version.checkpoint}")
    print(f"  run directory: {version.run_dir}")
    summary = version.data.get("summary", {})
    if summary:
        print(f"  training: {summary.get('rounds')} rounds, {summary.get('train_clock_s', 0):.1f} s")
    print("  tasks (train + held-out images, data fingerprint):")
    for task in version.tasks:
        skipped = f", {len(task['skipped'])} unreadable files skipped" if task.get("skipped") else ""
        print(f"    {task['name']}: {task['train']} + {task['holdout']}, {task['fingerprint']}{skipped}")
    known = {(c.job, c.version): c for c in report.classifiers}
    if version.classifier is not None:
        print(f"  trained with the job's classifier {_classifier_text(version.classifier, known, version.job)}")
    if report.evaluations:
        print("  evaluations:")
        rows = [[f"cycle {e.cycle}", e.role, e.task, "-" if e.fid is None else f"{e.fid:.4g}",
                 "-" if e.fidelity is None else f"{e.fidelity:.3f}", _classifier_text(e.classifier, known, e.job),
                 _when(e.at)] for e in report.evaluations]
        headers = ["WHEN", "AS", "TASK", "FID", "FIDELITY", "CLASSIFIER", "AT"]
        print("    " + _table(headers, rows).replace("\n", "\n    "))
    for decision in report.decisions:
        print(f"  decision in cycle {decision.cycle} (candidate v{decision.candidate}"
              f"{'' if decision.deployed is None else f' vs deployed v{decision.deployed}'}): {decision.message}")
        print(f"    rule: {decision.rule}")
    return 0


# ----------------------------------------------------------------------------------- registration
def add_job_commands(commands: argparse._SubParsersAction) -> None:
    """Register `job` and `kb` on the `entgan` command's sub-parsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=None, help="jobs folder (default: $ENTGAN_JOBS_DIR or ./entgan-jobs)")
    common.add_argument("--db", default=None, help="jobs database (default: <root>/entgan-jobs.sqlite)")

    job = commands.add_parser("job", help="lifelong learning jobs: train -> eval -> deploy on triggers")
    job_commands = job.add_subparsers(dest="job_command", required=True)

    create = job_commands.add_parser("create", parents=[common], help="validate a job spec (YAML) and store the job")
    create.add_argument("spec")
    create.set_defaults(handler=_command_create)

    listing = job_commands.add_parser("list", parents=[common], help="jobs with their stage and state")
    listing.set_defaults(handler=_command_list)

    status = job_commands.add_parser(
        "status", parents=[common], help="a job's state, deployed model and last trigger check"
    )
    status.add_argument("name")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_command_status)

    logs = job_commands.add_parser("logs", parents=[common], help="a job's transitions with reasons and messages")
    logs.add_argument("name")
    logs.add_argument("-n", "--lines", type=int, default=None, help="only the last N entries (or log lines)")
    logs.add_argument("--stage-log", action="store_true", help="the output of the latest train/eval attempt instead")
    logs.set_defaults(handler=_command_logs)

    delete = job_commands.add_parser("delete", parents=[common], help="remove a job and its records (files are kept)")
    delete.add_argument("name")
    delete.add_argument("--force", action="store_true", help="also when a stage is under way (stops it)")
    delete.set_defaults(handler=_command_delete)

    watch = job_commands.add_parser("watch", parents=[common], help="live view of jobs, stages and states")
    watch.add_argument("name", nargs="?", help="only this job")
    watch.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    watch.add_argument("--count", type=int, default=None, help="stop after N refreshes")
    watch.set_defaults(handler=_command_watch)

    controller = job_commands.add_parser(
        "controller", aliases=["run"], parents=[common], help="run the controller loop that drives every job"
    )
    mode = controller.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="one step for every job, then exit")
    mode.add_argument("--until-idle", action="store_true",
                      help="exit when nothing runs and no trigger fires (scripts and tests)")
    controller.add_argument("--tick", type=float, default=1.0, help="seconds between steps (default 1)")
    controller.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (exit 1)")
    controller.add_argument("--max-concurrent", type=int, default=1, help="train/eval stages at once (default 1)")
    controller.set_defaults(handler=_command_controller)

    kb = commands.add_parser("kb", help="the knowledge base: tasks and model versions of the jobs")
    kb_commands = kb.add_subparsers(dest="kb_command", required=True)
    tasks = kb_commands.add_parser("tasks", parents=[common], help="tasks: first seen, samples, data fingerprint")
    tasks.add_argument("--job", help="only this job's")
    tasks.set_defaults(handler=_command_kb_tasks)
    models = kb_commands.add_parser("models", parents=[common], help="model versions: parent, outcome, figures")
    models.add_argument("--job", help="only this job's")
    models.set_defaults(handler=_command_kb_models)
    classifiers = kb_commands.add_parser(
        "classifiers", parents=[common], help="the jobs' domain classifiers (the scale of their FIDs)"
    )
    classifiers.add_argument("--job", help="only this job's")
    classifiers.set_defaults(handler=_command_kb_classifiers)
    show = kb_commands.add_parser("show", parents=[common], help="one model version with its figures and decisions")
    show.add_argument("version", help="N, vN, JOB:N or JOB:vN")
    show.add_argument("--job", help="the job (when there are several)")
    show.set_defaults(handler=_command_kb_show)
