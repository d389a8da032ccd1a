"""The deploy rule: compare a candidate with the deployed model task by task, and decide.

A pure function of the figures the eval stage measured (both models, same held-out data, same
classifier, same latents), so the rule is testable on its own and the decision can be recorded
together with every figure it was based on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from entgan.lifelong.spec import DeploySpec

Figures = Mapping[str, Mapping[str, float | None]]
"""{task: {"fid": .., "fidelity": .., "cas": ..}} ("cas" only when the eval stage measured it)"""

LOWER_IS_BETTER = {"fid": True, "fidelity": False, "cas": False}


@dataclass(frozen=True)
class TaskVerdict:
    task: str
    verdict: str
    """`better`, `within-tolerance`, `worse`, or `new` (the deployed model has no such task)."""
    candidate: float | None
    deployed: float | None
    improvement: float | None
    """Relative improvement of the candidate over the deployed model (negative: worse)."""


@dataclass(frozen=True)
class Decision:
    deploy: bool
    rule: str
    message: str
    tasks: tuple[TaskVerdict, ...]

    def figures(self) -> dict[str, Any]:
        return {"tasks": [asdict(task) for task in self.tasks]}


def relative_improvement(metric: str, candidate: float, deployed: float) -> float:
    """How much better the candidate is, relative to the deployed value (positive: better)."""
    gain = deployed - candidate if LOWER_IS_BETTER[metric] else candidate - deployed
    return gain / abs(deployed) if abs(deployed) > 1e-12 else gain


def judge_task(rule: DeploySpec, task: str, candidate: float | None, deployed: float | None) -> TaskVerdict:
    if deployed is None or (isinstance(deployed, float) and math.isnan(deployed)):
        return TaskVerdict(task, "new", candidate, None, None)
    if candidate is None or math.isnan(candidate):
        return TaskVerdict(task, "worse", candidate, deployed, None)
    improvement = relative_improvement(rule.metric, candidate, deployed)
    if improvement > 0 and improvement >= rule.min_improvement:
        verdict = "better"
    elif improvement >= -rule.tolerance:
        verdict = "within-tolerance"
    else:
        verdict = "worse"
    return TaskVerdict(task, verdict, candidate, deployed, improvement)


def _describe(verdicts: tuple[TaskVerdict, ...], metric: str) -> str:
    parts = []
    for item in verdicts:
        if item.verdict == "new":
            parts.append(f"{item.task}: new task, {metric} {_number(item.candidate)}")
        else:
            change = "" if item.improvement is None else f", {item.improvement:+.1%}"
            parts.append(
                f"{item.task}: {metric} {_number(item.candidate)} vs {_number(item.deployed)} ({item.verdict}{change})"
            )
    return "; ".join(parts)


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def decide(rule: DeploySpec, candidate: Figures, deployed: Figures | None) -> Decision:
    """Whether the candidate replaces the deployed model (see `DeploySpec` for the rule)."""
    metric = rule.metric
    rule_text = (
        f"{rule.require} on {metric}, min improvement {rule.min_improvement:g}, tolerance {rule.tolerance:g}"
    )
    verdicts = tuple(
        judge_task(rule, task, values.get(metric), None if deployed is None else deployed.get(task, {}).get(metric))
        for task, values in candidate.items()
    )
    if deployed is None:
        measured = "; ".join(f"{item.task}: {metric} {_number(item.candidate)}" for item in verdicts)
        return Decision(True, rule_text, f"deploy: nothing is deployed yet ({measured})", verdicts)
    figures = _describe(verdicts, metric)
    dropped = sorted(set(deployed) - set(candidate))
    if dropped:
        return Decision(False, rule_text, f"reject: the candidate lacks deployed tasks {dropped} ({figures})", verdicts)
    old = [item for item in verdicts if item.verdict != "new"]
    worse = [item.task for item in old if item.verdict == "worse"]
    better = [item.task for item in old if item.verdict == "better"]
    new = [item.task for item in verdicts if item.verdict == "new"]
    if new:
        deploy = not worse
        forgetting = f"old tasks {worse} got worse" if worse else "no old task got worse"
        why = f"adds tasks {new}; {forgetting} beyond the tolerance"
    elif rule.require == "every-task":
        deploy = len(better) == len(old)
        laggards = [item.task for item in old if item.verdict != "better"]
        why = "better on every task" if deploy else f"not better on {laggards}"
    else:
        deploy = bool(better) and not worse
        why = (
            f"better on {better}, none worse" if deploy
            else (f"worse on {worse}" if worse else "better on no task")
        )
    return Decision(deploy, rule_text, f"{'deploy' if deploy else 'reject'}: {why} ({figures})", verdicts)
