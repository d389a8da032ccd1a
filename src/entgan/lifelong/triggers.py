"""Triggers: when a job's train stage moves from Waiting to Ready.

Pure functions of an `Observation` (what the controller saw at the edge and in the knowledge base
at one moment), so every condition and combination is testable without files or processes. Each
evaluation returns a `Verdict` tree that says not only whether the trigger fired but why, with the
figures; the controller stores it with the job, so `entgan job status` can show the last check.

Two more decisions live here, as pure functions too: whether the deployed model's figures are too
old for a metric condition and must be measured again before the trigger decides
(`remeasure_reason`), and how long a job backs off after failed stages (`retry_delay`).
"""

from __future__ import annotations

import datetime
import math
import operator as operators
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from entgan.lifelong.spec import (
    Condition,
    GroupCondition,
    MetricCondition,
    NewTaskCondition,
    SamplesCondition,
    TriggerSpec,
    WindowCondition,
)

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">": operators.gt,
    ">=": operators.ge,
    "<": operators.lt,
    "<=": operators.le,
    "==": operators.eq,
    "!=": operators.ne,
}


@dataclass(frozen=True)
class Observation:
    """What a trigger check sees."""

    now: float
    """Seconds since the epoch."""
    samples: Mapping[str, int]
    """Samples now present at each task's edge location."""
    trained_samples: Mapping[str, int | None]
    """Samples each task had when it was last trained (missing or None: never trained)."""
    deployed_figures: Mapping[str, Mapping[str, float | None]] | None = None
    """The deployed model's most recent per-task figures ({task: {"fid": .., "fidelity": ..}}),
    None when nothing is deployed."""
    deployed_measured_at: Mapping[str, float] | None = None
    """When each of those figures was measured (seconds since the epoch)."""
    deployed_tasks: tuple[str, ...] = ()
    """The deployed model's tasks (a task without a figure has no age: it is stale)."""

    def new_samples(self, task: str) -> int:
        """Samples that arrived since the task was last trained (all of them for a new task)."""
        return max(0, self.samples[task] - (self.trained_samples.get(task) or 0))


@dataclass(frozen=True)
class Verdict:
    """The outcome of one condition (or combination), with a one-line reason and its parts."""

    fired: bool
    detail: str
    parts: tuple[Verdict, ...] = field(default=())

    def describe(self, indent: int = 0) -> str:
        lines = [f"{'  ' * indent}[{'yes' if self.fired else 'no'}] {self.detail}"]
        lines.extend(part.describe(indent + 1) for part in self.parts)
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"fired": self.fired, "detail": self.detail, "parts": [part.as_dict() for part in self.parts]}


def check_due(last_check_at: float | None, period_s: float, now: float) -> bool:
    """Whether a job's trigger should be evaluated now: never checked, or `period_s` has passed."""
    return last_check_at is None or now - last_check_at >= period_s


def retry_delay(check_period_s: float, failures: int, max_delay_s: float) -> float:
    """How long after its last failure a job waits before its next attempt: `check_period_s * 2**failures`
    for `failures` failures in a row, at most `max_delay_s` (and never less than one check period)."""
    if failures <= 0:
        return check_period_s
    return min(check_period_s * 2.0 ** min(failures, 64), max(max_delay_s, check_period_s))


def evaluate_trigger(
    trigger: TriggerSpec, observation: Observation, assumed: Mapping[int, bool] | None = None
) -> Verdict:
    """The trigger's verdict. `assumed`: {id(condition): outcome} for conditions to take as given
    instead of evaluating them (`remeasure_reason` asks "what if this figure were either way")."""
    return _combine(trigger.combine, [evaluate(condition, observation, assumed) for condition in trigger.conditions])


def evaluate(condition: Condition, observation: Observation, assumed: Mapping[int, bool] | None = None) -> Verdict:
    if assumed and id(condition) in assumed:
        return Verdict(assumed[id(condition)], "assumed")
    if isinstance(condition, SamplesCondition):
        return _samples(condition, observation)
    if isinstance(condition, WindowCondition):
        return _window(condition, observation.now)
    if isinstance(condition, MetricCondition):
        return _metric(condition, observation)
    if isinstance(condition, NewTaskCondition):
        return _new_task(observation)
    if isinstance(condition, GroupCondition):
        return _combine(condition.combine, [evaluate(part, observation, assumed) for part in condition.conditions])
    raise TypeError(f"unknown trigger condition {condition!r}")


def metric_conditions(conditions: list[Condition]) -> list[MetricCondition]:
    """Every metric condition, groups included."""
    found: list[MetricCondition] = []
    for condition in conditions:
        if isinstance(condition, MetricCondition):
            found.append(condition)
        elif isinstance(condition, GroupCondition):
            found.extend(metric_conditions(condition.conditions))
    return found


def stale_figures(condition: MetricCondition, observation: Observation) -> dict[str, float | None]:
    """The deployed tasks `condition` reads whose figure is older than its `max_age_s`, with their
    age in seconds (None: never measured). Empty when the condition takes figures of any age or
    nothing is deployed. Only tasks with data at the edge count: the others cannot be measured
    again, and would ask for a measurement at every check."""
    if condition.max_age_s is None or observation.deployed_figures is None:
        return {}
    measured = observation.deployed_measured_at or {}
    tasks = observation.deployed_tasks or tuple(sorted(observation.deployed_figures))
    tasks = tuple(task for task in tasks if observation.samples.get(task, 0) > 0)
    if condition.task not in ("any", "every"):
        tasks = tuple(task for task in tasks if task == condition.task)
    stale: dict[str, float | None] = {}
    for task in tasks:
        at = measured.get(task)
        age = None if at is None else observation.now - at
        if age is None or age > condition.max_age_s:
            stale[task] = age
    return stale


def remeasure_reason(trigger: TriggerSpec, observation: Observation) -> str | None:
    """Why the deployed model must be measured again before the trigger decides, or None.

    It must when a metric condition with `max_age_s` would read a figure older than that, and the
    verdict depends on it: the trigger is evaluated with those conditions taken as true and as
    false (and/or are monotone, so any other outcome lies between); if both agree (say a sample
    condition fires anyway, or the time window is closed), measuring would change nothing.
    """
    stale = [
        (condition, ages) for condition in metric_conditions(trigger.conditions)
        if (ages := stale_figures(condition, observation))
    ]
    if not stale:
        return None
    if_true = evaluate_trigger(trigger, observation, {id(condition): True for condition, _ in stale})
    if_false = evaluate_trigger(trigger, observation, {id(condition): False for condition, _ in stale})
    if if_true.fired == if_false.fired:
        return None
    parts = []
    for condition, ages in stale:
        shown = ", ".join(f"{task} {'never measured' if age is None else f'{age:.0f} s old'}" for task, age in ages.items())
        parts.append(f"{condition.metric} {condition.operator} {condition.threshold:g} (max age "
                     f"{condition.max_age_s:g} s): {shown}")
    return "the deployed model's figures are too old for the metric trigger: " + "; ".join(parts)


def _combine(combine: str, parts: list[Verdict]) -> Verdict:
    fired = all(part.fired for part in parts) if combine == "and" else any(part.fired for part in parts)
    return Verdict(fired, f"{combine} of {len(parts)} condition{'s' if len(parts) != 1 else ''}", tuple(parts))


def _samples(condition: SamplesCondition, observation: Observation) -> Verdict:
    new = {task: observation.new_samples(task) for task in sorted(observation.samples)}
    counts = ", ".join(f"{task} +{count}" for task, count in new.items()) or "no tasks at the edge"
    if condition.scope == "total":
        total = sum(new.values())
        return Verdict(total >= condition.at_least, f"new samples in total {total} >= {condition.at_least} ({counts})")
    ready = [task for task, count in new.items() if count >= condition.at_least]
    detail = f"new samples per task >= {condition.at_least}: {counts}"
    return Verdict(bool(ready), detail + (f"; reached by {', '.join(ready)}" if ready else ""))


def minutes_of_day(clock: str) -> int:
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


def in_window(start: str, end: str, moment: datetime.datetime) -> bool:
    """Whether `moment`'s time of day lies in [start, end); a window with end < start spans midnight."""
    now, begin, finish = moment.hour * 60 + moment.minute, minutes_of_day(start), minutes_of_day(end)
    if begin < finish:
        return begin <= now < finish
    return now >= begin or now < finish


def _window(condition: WindowCondition, now: float) -> Verdict:
    moment = (
        datetime.datetime.fromtimestamp(now, tz=datetime.timezone.utc)
        if condition.utc
        else datetime.datetime.fromtimestamp(now)
    )
    zone = " UTC" if condition.utc else ""
    inside = in_window(condition.start, condition.end, moment)
    return Verdict(inside, f"time {moment:%H:%M}{zone} in daily window {condition.start}-{condition.end}{zone}")


def _metric(condition: MetricCondition, observation: Observation) -> Verdict:
    rule = f"deployed {condition.metric} {condition.operator} {condition.threshold:g}"
    figures = observation.deployed_figures
    if figures is None:
        return Verdict(False, f"{rule}: no model is deployed yet")
    tasks = sorted(figures) if condition.task in ("any", "every") else [condition.task]
    compare = _COMPARE[condition.operator]
    results: dict[str, bool] = {}
    shown: list[str] = []
    for task in tasks:
        value = figures.get(task, {}).get(condition.metric)
        if value is None or math.isnan(value):
            results[task] = False
            shown.append(f"{task} has no figure")
            continue
        results[task] = compare(value, condition.threshold)
        shown.append(f"{task} {value:.4g}")
    if not results:
        fired = False
    elif condition.task == "every":
        fired = all(results.values())
    else:
        fired = any(results.values())
    scope = f" for {condition.task} task" if condition.task in ("any", "every") else ""
    return Verdict(fired, f"{rule}{scope}: {', '.join(shown) or 'no figures'}")


def _new_task(observation: Observation) -> Verdict:
    unseen = sorted(
        task for task, count in observation.samples.items()
        if count > 0 and observation.trained_samples.get(task) is None
    )
    if unseen:
        return Verdict(True, f"tasks never trained: {', '.join(unseen)}")
    return Verdict(False, "no task that was never trained")
