"""Lifelong jobs without training: triggers, state machine, store and knowledge base, deploy rule,
edge snapshots, and the controller's whole cycle driven by a fake stage launcher (no processes)."""

from __future__ import annotations

import datetime
import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from entgan.data import load_source
from entgan.config import DataConfig
from entgan.lifelong import Controller, Jobs, Reason, Stage, State
from entgan.lifelong.decision import decide
from entgan.lifelong.edge import build_snapshot, count_samples, edge_tasks, held_out
from entgan.lifelong.spec import DeploySpec, TriggerSpec, parse_job_spec
from entgan.lifelong.states import InvalidTransition, check_transition
from entgan.lifelong.store import StaleState
from entgan.lifelong.triggers import (
    Observation,
    check_due,
    evaluate_trigger,
    in_window,
    remeasure_reason,
    retry_delay,
)

# ------------------------------------------------------------------------------------- helpers


def write_images(folder: Path, count: int, start: int = 0, seed: int = 0) -> list[Path]:
    """`count` small grey PNGs named start..start+count-1, written under a dot-name and renamed
    into place, as an edge device should."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + start)
    paths = []
    for number in range(start, start + count):
        path = folder / f"{number:05d}.png"
        temporary = folder / f".{path.name}.part"
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(temporary, format="PNG")
        temporary.rename(path)
        paths.append(path)
    return paths


def job_data(edge_root: Path, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "digits",
        "edge": {"root": str(edge_root), "holdout": 0.25},
        "training": {"rounds": 2, "model": {"latent_dim": 8, "hidden_dim": 16, "task_embedding_dim": 4}},
        "trigger": {"check_period_s": 10, "conditions": [{"kind": "samples", "at_least": 5}]},
        "eval": {"samples_per_task": 40},
        "deploy": {"tolerance": 0.25},
    }
    data.update(overrides)
    return data


def trigger(conditions: list[dict[str, Any]], combine: str = "or") -> TriggerSpec:
    return TriggerSpec.model_validate({"check_period_s": 5, "combine": combine, "conditions": conditions})


def observation(now: float = 0.0, samples=None, trained=None, figures=None) -> Observation:
    return Observation(now=now, samples=samples or {}, trained_samples=trained or {}, deployed_figures=figures)


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------------------ triggers


def test_sample_trigger_counts_new_samples_per_task_or_in_total() -> None:
    per_task = trigger([{"kind": "samples", "at_least": 10, "scope": "per-task"}])
    total = trigger([{"kind": "samples", "at_least": 10, "scope": "total"}])
    seen = observation(samples={"A": 16, "B": 14}, trained={"A": 10, "B": 10})

    assert not evaluate_trigger(per_task, seen).fired  # +6 and +4: neither task reaches 10
    assert evaluate_trigger(total, seen).fired  # but 10 in total
    assert "A +6, B +4" in evaluate_trigger(per_task, seen).describe()
    unseen_task = observation(samples={"A": 10, "C": 12}, trained={"A": 10})
    verdict = evaluate_trigger(per_task, unseen_task)
    assert verdict.fired and "reached by C" in verdict.describe()  # a never-trained task: all new


def test_time_window_spans_midnight_and_honours_utc() -> None:
    def at(hour: int, minute: int) -> datetime.datetime:
        return datetime.datetime(2026, 1, 1, hour, minute)

    assert in_window("01:00", "05:00", at(1, 0)) and not in_window("01:00", "05:00", at(5, 0))
    assert in_window("22:00", "02:00", at(23, 30)) and in_window("22:00", "02:00", at(1, 59))
    assert not in_window("22:00", "02:00", at(12, 0))
    noon_utc = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.timezone.utc).timestamp()
    window = trigger([{"kind": "window", "start": "11:30", "end": "12:30", "utc": True}])
    assert evaluate_trigger(window, observation(now=noon_utc)).fired
    assert not evaluate_trigger(window, observation(now=noon_utc + 3600)).fired


def test_metric_trigger_reads_the_deployed_models_figures() -> None:
    figures = {"A": {"fid": 50.0, "fidelity": 0.9}, "B": {"fid": 20.0, "fidelity": 0.4}}
    any_bad = trigger([{"kind": "metric", "metric": "fid", "operator": ">", "threshold": 40}])
    every_bad = trigger([{"kind": "metric", "metric": "fid", "operator": ">", "threshold": 40, "task": "every"}])
    named = trigger([{"kind": "metric", "metric": "fidelity", "operator": "<", "threshold": 0.5, "task": "B"}])

    assert evaluate_trigger(any_bad, observation(figures=figures)).fired
    assert not evaluate_trigger(every_bad, observation(figures=figures)).fired
    assert evaluate_trigger(named, observation(figures=figures)).fired
    nothing_deployed = evaluate_trigger(any_bad, observation(figures=None))
    assert not nothing_deployed.fired and "no model is deployed" in nothing_deployed.describe()
    missing = trigger([{"kind": "metric", "metric": "fid", "operator": ">", "threshold": 1, "task": "Z"}])
    assert not evaluate_trigger(missing, observation(figures=figures)).fired


def test_and_or_groups_combine_conditions() -> None:
    samples = {"kind": "samples", "at_least": 5}
    closed_window = {"kind": "window", "start": "00:00", "end": "00:01", "utc": True}
    noon = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.timezone.utc).timestamp()
    seen = observation(now=noon, samples={"A": 9}, trained={"A": 0})

    assert evaluate_trigger(trigger([samples, closed_window], "or"), seen).fired
    assert not evaluate_trigger(trigger([samples, closed_window], "and"), seen).fired
    nested = trigger([{"kind": "group", "combine": "and", "conditions": [samples, {"kind": "new-task"}]}])
    assert evaluate_trigger(nested, observation(samples={"A": 9}, trained={})).fired
    assert not evaluate_trigger(nested, observation(samples={"A": 9}, trained={"A": 2})).fired  # A is known


def test_check_period() -> None:
    assert check_due(None, 30, 0.0)
    assert not check_due(100.0, 30, 129.9)
    assert check_due(100.0, 30, 130.0)


# ------------------------------------------------------------------------------- state machine


@pytest.mark.parametrize(
    "before, after",
    [
        ((Stage.TRAIN, State.WAITING), (Stage.TRAIN, State.READY)),
        ((Stage.TRAIN, State.READY), (Stage.TRAIN, State.STARTING)),
        ((Stage.EVAL, State.STARTING), (Stage.EVAL, State.FAILED)),
        ((Stage.TRAIN, State.RUNNING), (Stage.TRAIN, State.READY)),  # interrupted: start again
        ((Stage.TRAIN, State.COMPLETED), (Stage.EVAL, State.WAITING)),
        ((Stage.EVAL, State.COMPLETED), (Stage.DEPLOY, State.WAITING)),
        ((Stage.EVAL, State.COMPLETED), (Stage.TRAIN, State.WAITING)),  # candidate rejected
        ((Stage.DEPLOY, State.FAILED), (Stage.TRAIN, State.WAITING)),
    ],
)
def test_allowed_transitions(before: tuple, after: tuple) -> None:
    check_transition(*before, *after)


@pytest.mark.parametrize(
    "before, after",
    [
        ((Stage.TRAIN, State.WAITING), (Stage.TRAIN, State.RUNNING)),  # skips Ready and Starting
        ((Stage.TRAIN, State.COMPLETED), (Stage.DEPLOY, State.WAITING)),  # deploy without eval
        ((Stage.EVAL, State.FAILED), (Stage.DEPLOY, State.WAITING)),  # a failure never deploys
        ((Stage.DEPLOY, State.COMPLETED), (Stage.DEPLOY, State.RUNNING)),
        ((Stage.TRAIN, State.READY), (Stage.TRAIN, State.COMPLETED)),
    ],
)
def test_forbidden_transitions(before: tuple, after: tuple) -> None:
    with pytest.raises(InvalidTransition):
        check_transition(*before, *after)


# ------------------------------------------------------------------------- store and knowledge base


@pytest.fixture
def jobs(tmp_path: Path) -> Jobs:
    edge = tmp_path / "edge"
    for task in ("A", "B"):
        write_images(edge / task / "0", 6)
        write_images(edge / task / "1", 6)
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(json.dumps(job_data(Path("edge"))))  # JSON is YAML; relative to the spec
    with Jobs(tmp_path / "jobs", clock=FakeClock()) as opened:
        opened.create(spec_path)
        yield opened


def test_create_resolves_paths_and_logs_the_first_transition(jobs: Jobs, tmp_path: Path) -> None:
    job = jobs.job("digits")

    assert job.spec.edge.root == (tmp_path / "edge").resolve()
    assert (job.stage, job.state, job.cycle) == (Stage.TRAIN, State.WAITING, 0)
    [created] = jobs.logs("digits")
    assert created.reason == Reason.JOB_CREATED and created.from_state is None


def test_transition_is_checked_and_rolls_back_with_its_transaction(jobs: Jobs) -> None:
    store, job = jobs.store, jobs.job("digits")

    with pytest.raises(InvalidTransition):
        with store.transaction() as db:
            store.add_version(db, job, None, "x.pt", "run", [], {}, 1.0)
            store.transition(db, job, Stage.TRAIN, State.RUNNING, "Skip", "not allowed", 1.0)
    assert store.versions("digits") == []  # the version went with the failed transaction
    with store.transaction() as db:
        store.transition(db, job, Stage.TRAIN, State.READY, Reason.TRIGGER_FIRED, "go", 2.0, new_cycle=True)
    with pytest.raises(StaleState):  # `job` still says Waiting: someone moved it meanwhile
        with store.transaction() as db:
            store.transition(db, job, Stage.TRAIN, State.READY, Reason.TRIGGER_FIRED, "again", 3.0)
    assert [(t.state, t.reason, t.cycle) for t in store.transitions("digits")][-1] == ("Ready", "TriggerFired", 1)


def test_knowledge_base_records_tasks_versions_figures_and_one_deployed_version(jobs: Jobs) -> None:
    store = jobs.store
    store.note_tasks("digits", ["A", "B"], 10.0)
    store.note_tasks("digits", ["A", "C"], 20.0)  # A keeps its first sighting
    job = jobs.job("digits")
    with store.transaction() as db:
        first = store.add_version(db, job, None, "v1.pt", "run1",
                                  [{"name": "A", "samples": 12, "fingerprint": "aa"}], {"k": 1}, 30.0)
        second = store.add_version(db, job, first, "v2.pt", "run2",
                                   [{"name": "A", "samples": 15, "fingerprint": "ab"},
                                    {"name": "C", "samples": 7, "fingerprint": "cc"}], {}, 40.0)
        store.mark_deployed(db, "digits", first, 41.0)
        store.add_evaluation(db, job, first, "candidate", {"A": {"fid": 9.0, "fidelity": 0.5}}, 42.0)
        store.add_evaluation(db, job, first, "deployed", {"A": {"fid": 8.0, "fidelity": 0.6}}, 43.0)
        store.mark_deployed(db, "digits", second, 44.0)
        store.add_decision(db, job, second, first, True, "rule", "deploy: because", {"tasks": [1]}, 45.0)

    tasks = {task.name: task for task in jobs.tasks("digits")}
    assert tasks["A"].first_seen == 10.0 and tasks["C"].first_seen == 20.0
    assert (tasks["A"].samples, tasks["A"].fingerprint, tasks["A"].last_version) == (15, "ab", second)
    assert tasks["B"].samples is None  # seen, never trained
    versions = jobs.versions("digits")
    assert [(v.version, v.parent, v.deployed, v.outcome) for v in versions] == [
        (1, None, False, "deployed"), (2, 1, True, "deployed")]
    assert store.latest_figures("digits", first) == {"A": {"fid": 8.0, "fidelity": 0.6}}
    report = jobs.version("v2")
    assert report.decisions[0].figures == {"tasks": [1]} and report.decisions[0].deploy
    with pytest.raises(sqlite3.IntegrityError):  # the database itself allows one deployed version
        with store.transaction() as db:
            db.execute("UPDATE versions SET deployed = 1 WHERE job = 'digits'")


def test_a_stage_can_be_recorded_completed_only_once_per_cycle(jobs: Jobs, tmp_path: Path) -> None:
    store, job = jobs.store, jobs.job("digits")
    with store.transaction() as db:
        first = store.start_run(db, job, Stage.TRAIN, lambda n: tmp_path / f"t{n}", 1.0)
        second = store.start_run(db, job, Stage.TRAIN, lambda n: tmp_path / f"t{n}", 2.0)
        store.finish_run(db, first.id, "completed", 3.0)

    assert (first.attempt, second.attempt) == (1, 2) and first.workdir != second.workdir
    with pytest.raises(sqlite3.IntegrityError):
        with store.transaction() as db:
            store.finish_run(db, second.id, "completed", 4.0)


def test_deleting_a_job_removes_its_records_and_names_are_checked(jobs: Jobs) -> None:
    jobs.delete("digits")

    assert jobs.jobs() == [] and jobs.store.tasks() == [] and jobs.store.transitions("digits") == []
    with pytest.raises(Exception, match="no job named 'digits'"):
        jobs.status("digits")


# --------------------------------------------------------------------------------- deploy rule


def _figures(**fids: float) -> dict[str, dict[str, float]]:
    return {task: {"fid": value, "fidelity": 0.5} for task, value in fids.items()}


def test_every_task_rule_needs_every_task_better() -> None:
    rule = DeploySpec(require="every-task", min_improvement=0.05)

    assert decide(rule, _figures(A=80, B=80), _figures(A=100, B=100)).deploy
    rejected = decide(rule, _figures(A=80, B=98), _figures(A=100, B=100))  # B only 2 % better
    assert not rejected.deploy and "not better on ['B']" in rejected.message
    assert "A: fid 80 vs 100 (better, +20.0%)" in rejected.message


def test_any_task_rule_needs_one_better_and_none_worse_beyond_tolerance() -> None:
    rule = DeploySpec(require="any-task", tolerance=0.1)

    assert decide(rule, _figures(A=80, B=105), _figures(A=100, B=100)).deploy
    assert not decide(rule, _figures(A=80, B=120), _figures(A=100, B=100)).deploy
    fidelity = DeploySpec(metric="fidelity", require="any-task")
    higher = {"A": {"fid": 1.0, "fidelity": 0.9}}
    assert decide(fidelity, higher, {"A": {"fid": 1.0, "fidelity": 0.5}}).deploy  # higher is better


def test_new_tasks_deploy_unless_an_old_task_got_worse_beyond_tolerance() -> None:
    rule = DeploySpec(require="every-task", tolerance=0.2)

    kept = decide(rule, _figures(A=110, B=95, C=70), _figures(A=100, B=100))
    assert kept.deploy and "adds tasks ['C']" in kept.message
    assert [t.verdict for t in kept.tasks] == ["within-tolerance", "better", "new"]
    forgot = decide(rule, _figures(A=130, B=95, C=70), _figures(A=100, B=100))
    assert not forgot.deploy and "['A'] got worse" in forgot.message
    dropped = decide(rule, _figures(A=50), _figures(A=100, B=100))
    assert not dropped.deploy and "lacks deployed tasks ['B']" in dropped.message
    first = decide(rule, _figures(A=300), None)
    assert first.deploy and "nothing is deployed yet" in first.message


# --------------------------------------------------------------------------------- edge snapshot


def test_snapshot_labels_match_the_image_folder_reader_and_holdout_is_stable(tmp_path: Path) -> None:
    edge = tmp_path / "edge"
    write_images(edge / "A" / "zero", 10)
    write_images(edge / "A" / "one", 10, seed=1)
    (edge / "A" / "one" / "broken.png").write_bytes(b"not a png")
    (edge / "A" / "one" / ".incoming.png").write_bytes(b"half")  # dot-files are never read
    spec = parse_job_spec(
        job_data(edge, edge={"root": str(edge), "tasks": [
            {"name": "B", "source": "mnist-subset", "labels": [3, 5], "max_per_class": 6}]}),
        base=tmp_path,
    )
    locations = edge_tasks(spec.edge)
    assert [location.name for location in locations] == ["B", "A"]
    assert count_samples(locations[1]) == 21  # 20 images + the broken file (a file is a sample)

    snapshot = build_snapshot(locations, 0.3, 28, 1, tmp_path / "snap")

    by_name = {task.name: task for task in snapshot.tasks}
    assert by_name["A"].samples == 21 and by_name["A"].skipped == [str(edge / "A" / "one" / "broken.png")]
    assert by_name["A"].train + by_name["A"].holdout == 20
    assert by_name["B"].train + by_name["B"].holdout == 12
    source = load_source(DataConfig(source="image-folder", path=snapshot.train_dir))
    for task in snapshot.tasks:  # every task's labels are its folders as the reader numbers them
        for folder, label in zip(task.folders, task.labels):
            files = sorted((snapshot.train_dir / folder).iterdir())
            assert int((source.labels == label).sum()) == len(files)
    held = {p.name for p in (snapshot.holdout_dir / by_name["A"].folders[0]).iterdir()}
    write_images(edge / "A" / "one", 10, start=10, seed=1)  # more data arrives
    later = build_snapshot(edge_tasks(spec.edge), 0.3, 28, 1, tmp_path / "snap2")
    later_a = next(task for task in later.tasks if task.name == "A")
    later_held = {p.name for p in (later.holdout_dir / later_a.folders[0]).iterdir()}
    old_names = {f"{number:05d}.png" for number in range(10)}
    assert later_held & old_names == held  # no old image changed sides
    assert later_a.fingerprint != by_name["A"].fingerprint
    assert held_out("x/1.png", 0.3) == held_out("x/1.png", 0.3)


# ------------------------------------------------------------------------ controller, faked stages


class FakeStage:
    pid = 2**22 + 12345  # above any real pid limit here: recovery finds no such process
    started = 0.0

    def __init__(self, status: int | None) -> None:
        self.status = status

    def poll(self) -> int | None:
        return self.status

    def kill(self) -> None:
        self.status = -9


class FakeLauncher:
    """Plays the stage process: writes the result (or an error) a real one would, instantly."""

    def __init__(self, figures: list[dict[str, float]]) -> None:
        self.figures = list(figures)  # FID per task for each successive eval's candidate
        self.started: list[Path] = []
        self.fail_next: dict[str, str] | None = None
        self.fail_always: dict[str, str] | None = None
        self.hang = False

    def start(self, workdir: Path) -> FakeStage:
        self.started.append(workdir)
        request = json.loads((workdir / "request.json").read_text())["request"]
        if self.hang:
            return FakeStage(None)
        if self.fail_next is not None or self.fail_always is not None:
            (workdir / "error.json").write_text(json.dumps(self.fail_next or self.fail_always))
            self.fail_next = None
            return FakeStage(3)
        if request["stage"] == "train":
            result = self._train(request, workdir)
        elif request["stage"] == "eval":
            result = self._eval(request)
        else:
            result = self._measure(request)
        (workdir / "result.json").write_text(json.dumps(result))
        return FakeStage(0)

    @staticmethod
    def _classifier(request: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
        """What `stages.job_classifier` returns: the job's classifier for these tasks, or a new file
        (named by its content) in the job's knowledge-base folder."""
        import hashlib

        key = "+".join(sorted(tasks))
        for known in request["classifiers"]:
            if known["key"] == key:
                return {"version": known["version"], "key": key, "classes": [], "file": known["file"],
                        "sha256": known["sha256"]}
        content = f"classifier for {key}".encode()
        sha256 = hashlib.sha256(content).hexdigest()
        path = Path(request["kb_dir"]) / "classifiers" / f"classifier-{sha256[:16]}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return {"version": None, "key": key, "classes": [{"task": t, "classes": ["0"], "labels": [0]} for t in tasks],
                "file": str(path), "sha256": sha256}

    @staticmethod
    def _train(request: dict[str, Any], workdir: Path) -> dict[str, Any]:
        from entgan.lifelong.spec import TaskLocation

        run = workdir / "run"
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text("name: fake\n")
        (run / "checkpoints" / "latest.pt").write_bytes(b"weights of " + str(workdir).encode())
        tasks = [
            {"name": t["name"], "folders": [], "labels": [], "samples": count_samples(TaskLocation(**t)),
             "train": 8, "holdout": 4, "fingerprint": "f" + t["name"], "skipped": []}
            for t in request["tasks"]
        ]
        return {"checkpoint": str(run / "checkpoints" / "latest.pt"), "run_dir": str(run),
                "snapshot": {"root": str(workdir / "data"), "tasks": tasks},
                "summary": {"rounds": 2, "train_clock_s": 0.5, "wall_clock_s": 1.0, "first_eval": {}, "final_eval": {}},
                "classifier": FakeLauncher._classifier(request, [t["name"] for t in tasks])}

    def _eval(self, request: dict[str, Any]) -> dict[str, Any]:
        fids = self.figures.pop(0)
        tasks = [task["name"] for task in request["candidate"]["snapshot"]["tasks"]]
        candidate = {task: {"fid": fids[task], "fidelity": 0.5} for task in tasks}
        deployed = request["deployed"]
        return {
            "candidate": candidate,
            "deployed": None if deployed is None else {t: {"fid": 100.0, "fidelity": 0.5} for t in tasks if t != "C"},
            "deployed_tasks": None if deployed is None else ["A", "B"],
            "holdout": {task: 4 for task in tasks},
            "classifier": self._classifier(request, tasks),
        }

    def _measure(self, request: dict[str, Any]) -> dict[str, Any]:
        fids = self.figures.pop(0)
        tasks = [task["name"] for task in request["tasks"]]
        return {"deployed": {task: {"fid": fids[task], "fidelity": 0.5} for task in tasks},
                "holdout": {task: 4 for task in tasks}, "snapshot": {"root": "", "tasks": []},
                "classifier": self._classifier(request, tasks)}


def _drive(controller: Controller, clock: FakeClock, ticks: int = 12) -> None:
    for _ in range(ticks):
        controller.tick()
        clock.now += 1.0


def test_controller_runs_a_whole_cycle_and_records_every_transition(jobs: Jobs) -> None:
    clock = jobs.clock
    launcher = FakeLauncher([{"A": 120.0, "B": 130.0}])
    controller = jobs.controller(launcher=launcher)

    _drive(controller, clock)

    job = jobs.job("digits")
    assert (job.stage, job.state, job.cycle) == (Stage.TRAIN, State.WAITING, 1)
    path = [(t.stage, t.state, t.reason) for t in jobs.logs("digits")]
    assert path == [
        ("train", "Waiting", "JobCreated"), ("train", "Ready", "TriggerFired"),
        ("train", "Starting", "Launching"), ("train", "Running", "ProcessStarted"),
        ("train", "Completed", "StageSucceeded"), ("eval", "Waiting", "ModelTrained"),
        ("eval", "Ready", "StageReady"), ("eval", "Starting", "Launching"), ("eval", "Running", "ProcessStarted"),
        ("eval", "Completed", "StageSucceeded"), ("deploy", "Waiting", "CandidateAccepted"),
        ("deploy", "Ready", "StageReady"), ("deploy", "Starting", "Launching"),
        ("deploy", "Running", "ProcessStarted"), ("deploy", "Completed", "StageSucceeded"),
        ("train", "Waiting", "ModelDeployed"),
    ]
    assert jobs.status("digits").deployed.version == 1
    deployed_dir = job.workdir / "deployed"
    assert (deployed_dir / "checkpoints" / "latest.pt").read_bytes().startswith(b"weights of")
    assert json.loads((deployed_dir / "version.json").read_text())["version"] == 1
    assert controller.is_idle()  # checked again after deploying, nothing new at the edge


def test_trigger_is_checked_once_per_check_period_whatever_the_tick(jobs: Jobs, tmp_path: Path) -> None:
    clock = jobs.clock
    controller = jobs.controller(launcher=FakeLauncher([{"A": 1.0, "B": 1.0}]))
    _drive(controller, clock)  # first cycle; the job is checked at the end of it
    checked_at = jobs.job("digits").last_check_at

    write_images(tmp_path / "edge" / "A" / "0", 5, start=100)  # enough new samples for the trigger
    for offset in (0.5, 2.0, 5.0, 9.9):  # ticks inside the 10 s check period: no check, no new cycle
        clock.now = checked_at + offset
        controller.tick()
        assert jobs.job("digits").last_check_at == checked_at and jobs.job("digits").cycle == 1
    clock.now = checked_at + 10.0
    controller.tick()
    job = jobs.job("digits")
    assert job.cycle == 2 and job.state is State.READY and job.last_check_at == clock.now
    assert "A +5" in jobs.logs("digits")[-1].message and "B +0" in jobs.logs("digits")[-1].message


def test_rejected_candidate_and_failed_stage_return_to_train_waiting_with_reasons(jobs: Jobs, tmp_path: Path) -> None:
    clock = jobs.clock
    launcher = FakeLauncher([{"A": 120.0, "B": 130.0}, {"A": 90.0, "B": 150.0}])
    controller = jobs.controller(launcher=launcher)
    _drive(controller, clock)
    write_images(tmp_path / "edge" / "A" / "0", 5, start=100)
    clock.now += 10
    _drive(controller, clock)  # cycle 2: B got worse than the deployed model's 100

    [first, second] = jobs.decisions("digits")
    assert first.deploy and not second.deploy
    assert "not better on ['B']" in second.message
    assert {t["task"]: t["verdict"] for t in second.figures["tasks"]} == {"A": "better", "B": "worse"}
    assert jobs.versions("digits")[1].outcome == "rejected" and jobs.status("digits").deployed.version == 1
    assert jobs.logs("digits")[-1].reason == Reason.CANDIDATE_REJECTED

    write_images(tmp_path / "edge" / "B" / "0", 5, start=100)
    launcher.fail_next = {"reason": "DataError", "message": "task 'B' has 1 held-out image(s)"}
    clock.now += 10
    _drive(controller, clock, ticks=4)  # cycle 3: the train stage fails
    failed, back = jobs.logs("digits")[-2:]
    assert (failed.stage, failed.state, failed.reason) == ("train", "Failed", "DataError")
    assert "held-out" in failed.message
    assert (back.stage, back.state, back.reason) == ("train", "Waiting", Reason.STAGE_FAILED)
    assert [r.status for r in jobs.attempts("digits") if r.cycle == 3] == ["failed"]


def test_restarted_controller_restarts_an_interrupted_stage_in_a_fresh_folder(jobs: Jobs) -> None:
    clock = jobs.clock
    launcher = FakeLauncher([{"A": 1.0, "B": 1.0}])
    launcher.hang = True
    first = jobs.controller(launcher=launcher)
    _drive(first, clock, ticks=3)  # trigger, start, running... and this controller "dies"
    assert jobs.job("digits").state is State.RUNNING
    old_folder = launcher.started[-1]
    (old_folder / "marker").write_text("left by the first attempt")

    launcher.hang = False
    second = jobs.controller(launcher=launcher)
    second.recover()
    assert jobs.logs("digits")[-1].reason == Reason.CONTROLLER_RESTARTED
    _drive(second, clock)

    runs = [(r.stage.value, r.attempt, r.status) for r in jobs.attempts("digits")]
    assert runs == [("train", 1, "interrupted"), ("train", 2, "completed"),
                    ("eval", 1, "completed"), ("deploy", 1, "completed")]
    assert launcher.started[-2] != old_folder and (old_folder / "marker").read_text() == "left by the first attempt"
    assert jobs.status("digits").deployed.version == 1


def test_restarted_controller_adopts_a_result_written_before_it_died(jobs: Jobs) -> None:
    clock = jobs.clock
    launcher = FakeLauncher([{"A": 1.0, "B": 1.0}])
    launcher.hang = True
    _drive(jobs.controller(launcher=launcher), clock, ticks=3)
    folder = launcher.started[-1]
    launcher.hang = False
    request = json.loads((folder / "request.json").read_text())["request"]
    (folder / "result.json").write_text(json.dumps(launcher._train(request, folder)))  # finished, unrecorded

    jobs.controller(launcher=launcher).recover()

    assert [(r.attempt, r.status) for r in jobs.attempts("digits")] == [(1, "completed")]
    assert jobs.job("digits").stage is Stage.EVAL and jobs.versions("digits")[0].checkpoint.startswith(str(folder))


def test_a_second_controller_on_the_same_database_is_refused(jobs: Jobs) -> None:
    import fcntl

    from entgan.config import ConfigError

    lock_path = jobs.store.path.with_name(jobs.store.path.name + ".controller.lock")
    with open(lock_path, "a+") as held:  # as a live controller holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242")
        held.flush()
        with pytest.raises(ConfigError, match=r"another controller is running \(pid 4242\)"):
            jobs.controller(launcher=FakeLauncher([])).run(once=True)
    jobs.controller(launcher=FakeLauncher([])).run(once=True)  # released: runs


def test_train_stage_reports_a_missing_parent_checkpoint_before_launching(jobs: Jobs, tmp_path: Path) -> None:
    from entgan.config import ConfigError
    from entgan.lifelong.edge import edge_tasks
    from entgan.lifelong.stages import ModelRef, TrainRequest, run_train

    job = jobs.job("digits")
    request = TrainRequest(
        job="digits", cycle=1, spec=job.spec, tasks=edge_tasks(job.spec.edge),
        parent=ModelRef(version=1, checkpoint=tmp_path / "gone.pt"),
    )

    with pytest.raises(ConfigError, match="gone.pt: checkpoint file not found"):
        run_train(request, tmp_path / "attempt")
    assert not (tmp_path / "attempt" / "run").exists()  # no run directory was started


def test_edge_folders_that_cannot_be_tasks_are_reported_in_the_trigger_check(jobs: Jobs, tmp_path: Path) -> None:
    write_images(tmp_path / "edge" / "no spaces please" / "0", 6)
    controller = jobs.controller(launcher=FakeLauncher([]))

    controller.tick()

    assert [task.name for task in jobs.tasks("digits")] == ["A", "B"]
    notes = [part["detail"] for part in jobs.job("digits").last_check["parts"]]
    assert any("['no spaces please']" in note for note in notes)


# -------------------------------------------------------------------------- one classifier per job


def test_a_jobs_figures_name_one_classifier_until_its_tasks_change(jobs: Jobs, tmp_path: Path) -> None:
    clock = jobs.clock
    launcher = FakeLauncher([{"A": 120.0, "B": 130.0}, {"A": 90.0, "B": 95.0}, {"A": 80.0, "B": 90.0, "C": 70.0}])
    controller = jobs.controller(launcher=launcher)
    _drive(controller, clock)  # cycle 1: tasks A and B
    write_images(tmp_path / "edge" / "A" / "0", 5, start=100)
    clock.now += 10
    _drive(controller, clock)  # cycle 2: more data, same tasks
    write_images(tmp_path / "edge" / "C" / "0", 6)
    clock.now += 10
    _drive(controller, clock)  # cycle 3: a new task

    first, second = jobs.classifiers("digits")
    assert (first.version, second.version) == (1, 2) and first.cycle == 1 and second.cycle == 3
    assert Path(first.file).parent == jobs.job("digits").workdir / "knowledge-base" / "classifiers"
    by_cycle: dict[int, set[int | None]] = {}
    for record in jobs.evaluations("digits"):
        by_cycle.setdefault(record.cycle, set()).add(record.classifier)
    assert by_cycle == {1: {1}, 2: {1}, 3: {2}}  # the deployed model, too, is measured with the cycle's one
    assert [v.classifier for v in jobs.versions("digits")] == [1, 1, 2]
    assert [d.figures["classifier"] for d in jobs.decisions("digits")] == [1, 1, 2]
    requests = [json.loads((folder / "request.json").read_text())["request"] for folder in launcher.started]
    assert [len(r["classifiers"]) for r in requests] == [0, 1, 1, 1, 1, 2]  # known ones go to each stage


def test_label_space_changes_with_tasks_and_classes_not_with_more_data(tmp_path: Path) -> None:
    from entgan.lifelong.stages import label_space

    edge = tmp_path / "edge"
    for task in ("A", "B-2"):
        write_images(edge / task / "0", 6)
        write_images(edge / task / "1", 6, seed=1)
    spec = parse_job_spec(job_data(edge), base=tmp_path)

    def key(name: str) -> str:
        return label_space(build_snapshot(edge_tasks(spec.edge), 0.25, 28, 1, tmp_path / name))[0]

    before = key("s1")
    write_images(edge / "A" / "0", 6, start=50)
    assert key("s2") == before  # more images: the same classifier serves
    _, classes = label_space(build_snapshot(edge_tasks(spec.edge), 0.25, 28, 1, tmp_path / "s3"))
    assert classes == [{"task": "A", "classes": ["0", "1"], "labels": [0, 1]},
                       {"task": "B-2", "classes": ["0", "1"], "labels": [2, 3]}]
    write_images(edge / "C" / "0", 6)
    with_c = key("s4")
    assert with_c != before  # a new task: another classifier
    write_images(edge / "B-2" / "2", 6)
    assert key("s5") not in (before, with_c)  # a new class of a task, too


# ------------------------------------------------------------------- back-off after failed stages


def test_retry_delay_doubles_from_the_check_period_up_to_the_cap() -> None:
    assert [retry_delay(10, failures, 300) for failures in range(8)] == [10, 20, 40, 80, 160, 300, 300, 300]
    assert retry_delay(10, 10_000, 300) == 300  # no overflow however long it keeps failing
    assert retry_delay(60, 3, 30) == 60  # a cap below the check period: one period


def test_failing_stage_backs_off_and_the_back_off_survives_a_restart(jobs: Jobs) -> None:
    from entgan.cli_job import _status_text
    from entgan.lifelong.spec import JobSpec

    clock = jobs.clock
    store = jobs.store
    spec = jobs.job("digits").spec
    trigger = spec.trigger.model_copy(update={"max_retry_delay_s": 60.0})  # period 10: 20, 40, 60, 60
    with store.transaction() as db:  # the job as if created with that cap
        db.execute("UPDATE jobs SET spec = ? WHERE name = 'digits'",
                   (JobSpec.model_validate({**spec.model_dump(), "trigger": trigger.model_dump()}).model_dump_json(),))
    launcher = FakeLauncher([{"A": 1.0, "B": 1.0}])
    launcher.fail_always = {"reason": "DataError", "message": "task 'B' has 1 held-out image(s)"}
    controller = jobs.controller(launcher=launcher)

    _drive(controller, clock, ticks=200)

    runs = [run for run in store.runs("digits") if run.stage is Stage.TRAIN]
    assert [run.status for run in runs] == ["failed"] * 5  # a check every 10 s would have made 20
    waits = [later.started_at - earlier.finished_at for earlier, later in zip(runs, runs[1:])]
    # After failure n the trigger is checked again 10 * 2^n s later, at most 60 s; it fires, and the
    # attempt starts at the next tick (1 s).
    assert waits == [21.0, 41.0, 61.0, 61.0]
    job = jobs.job("digits")
    assert job.failures == 5 and job.retry_at == runs[-1].finished_at + 60
    assert "5 failures in a row, so the trigger is checked again in 60 s" in jobs.logs("digits")[-1].message
    text = _status_text(jobs.status("digits"), clock.now)
    assert "failures: 5 in a row; next attempt (trigger check) not before" in text
    assert f"(in {job.retry_at - clock.now:.0f} s)" in text

    restarted = jobs.controller(launcher=launcher)  # a new controller keeps the back-off
    restarted.recover()
    clock.now = job.retry_at - 1
    restarted.tick()
    assert len(store.runs("digits")) == 5 and jobs.job("digits").last_check_at == job.last_check_at
    launcher.fail_always = None
    clock.now = job.retry_at
    _drive(restarted, clock)  # tries again on time, and a whole cycle clears the back-off
    job = jobs.job("digits")
    assert jobs.status("digits").deployed.version == 1 and (job.failures, job.retry_at) == (0, None)
    assert "failures:" not in _status_text(jobs.status("digits"), clock.now)


# ----------------------------------------------------------- metric trigger: figures that are too old


def test_remeasure_only_when_a_stale_figure_could_change_the_verdict() -> None:
    metric = {"kind": "metric", "metric": "fid", "operator": ">", "threshold": 40, "max_age_s": 100}
    figures = {"A": {"fid": 30.0, "fidelity": 0.5}, "B": {"fid": 30.0, "fidelity": 0.5}}

    def seen(now: float, new: int = 0, at_edge: tuple[str, ...] = ("A", "B")) -> Observation:
        return Observation(now=now, samples={task: 3 + (new if task == "A" else 0) for task in at_edge},
                           trained_samples={"A": 3, "B": 3}, deployed_figures=figures,
                           deployed_measured_at={"A": 1000.0, "B": 1050.0}, deployed_tasks=("A", "B"))

    alone = trigger([{"kind": "samples", "at_least": 5}, metric])
    assert remeasure_reason(alone, seen(1100.0)) is None  # both figures young enough
    reason = remeasure_reason(alone, seen(1120.0))
    assert reason is not None and "A 120 s old" in reason and "B" not in reason
    assert remeasure_reason(alone, seen(1120.0, new=9)) is None  # fires anyway on samples
    assert remeasure_reason(alone, seen(1120.0, at_edge=("B",))) is None  # A is gone: cannot be measured
    closed = {"kind": "window", "start": "00:00", "end": "00:01", "utc": True}
    assert remeasure_reason(trigger([closed, metric], "and"), seen(43200.0)) is None  # can't fire anyway
    no_age = trigger([{**metric, "max_age_s": None}])
    assert remeasure_reason(no_age, seen(10**9)) is None  # figures of any age are taken as they are
    named = trigger([{**metric, "task": "B"}])
    assert remeasure_reason(named, seen(1120.0)) is None  # B was measured 70 s ago
    never = Observation(now=0.0, samples={"A": 3}, trained_samples={}, deployed_figures={}, deployed_measured_at={},
                        deployed_tasks=("A",))
    assert "A never measured" in remeasure_reason(trigger([metric]), never)


def test_metric_trigger_measures_the_deployed_model_again_when_its_figures_are_too_old(
    tmp_path: Path,
) -> None:
    edge = tmp_path / "edge"
    for task in ("A", "B"):
        write_images(edge / task / "0", 6)
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(job_data(edge, trigger={"check_period_s": 10, "conditions": [
        {"kind": "new-task"},
        {"kind": "metric", "metric": "fid", "operator": ">", "threshold": 40, "max_age_s": 100}]})))
    clock = FakeClock()
    with Jobs(tmp_path / "jobs", clock=clock) as jobs:
        jobs.create(spec)
        launcher = FakeLauncher([{"A": 30.0, "B": 30.0}, {"A": 55.0, "B": 30.0}])
        controller = jobs.controller(launcher=launcher)
        _drive(controller, clock)  # cycle 1: A and B are new; v1 deployed with FID 30 and 30
        measured_at = jobs.evaluations("digits", 1)[-1].at
        job = jobs.job("digits")
        assert remeasure_reason(job.spec.trigger, controller.observe(job, clock.now)) is None

        clock.now = measured_at + 150  # the figures are 150 s old, more than max_age_s
        decided_at = clock.now
        assert "150 s old" in remeasure_reason(job.spec.trigger, controller.observe(job, clock.now))
        _drive(controller, clock, ticks=4)

        reasons = [t.reason for t in jobs.logs("digits")]
        start = reasons.index(Reason.FIGURES_STALE)
        assert reasons[start:] == [Reason.FIGURES_STALE, Reason.STAGE_READY, Reason.LAUNCHING, Reason.PROCESS_STARTED,
                                   Reason.SUCCEEDED, Reason.DEPLOYED_MEASURED, Reason.TRIGGER_FIRED]
        stale = jobs.logs("digits")[start]
        assert (stale.stage, stale.state, stale.cycle) == ("measure", "Waiting", 1) and "A 150 s old" in stale.message
        measured = [e for e in jobs.evaluations("digits", 1) if e.at > decided_at]
        assert {(e.task, e.fid, e.role, e.classifier) for e in measured} == {
            ("A", 55.0, "deployed", 1), ("B", 30.0, "deployed", 1)}  # with the job's classifier of cycle 1
        request = json.loads((launcher.started[-1] / "request.json").read_text())["request"]
        assert request["stage"] == "measure" and request["deployed"]["version"] == 1
        assert [task["name"] for task in request["tasks"]] == ["A", "B"]
        fired = jobs.logs("digits")[-1]
        assert fired.cycle == 2 and "A 55" in fired.message  # decided on the fresh figure
        measure_runs = [r for r in jobs.attempts("digits") if r.stage is Stage.MEASURE]
        assert [(r.cycle, r.attempt, r.status) for r in measure_runs] == [(1, 1, "completed")]


# --------------------------------------------------------------------------------- store schema


def _v1_database(path: Path) -> Path:
    script = (Path(__file__).parent / "data" / "lifelong-store-v1.sql").read_text()
    with sqlite3.connect(path) as db:
        db.executescript(script)
        db.execute("PRAGMA user_version = 1")
    db.close()
    return path


def test_a_schema_1_database_is_migrated_in_place_after_a_backup(tmp_path: Path) -> None:
    from entgan.lifelong.store import SCHEMA_VERSION, JobStore

    path = _v1_database(tmp_path / "entgan-jobs.sqlite")

    with JobStore(path) as store:
        job = store.job("digits")
        assert (job.cycle, job.failures, job.retry_at) == (1, 0, None)
        [version] = store.versions("digits")
        assert version.deployed and version.classifier is None
        assert [(e.task, e.fid, e.classifier) for e in store.evaluations("digits")] == [
            ("A", 55.5, None), ("B", 66.6, None)]
        assert store.latest_figures("digits", 1)["B"] == {"fid": 66.6, "fidelity": 0.5}
        with store.transaction() as db:  # the new parts work on the migrated file
            assert store.add_classifier(db, job, "k", [], "/c.pt", "ab" * 32, Stage.TRAIN, 2000.0) == 1
            for attempt in (1, 2):  # `measure` may complete more than once per cycle, the others may not
                run = store.start_run(db, job, Stage.MEASURE, lambda n: f"/m{n}", 2000.0)
                store.finish_run(db, run.id, "completed", 2001.0)
            store.record_failure(db, "digits", 2, 3000.0)
        assert store.job("digits").failures == 2
        with pytest.raises(sqlite3.IntegrityError):
            with store.transaction() as db:
                run = store.start_run(db, job, Stage.TRAIN, lambda n: f"/t{n}", 2002.0)
                store.finish_run(db, run.id, "completed", 2003.0)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    backup = path.with_name(path.name + ".schema-1.bak")
    with sqlite3.connect(backup) as db:  # the copy is the database as it was
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        assert db.execute("SELECT count(*) FROM evaluations").fetchone()[0] == 2
        assert "failures" not in [row[1] for row in db.execute("PRAGMA table_info(jobs)")]


def test_a_migration_that_fails_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    from entgan.config import ConfigError
    from entgan.lifelong.store import JobStore

    path = _v1_database(tmp_path / "entgan-jobs.sqlite")
    with sqlite3.connect(path) as db:  # something in the way of the migration
        db.execute("CREATE TABLE classifiers (anything TEXT)")
    db.close()

    with pytest.raises(ConfigError, match="could not migrate the jobs database from schema 1 to 2") as raised:
        JobStore(path)

    assert str(path) in str(raised.value) and "left as it was" in str(raised.value)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        assert "failures" not in [row[1] for row in db.execute("PRAGMA table_info(jobs)")]
        assert db.execute("SELECT count(*) FROM versions").fetchone()[0] == 1
    db.close()
