"""Seeded, deterministic partitioners of item indices across parts (workers).

Pure functions of their arguments: every process that calls one with the same seed gets the same
split, so ranks agree on who holds what without communicating. Each item lands in exactly one
part. Randomness comes from a `numpy.random.Generator` built from the seed alone.
"""

from __future__ import annotations

import numpy as np

from entgan.data.errors import DataError

__all__ = ["dirichlet_partition", "iid_partition", "shard_partition"]


def _check_parts(num_items: int, num_parts: int, need_per_part: int = 1) -> None:
    if num_parts < 1:
        raise DataError(f"num_parts must be >= 1, found {num_parts}")
    if num_items < num_parts * need_per_part:
        raise DataError(
            f"cannot give {num_parts} parts at least {need_per_part} item(s) each from {num_items} items"
        )


def iid_partition(num_items: int, num_parts: int, seed: int) -> list[np.ndarray]:
    """Shuffle `range(num_items)` and cut it into `num_parts` parts whose sizes differ by <= 1.

    Parts keep the shuffled order. Fewer items than parts leaves some parts empty (callers that
    need non-empty parts check sizes first).
    """
    if num_parts < 1:
        raise DataError(f"num_parts must be >= 1, found {num_parts}")
    order = np.random.default_rng(seed).permutation(num_items).astype(np.int64)
    return list(np.array_split(order, num_parts))


def dirichlet_partition(
    labels: np.ndarray,
    num_parts: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    max_retries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided among parts in Dirichlet(alpha) proportions.

    Small `alpha` concentrates each class on few parts (strong non-IID skew); large `alpha`
    approaches an even split. Draws are repeated until every part holds at least `min_size`
    items; after `max_retries` failed draws a `DataError` says how to relax the request.
    Indices within a part are ascending.
    """
    labels = np.asarray(labels)
    if alpha <= 0:
        raise DataError(f"dirichlet alpha must be > 0, found {alpha}")
    _check_parts(len(labels), num_parts, min_size)
    rng = np.random.default_rng(seed)
    class_members = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    smallest = 0
    for _ in range(max_retries):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_parts)]
        for members in class_members:
            shuffled = rng.permutation(members)
            proportions = rng.dirichlet(np.full(num_parts, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(shuffled)).astype(np.int64)
            for part, piece in enumerate(np.split(shuffled, cuts)):
                buckets[part].append(piece)
        parts = [np.sort(np.concatenate(pieces)).astype(np.int64) for pieces in buckets]
        smallest = min(len(part) for part in parts)
        if smallest >= min_size:
            return parts
    raise DataError(
        f"dirichlet partition (alpha={alpha}) of {len(labels)} items over {num_parts} parts left a part "
        f"with {smallest} < min_size={min_size} items in each of {max_retries} draws; "
        f"raise dirichlet_alpha, use fewer workers, or use the 'iid' partition"
    )


def shard_partition(labels: np.ndarray, num_parts: int, shards_per_part: int, seed: int) -> list[np.ndarray]:
    """The classic 'shards' split: sort by label, cut into equal shards, deal shards at random.

    With few shards per part, each part sees only a few classes. Items within a label are
    shuffled before sorting (stable), so which items form a shard also depends on the seed.
    Indices within a part are ascending.
    """
    labels = np.asarray(labels)
    if shards_per_part < 1:
        raise DataError(f"shards_per_part must be >= 1, found {shards_per_part}")
    _check_parts(len(labels), num_parts, shards_per_part)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, num_parts * shards_per_part)
    dealt = rng.permutation(len(shards)).reshape(num_parts, shards_per_part)
    return [np.sort(np.concatenate([shards[s] for s in row])).astype(np.int64) for row in dealt]
