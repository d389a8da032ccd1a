"""Figures over seeds: medians with interquartile ranges, and paired ratios with confidence intervals.

A bench with reporting `seeds` runs every row once per seed. Two methods run on the same seed
share the data split, the initial models' seed and the domain classifier, so their figures are
compared pair by pair: the ratio row / reference on each seed, summarised by the geometric mean of
the ratios, with a percentile bootstrap 95% confidence interval over seeds and a Wilcoxon
signed-rank p-value of the log-ratios (both say how sure the comparison is with so few seeds).

Censoring: a run that never reached the target has no time to target, only a lower bound (its
budget, or on an edge clock its last replayed round). Its bound is used and the summary counts it;
a ratio whose seeds include censored runs is a bound too, which the report says.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Observation:
    """One seed's figure: a value, or a lower bound where the run was censored (never reached)."""

    value: float
    censored: bool = False


@dataclass(frozen=True)
class Spread:
    """Median and interquartile range over seeds."""

    n: int
    median: float
    q1: float
    q3: float
    censored: int
    """Seeds whose value is only a lower bound."""

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class PairedRatio:
    """Row / reference over the seeds both ran."""

    n: int
    geometric_mean: float
    ci_low: float
    ci_high: float
    wilcoxon_p: float | None
    censored: int
    """Seeds where the row or the reference was censored (the ratio is then a bound)."""

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def spread(observations: Sequence[Observation]) -> Spread | None:
    """Median and quartiles (linear interpolation) of the observations' values; None if none."""
    if not observations:
        return None
    values = np.array([observation.value for observation in observations], dtype=float)
    q1, median, q3 = np.quantile(values, [0.25, 0.5, 0.75])
    return Spread(
        n=len(values),
        median=float(median),
        q1=float(q1),
        q3=float(q3),
        censored=sum(observation.censored for observation in observations),
    )


def paired_ratio(
    row: Mapping[int, Observation],
    reference: Mapping[int, Observation],
    resamples: int = BOOTSTRAP_RESAMPLES,
    random_seed: int = 0,
) -> PairedRatio | None:
    """The ratio row / reference over the seeds both have, or None with fewer than two such seeds
    or a non-positive value (a ratio of zero or less has no logarithm)."""
    seeds = sorted(set(row) & set(reference))
    if len(seeds) < 2:
        return None
    numerators = np.array([row[seed].value for seed in seeds], dtype=float)
    denominators = np.array([reference[seed].value for seed in seeds], dtype=float)
    if (numerators <= 0).any() or (denominators <= 0).any():
        return None
    log_ratios = np.log(numerators / denominators)
    generator = np.random.default_rng(random_seed)
    picks = generator.integers(0, len(seeds), size=(resamples, len(seeds)))
    means = log_ratios[picks].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return PairedRatio(
        n=len(seeds),
        geometric_mean=float(math.exp(log_ratios.mean())),
        ci_low=float(math.exp(low)),
        ci_high=float(math.exp(high)),
        wilcoxon_p=wilcoxon_p(log_ratios),
        censored=sum(row[seed].censored or reference[seed].censored for seed in seeds),
    )


def wilcoxon_p(differences: np.ndarray) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (None when all are zero)."""
    if not np.any(differences != 0):
        return None
    from scipy.stats import wilcoxon  # scipy comes with torchmetrics; imported only where used

    return float(wilcoxon(differences).pvalue)
