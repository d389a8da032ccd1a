"""Quality metrics (FID in a domain classifier's feature space, task fidelity) and cost probes."""

from entgan.metrics.classifier import (
    ARCHITECTURE_VERSION,
    DomainClassifier,
    classifier_accuracy,
    classifier_cache_key,
    train_domain_classifier,
)
from entgan.metrics.probes import PeakRSSMonitor, Stopwatch, current_rss_bytes
from entgan.metrics.quality import ClassifierFeatures, QualityEvaluator, QualityReport

__all__ = [
    "ARCHITECTURE_VERSION",
    "ClassifierFeatures",
    "DomainClassifier",
    "PeakRSSMonitor",
    "QualityEvaluator",
    "QualityReport",
    "Stopwatch",
    "classifier_accuracy",
    "classifier_cache_key",
    "current_rss_bytes",
    "train_domain_classifier",
]
