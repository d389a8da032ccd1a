"""The one error type the data package raises for problems a user can fix.

Kept in its own module so the pure-numpy partitioners can raise it without importing torch.
"""

from __future__ import annotations


class DataError(ValueError):
    """A data problem phrased for the user: names the file or field, what was expected and found."""


def image_size_mismatch(where: object, found: str, size: int) -> DataError:
    """The error for images of another size than the model's when `data.resize` is off;
    `found` says what was read, e.g. "image is 10x12"."""
    return DataError(
        f"{where}: {found}, the model expects {size}x{size} (data.image_size); set data.resize: true to resize"
    )
