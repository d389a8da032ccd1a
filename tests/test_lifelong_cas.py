"""The classification accuracy score as a lifelong job's deploy criterion: the spec's validation, the
deploy rule with `metric: cas`, and the eval stage measuring it on a real snapshot's held-out images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from entgan.lifelong.decision import decide
from entgan.lifelong.spec import JobSpecError, TaskLocation, parse_job_spec

from test_export import untrained_run
from test_serve import write_images


def spec_data(root: Path, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "digits",
        "edge": {"tasks": [{"name": "A", "path": str(root / "A")}, {"name": "B", "path": str(root / "B")}],
                 "holdout": 0.3},
        "training": {"model": {"latent_dim": 8, "hidden_dim": 16, "task_embedding_dim": 4}},
        "trigger": {"conditions": [{"kind": "samples", "at_least": 5}]},
        "eval": {"samples_per_task": 20, "cas": {"samples_per_task": 10, "epochs": 1}},
        "deploy": {"metric": "cas", "tolerance": 0.0},
    }
    data.update(overrides)
    return data


@pytest.fixture
def edge(tmp_path: Path) -> Path:
    for task, classes in (("A", ["0", "1"]), ("B", ["0"])):
        for name in classes:
            write_images(tmp_path / "edge" / task / name, 20, start=100 * ord(task) + int(name) * 20)
    return tmp_path / "edge"


def test_spec_accepts_cas_and_refuses_what_cannot_be_scored(edge: Path) -> None:
    spec = parse_job_spec(spec_data(edge))
    assert spec.deploy.metric == "cas" and spec.cas.samples_per_task == 10
    assert parse_job_spec(spec_data(edge, eval={})).cas.samples_per_task == 500  # on with defaults
    assert parse_job_spec(spec_data(edge, deploy={})).cas.samples_per_task == 10  # asked for: measured
    assert parse_job_spec(spec_data(edge, eval={}, deploy={})).cas is None  # neither: not measured

    one_task = spec_data(edge, edge={"tasks": [{"name": "A", "path": str(edge / "A")}]})
    with pytest.raises(JobSpecError, match="at least 2 tasks"):
        parse_job_spec(one_task)
    with pytest.raises(JobSpecError, match=r"eval.cas.epochs"):
        parse_job_spec(spec_data(edge, eval={"cas": {"epochs": 0}}))
    with pytest.raises(JobSpecError, match=r"eval.cas.colour: unknown field"):
        parse_job_spec(spec_data(edge, eval={"cas": {"colour": 1}}))
    with pytest.raises(JobSpecError, match=r"deploy.metric"):
        parse_job_spec(spec_data(edge, deploy={"metric": "accuracy"}))


def test_deploy_rule_on_cas_prefers_higher_scores(edge: Path) -> None:
    rule = parse_job_spec(spec_data(edge)).deploy

    better = decide(rule, {"A": {"cas": 0.9}, "B": {"cas": 0.8}}, {"A": {"cas": 0.7}, "B": {"cas": 0.6}})
    worse = decide(rule, {"A": {"cas": 0.5}, "B": {"cas": 0.8}}, {"A": {"cas": 0.7}, "B": {"cas": 0.6}})

    assert better.deploy and "cas 0.9 vs 0.7" in better.message
    assert not worse.deploy and "not better on ['A']" in worse.message


@pytest.mark.slow
def test_eval_stage_measures_cas_of_both_models_on_held_out_images(edge: Path, tmp_path: Path) -> None:
    from entgan.lifelong.edge import build_snapshot
    from entgan.lifelong.stages import CandidateRef, EvalRequest, ModelRef, run_eval
    from entgan.rundir import RunDirectory

    spec = parse_job_spec(spec_data(edge))
    locations = [TaskLocation(name=t.name, path=t.path) for t in spec.edge.tasks]
    snapshot = build_snapshot(locations, spec.edge.holdout, 28, 1, tmp_path / "work" / "data")
    config = spec.training.run_config("t", [(t.name, t.labels) for t in snapshot.tasks], snapshot.train_dir, None)
    checkpoints = [RunDirectory(untrained_run(tmp_path / f"v{i}", config, seed=i)).latest_checkpoint() for i in (1, 2)]
    request = EvalRequest(
        job="digits", cycle=2, spec=spec,
        candidate=CandidateRef(version=2, checkpoint=checkpoints[1], snapshot=snapshot.as_dict()),
        deployed=ModelRef(version=1, checkpoint=checkpoints[0]), cache_dir=tmp_path / "cache",
        kb_dir=tmp_path / "knowledge-base",
    )

    result = run_eval(request, tmp_path / "work")
    again = run_eval(request, tmp_path / "work")

    for role in ("candidate", "deployed"):
        for task in ("A", "B"):
            assert 0.0 <= result[role][task]["cas"] <= 1.0
    assert result["cas"]["train_per_task"] == 10 and 0.0 <= result["cas"]["real_reference"] <= 1.0
    assert result["cas"]["test_per_task"] == {t.name: t.holdout for t in snapshot.tasks}
    assert result == again  # seeded: the same figures every time
    decision = decide(spec.deploy, result["candidate"], result["deployed"])
    assert {item.task for item in decision.tasks} == {"A", "B"} and "cas" in decision.rule
