"""Reader for the IDX format of MNIST and Fashion-MNIST, parsed with numpy alone.

IDX layout: a 4-byte magic number (two zero bytes, a type code, the number of dimensions), then
one big-endian uint32 per dimension, then the payload. Only unsigned-byte payloads are accepted,
which is what the (Fashion-)MNIST files hold. Every error names the file and what was wrong,
because a truncated download or a swapped file is the usual cause.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from entgan.data.errors import DataError

_UNSIGNED_BYTE = 0x08
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def idx_file(root: Path, split: str, kind: str) -> Path:
    """Locate `{train|t10k}-{images-idx3|labels-idx1}-ubyte`, plain or `.gz`, in `root`.

    The dotted spelling some mirrors use (`train-images.idx3-ubyte`) is accepted as well.
    """
    prefix = _SPLIT_PREFIX[split]
    ndim = 3 if kind == "images" else 1
    stems = [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]
    for stem in stems:
        for name in (stem, f"{stem}.gz"):
            candidate = root / name
            if candidate.is_file():
                return candidate
    raise DataError(f"{root / stems[0]}: IDX {kind} file not found (also looked for '{stems[0]}.gz')")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: cannot read IDX file: {error}") from None


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Parse one IDX file into a uint8 array with the dimensions its header declares."""
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    expected_magic = (_UNSIGNED_BYTE << 8) | expected_ndim
    found_magic = int.from_bytes(raw[:4], "big")
    if zero0 != 0 or zero1 != 0 or type_code != _UNSIGNED_BYTE or ndim != expected_ndim:
        raise DataError(
            f"{path}: bad IDX magic number 0x{found_magic:08x}, expected 0x{expected_magic:08x} "
            f"(unsigned bytes, {expected_ndim} dimension{'s' if expected_ndim > 1 else ''})"
        )
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise DataError(f"{path}: header declares {ndim} dimensions but the file ends at byte {len(raw)}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected_bytes = int(np.prod(dims, dtype=np.int64))
    found_bytes = len(raw) - header_end
    if found_bytes != expected_bytes:
        raise DataError(
            f"{path}: header declares shape {dims} ({expected_bytes} data bytes), "
            f"found {found_bytes} data bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_end).reshape(dims)


def read_idx_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W) and labels (N,) of one split, checked to agree in count."""
    images_path = idx_file(root, split, "images")
    labels_path = idx_file(root, split, "labels")
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path}: holds {len(images)} images but {labels_path.name} holds "
            f"{len(labels)} labels; the two files must come from the same split"
        )
    return images, labels
