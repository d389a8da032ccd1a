"""Lifelong learning jobs (after KubeEdge Sedna's LifelongLearningJob): stages train -> eval -> deploy,
triggers, a knowledge base of tasks and model versions, all state in an embedded SQLite database.

The pieces, each in its own module:
- `spec`: the job's YAML, validated (errors name the field);
- `states`: stages, states and the transitions allowed between them;
- `store`: the database (jobs, transitions log, stage attempts, knowledge base);
- `triggers`: when the train stage starts (samples, time window, metric, new task; and/or);
- `edge`: tasks and their data at the edge, and the snapshot a training run reads;
- `stages` / `stage_process`: the train and eval work, in a process of its own;
- `decision`: the deploy rule;
- `controller`: the loop that drives every job;
- `api`: the Python API (`Jobs`), used by `entgan job` and `entgan kb`.
"""

from entgan.lifelong.api import Jobs, JobStatus, VersionReport, default_jobs_root
from entgan.lifelong.controller import Controller
from entgan.lifelong.spec import JobSpec, JobSpecError, load_job_spec, parse_job_spec
from entgan.lifelong.states import Reason, Stage, State
from entgan.lifelong.store import JobStore

__all__ = [
    "Controller",
    "JobSpec",
    "JobSpecError",
    "JobStatus",
    "JobStore",
    "Jobs",
    "Reason",
    "Stage",
    "State",
    "VersionReport",
    "default_jobs_root",
    "load_job_spec",
    "parse_job_spec",
]
