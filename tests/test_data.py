"""Tests for entgan.data: partitioners, sources (mnist-subset, IDX, image folders), tasks and shards."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from entgan.config import DataConfig, RunConfig, parse_config
from entgan.data import (
    DataError,
    ImageDataset,
    build_tasks,
    dirichlet_partition,
    iid_partition,
    load_source,
    load_worker_shard,
    shard_partition,
    worker_shards,
)

# --------------------------------------------------------------------------- helpers


def _assert_exact_cover(parts: list[np.ndarray], num_items: int) -> None:
    combined = np.concatenate(parts)
    assert len(combined) == num_items
    assert np.array_equal(np.sort(combined), np.arange(num_items))


def _labels(num_classes: int = 10, per_class: int = 50) -> np.ndarray:
    return np.repeat(np.arange(num_classes), per_class)


def _toy_dataset(num_classes: int = 4, per_class: int = 6, size: int = 8) -> ImageDataset:
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = torch.linspace(-1, 1, len(labels) * size * size).reshape(len(labels), 1, size, size)
    return ImageDataset(images=images, labels=labels, name="toy")


def _write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """Write `array` (uint8) as an IDX file, optionally with a wrong magic number, gzipped for .gz."""
    magic = (0x08 << 8 | array.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def _tiny_idx(num: int = 6, side: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(num, side, side), dtype=np.uint8)
    labels = (np.arange(num) % 3).astype(np.uint8)
    return images, labels


def _run_config(tasks: list[dict], **extra: object) -> RunConfig:
    return parse_config({"tasks": tasks, "data": {"source": "mnist-subset", "max_per_class": 40}, **extra})


# --------------------------------------------------------------------------- partitioners


@pytest.mark.parametrize("num_items, num_parts", [(10, 3), (100, 7), (5, 5), (1, 1)])
def test_iid_partition_covers_every_index_once_with_balanced_sizes(num_items: int, num_parts: int) -> None:
    parts = iid_partition(num_items, num_parts, seed=3)

    assert len(parts) == num_parts
    _assert_exact_cover(parts, num_items)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_partition_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    first = iid_partition(200, 4, seed=11)
    again = iid_partition(200, 4, seed=11)
    other = iid_partition(200, 4, seed=12)

    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_dirichlet_partition_covers_every_index_once_and_respects_min_size() -> None:
    labels = _labels()

    parts = dirichlet_partition(labels, num_parts=5, alpha=0.5, seed=1, min_size=20)

    _assert_exact_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 20


def test_dirichlet_partition_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    labels = _labels()

    first = dirichlet_partition(labels, 4, alpha=0.5, seed=5)
    again = dirichlet_partition(labels, 4, alpha=0.5, seed=5)
    other = dirichlet_partition(labels, 4, alpha=0.5, seed=6)

    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def _mean_label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean over parts of the total-variation distance between part and global label histograms."""
    classes = np.unique(labels)
    global_hist = np.array([(labels == c).mean() for c in classes])
    distances = []
    for part in parts:
        part_hist = np.array([(labels[part] == c).mean() for c in classes])
        distances.append(0.5 * np.abs(part_hist - global_hist).sum())
    return float(np.mean(distances))


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha() -> None:
    labels = _labels(num_classes=10, per_class=100)

    skewed = _mean_label_skew(labels, dirichlet_partition(labels, 5, alpha=0.1, seed=0))
    even = _mean_label_skew(labels, dirichlet_partition(labels, 5, alpha=100.0, seed=0))

    assert skewed > 0.4
    assert even < 0.1
    assert skewed > 4 * even


def test_dirichlet_partition_gives_up_with_a_clear_error() -> None:
    labels = np.zeros(50, dtype=np.int64)  # one class, tiny alpha: nearly all items go to one part

    with pytest.raises(DataError, match="dirichlet_alpha"):
        dirichlet_partition(labels, num_parts=4, alpha=0.001, seed=0, min_size=10, max_retries=5)


def test_partitioners_reject_more_parts_than_items() -> None:
    with pytest.raises(DataError, match="3 items"):
        dirichlet_partition(np.arange(3), num_parts=4, alpha=1.0, seed=0)


def test_shard_partition_covers_every_index_and_limits_classes_per_part() -> None:
    labels = _labels(num_classes=10, per_class=30)

    parts = shard_partition(labels, num_parts=5, shards_per_part=2, seed=0)

    _assert_exact_cover(parts, len(labels))
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    assert all(np.array_equal(a, b) for a, b in zip(parts, shard_partition(labels, 5, 2, seed=0)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, shard_partition(labels, 5, 2, seed=1)))


# --------------------------------------------------------------------------- ImageDataset


def test_image_dataset_subset_select_labels_classes_and_fingerprint() -> None:
    dataset = _toy_dataset()

    picked = dataset.subset([0, 7, 13])
    only_odd = dataset.select_labels([1, 3])

    assert len(picked) == 3 and picked.labels.tolist() == [0, 1, 2]
    assert only_odd.classes() == [1, 3] and len(only_odd) == 12
    assert dataset.classes() == [0, 1, 2, 3]
    assert dataset.fingerprint() == _toy_dataset().fingerprint()
    assert dataset.fingerprint() != picked.fingerprint()
    assert len(dataset.fingerprint()) == 16


def test_image_dataset_rejects_wrong_dtypes() -> None:
    with pytest.raises(DataError, match="float32"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.int64), "bad")


# --------------------------------------------------------------------------- built-in sources


def test_mnist_subset_loads_5000_images_in_model_range() -> None:
    dataset = load_source(DataConfig(source="mnist-subset"))

    assert dataset.images.shape == (5000, 1, 28, 28)
    assert dataset.images.dtype == torch.float32 and dataset.labels.dtype == torch.int64
    assert dataset.images.min() == -1.0 and dataset.images.max() == 1.0
    assert dataset.classes() == list(range(10))
    assert torch.bincount(dataset.labels).tolist() == [500] * 10


def test_mnist_subset_resizes_to_32_with_3_channels_and_caps_per_class() -> None:
    dataset = load_source(DataConfig(source="mnist-subset", image_size=32, channels=3, max_per_class=7))

    assert dataset.images.shape == (70, 3, 32, 32)
    assert torch.equal(dataset.images[:, 0], dataset.images[:, 2])
    assert dataset.images.min() >= -1.0 and dataset.images.max() <= 1.0


def test_max_per_class_keeps_the_first_items_of_each_class_in_order() -> None:
    full = load_source(DataConfig(source="mnist-subset"))

    capped = load_source(DataConfig(source="mnist-subset", max_per_class=3))

    expected = torch.cat([torch.nonzero(full.labels == c).flatten()[:3] for c in range(10)]).sort().values
    assert torch.equal(capped.images, full.images[expected])


def test_sklearn_digits_is_upsampled_to_the_configured_size() -> None:
    dataset = load_source(DataConfig(source="sklearn-digits", image_size=28))

    assert dataset.images.shape == (1797, 1, 28, 28)
    assert dataset.images.min() >= -1.0 and dataset.images.max() <= 1.0


# --------------------------------------------------------------------------- IDX source


def test_idx_round_trip_plain_and_gzipped_agree(tmp_path: Path) -> None:
    images, labels = _tiny_idx()
    for folder, suffix in (("plain", ""), ("gz", ".gz")):
        (tmp_path / folder).mkdir()
        _write_idx(tmp_path / folder / f"t10k-images-idx3-ubyte{suffix}", images)
        _write_idx(tmp_path / folder / f"t10k-labels-idx1-ubyte{suffix}", labels)

    plain = load_source(DataConfig(source="idx", path=tmp_path / "plain", split="test", image_size=28))
    gzipped = load_source(DataConfig(source="idx", path=tmp_path / "gz", split="test", image_size=28))

    assert plain.images.shape == (6, 1, 28, 28)
    assert plain.labels.tolist() == labels.tolist()
    assert plain.images.min() >= -1.0 and plain.images.max() <= 1.0
    assert plain.fingerprint() == gzipped.fingerprint()


def test_idx_at_native_size_keeps_exact_pixel_values(tmp_path: Path) -> None:
    images, labels = _tiny_idx(side=28)
    _write_idx(tmp_path / "train-images-idx3-ubyte", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels)

    dataset = load_source(DataConfig(source="idx", path=tmp_path))

    expected = torch.from_numpy(images).float().div(255).mul(2).sub(1).unsqueeze(1)
    assert torch.allclose(dataset.images, expected, atol=1e-6)


def test_idx_bad_magic_names_the_file(tmp_path: Path) -> None:
    images, labels = _tiny_idx()
    _write_idx(tmp_path / "train-images-idx3-ubyte", images, magic=0x00000999)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels)

    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*magic"):
        load_source(DataConfig(source="idx", path=tmp_path))


def test_idx_missing_file_names_the_file(tmp_path: Path) -> None:
    images, _ = _tiny_idx()
    _write_idx(tmp_path / "train-images-idx3-ubyte", images)

    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        load_source(DataConfig(source="idx", path=tmp_path))


def test_idx_count_mismatch_is_reported(tmp_path: Path) -> None:
    images, labels = _tiny_idx(num=6)
    _write_idx(tmp_path / "train-images-idx3-ubyte", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:4])

    with pytest.raises(DataError, match="6 images but .* 4 labels"):
        load_source(DataConfig(source="idx", path=tmp_path))


def test_idx_truncated_payload_is_reported(tmp_path: Path) -> None:
    images, labels = _tiny_idx()
    images_path = tmp_path / "train-images-idx3-ubyte"
    _write_idx(images_path, images)
    images_path.write_bytes(images_path.read_bytes()[:-3])
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels)

    with pytest.raises(DataError, match="train-images-idx3-ubyte.*data bytes"):
        load_source(DataConfig(source="idx", path=tmp_path))


def test_missing_data_directory_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does-not-exist"):
        load_source(DataConfig(source="idx", path=tmp_path / "does-not-exist"))


# --------------------------------------------------------------------------- image-folder source


def _write_png_folder(root: Path, per_class: int = 2) -> None:
    for name, shade in (("cats", 40), ("dogs", 200)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (10, 12), (shade, shade, shade)).save(root / name / f"{i}.png")


def test_image_folder_round_trip(tmp_path: Path) -> None:
    _write_png_folder(tmp_path)
    (tmp_path / "cats" / "notes.txt").write_text("ignored")

    dataset = load_source(DataConfig(source="image-folder", path=tmp_path, image_size=32, channels=3))

    assert dataset.images.shape == (4, 3, 32, 32)
    assert dataset.labels.tolist() == [0, 0, 1, 1]
    assert torch.allclose(dataset.images[0], torch.full((3, 32, 32), 40 / 255 * 2 - 1), atol=1e-5)
    assert torch.allclose(dataset.images[3], torch.full((3, 32, 32), 200 / 255 * 2 - 1), atol=1e-5)


def test_image_folder_unreadable_image_names_the_file(tmp_path: Path) -> None:
    _write_png_folder(tmp_path)
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not a png")

    with pytest.raises(DataError, match="broken.png"):
        load_source(DataConfig(source="image-folder", path=tmp_path))


def test_image_of_another_size_is_an_error_when_resizing_is_off(tmp_path: Path) -> None:
    _write_png_folder(tmp_path)

    with pytest.raises(DataError, match=r"0\.png: image is 10x12, the model expects 28x28 \(data.image_size\)"):
        load_source(DataConfig(source="image-folder", path=tmp_path, resize=False))


def test_shipped_subset_of_another_size_is_an_error_when_resizing_is_off() -> None:
    with pytest.raises(DataError, match="images are 28x28, the model expects 32x32"):
        load_source(DataConfig(source="mnist-subset", image_size=32, resize=False))


def test_image_folder_class_without_images_names_the_folder(tmp_path: Path) -> None:
    _write_png_folder(tmp_path)
    (tmp_path / "empty").mkdir()

    with pytest.raises(DataError, match="empty"):
        load_source(DataConfig(source="image-folder", path=tmp_path))


# --------------------------------------------------------------------------- tasks and worker shards


def test_build_tasks_keeps_only_each_tasks_labels() -> None:
    cfg = _run_config([{"name": "low", "labels": [0, 1]}, {"name": "high", "labels": [8, 9, 7]}])
    source = load_source(cfg.data)

    tasks = build_tasks(cfg, source)

    assert [(t.name, t.index, t.labels) for t in tasks] == [("low", 0, (0, 1)), ("high", 1, (8, 9, 7))]
    assert tasks[0].dataset.classes() == [0, 1] and len(tasks[0].dataset) == 80
    assert tasks[1].dataset.classes() == [7, 8, 9] and len(tasks[1].dataset) == 120


def test_build_tasks_reports_missing_labels() -> None:
    cfg = _run_config([{"name": "ghost", "labels": [3, 42]}])
    source = load_source(cfg.data)

    with pytest.raises(DataError, match=r"'ghost'.*\[42\].*available labels"):
        build_tasks(cfg, source)


def test_worker_shards_give_each_worker_a_disjoint_share_of_its_task() -> None:
    cfg = _run_config(
        [
            {"name": "a", "labels": [0, 1], "workers": 2},
            {"name": "b", "labels": [2, 3, 4], "workers": 3, "partition": "dirichlet",
             "dirichlet_alpha": 0.3},
        ],
        seed=7,
    )
    tasks = build_tasks(cfg, load_source(cfg.data))

    shards = worker_shards(cfg, tasks)

    assert len(shards) == cfg.num_workers == 5
    assert all(len(s) > 0 for s in shards)
    assert all(set(s.classes()) <= {0, 1} for s in shards[:2])
    assert all(set(s.classes()) <= {2, 3, 4} for s in shards[2:])
    assert sum(len(s) for s in shards[:2]) == len(tasks[0].dataset)
    assert sum(len(s) for s in shards[2:]) == len(tasks[1].dataset)
    assert abs(len(shards[0]) - len(shards[1])) <= 1


def test_worker_shards_are_reproducible_and_load_worker_shard_matches() -> None:
    cfg = _run_config(
        [{"name": "a", "labels": [5, 6], "workers": 2}, {"name": "b", "labels": [1], "workers": 1}]
    )
    tasks = build_tasks(cfg, load_source(cfg.data))

    shards = worker_shards(cfg, tasks)
    again = worker_shards(cfg, tasks)

    assert [s.fingerprint() for s in shards] == [s.fingerprint() for s in again]
    assert load_worker_shard(cfg, 2).fingerprint() == shards[1].fingerprint()
    with pytest.raises(DataError, match="1..3"):
        load_worker_shard(cfg, 0)


def test_worker_shards_reject_a_task_with_fewer_images_than_workers() -> None:
    cfg = parse_config(
        {
            "data": {"source": "mnist-subset", "max_per_class": 2},
            "tasks": [{"name": "tiny", "labels": [0], "workers": 3}],
        }
    )
    tasks = build_tasks(cfg, load_source(cfg.data))

    with pytest.raises(DataError, match="'tiny' has 2 images but 3 workers"):
        worker_shards(cfg, tasks)
