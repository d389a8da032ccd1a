"""The one error type the data package raises for problems a user can fix.

Kept in its own module so the pure-numpy partitioners can raise it without importing torch.
"""

from __future__ import annotations


class DataError(ValueError):
    """A data problem phrased for the user: names the file or field, what was expected and found."""
