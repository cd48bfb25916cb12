"""The one error type of the data package, and how a message quotes a value read from a file."""

import reprlib
from typing import Any

from ..errors import SharedRISError


class DataError(SharedRISError):
    """A data problem the user can fix (missing file, wrong layout, unsafe pickle, unprepared split).

    The message is one line that names the file and the fix.
    """


def short_repr(value: Any) -> str:
    """A bounded one-line repr of a value read from a file, safe on huge, deep or self-referencing ones."""
    try:
        return reprlib.repr(value)
    except ValueError:  # an integer past Python's 4300-digit printing limit
        return f"<{type(value).__name__} too long to print>"
