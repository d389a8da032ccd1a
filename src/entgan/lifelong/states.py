"""Stages and states of a lifelong learning job, and the transitions allowed between them.

A job is always in exactly one (stage, state). Each stage goes

    Waiting -> Ready -> Starting -> Running -> Completed | Failed

and then hands over to the next stage's Waiting:

    train Completed  -> eval Waiting
    eval Completed   -> deploy Waiting (candidate accepted) | train Waiting (candidate rejected)
    deploy Completed -> train Waiting
    any Failed       -> train Waiting  (the job goes back to waiting for its trigger, as in Sedna;
                                        after a failure the next trigger check backs off)

and, when a metric trigger needs the deployed model's figures and they are older than the
condition's `max_age_s`, the deployed model is measured again (on the edge's held-out images of
now) before the trigger decides, in a stage of its own that starts no new cycle:

    train Waiting    -> measure Waiting
    measure Completed -> train Waiting (and the trigger is evaluated on the fresh figures)

A stage found Starting or Running by a controller that has just started was interrupted (the
previous controller died); it goes back to Ready and is started again, into a fresh directory.
Every transition is stored with a reason (a CamelCase word a program can match) and a message
(a sentence for a person, with the figures that led to it).
"""

from __future__ import annotations

from enum import Enum


class Stage(str, Enum):
    TRAIN = "train"
    EVAL = "eval"
    DEPLOY = "deploy"
    MEASURE = "measure"
    """The deployed model measured again for a metric trigger (same work as an eval)."""


class State(str, Enum):
    WAITING = "Waiting"
    READY = "Ready"
    STARTING = "Starting"
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"


class Reason:
    """The reasons transitions are recorded with."""

    JOB_CREATED = "JobCreated"
    TRIGGER_FIRED = "TriggerFired"
    STAGE_READY = "StageReady"
    CANDIDATE_ACCEPTED = "CandidateAccepted"
    CANDIDATE_REJECTED = "CandidateRejected"
    LAUNCHING = "Launching"
    PROCESS_STARTED = "ProcessStarted"
    SUCCEEDED = "StageSucceeded"
    PROCESS_FAILED = "ProcessFailed"
    LAUNCH_FAILED = "LaunchFailed"
    DEPLOY_FAILED = "DeployFailed"
    CONTROLLER_RESTARTED = "ControllerRestarted"
    MODEL_TRAINED = "ModelTrained"
    MODEL_DEPLOYED = "ModelDeployed"
    STAGE_FAILED = "StageFailed"
    FIGURES_STALE = "FiguresStale"
    DEPLOYED_MEASURED = "DeployedMeasured"


class InvalidTransition(ValueError):
    """A transition the state machine does not allow (a bug, or a job changed under our feet)."""


_WITHIN_STAGE: dict[State, frozenset[State]] = {
    State.WAITING: frozenset({State.READY}),
    State.READY: frozenset({State.STARTING}),
    State.STARTING: frozenset({State.RUNNING, State.FAILED, State.READY}),
    State.RUNNING: frozenset({State.COMPLETED, State.FAILED, State.READY}),
    State.COMPLETED: frozenset(),
    State.FAILED: frozenset(),
}

_NEXT_STAGES: dict[tuple[Stage, State], frozenset[Stage]] = {
    (Stage.TRAIN, State.COMPLETED): frozenset({Stage.EVAL}),
    (Stage.EVAL, State.COMPLETED): frozenset({Stage.DEPLOY, Stage.TRAIN}),
    (Stage.DEPLOY, State.COMPLETED): frozenset({Stage.TRAIN}),
    (Stage.TRAIN, State.FAILED): frozenset({Stage.TRAIN}),
    (Stage.EVAL, State.FAILED): frozenset({Stage.TRAIN}),
    (Stage.DEPLOY, State.FAILED): frozenset({Stage.TRAIN}),
    (Stage.TRAIN, State.WAITING): frozenset({Stage.MEASURE}),
    (Stage.MEASURE, State.COMPLETED): frozenset({Stage.TRAIN}),
    (Stage.MEASURE, State.FAILED): frozenset({Stage.TRAIN}),
}

ACTIVE_STATES = frozenset({State.STARTING, State.RUNNING})
"""States in which a stage's work may be under way (a process may exist)."""


def check_transition(stage: Stage, state: State, new_stage: Stage, new_state: State) -> None:
    """Raise InvalidTransition unless (stage, state) -> (new_stage, new_state) is allowed."""
    if new_stage == stage and new_state in _WITHIN_STAGE[state]:
        return
    if new_state == State.WAITING and new_stage in _NEXT_STAGES.get((stage, state), frozenset()):
        return
    raise InvalidTransition(f"{stage.value}/{state.value} -> {new_stage.value}/{new_state.value} is not allowed")
