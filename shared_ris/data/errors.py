"""The one error type of the data package."""

from ..errors import SharedRISError


class DataError(SharedRISError):
    """A data problem the user can fix (missing file, wrong layout, unsafe pickle, unprepared split).

    The message is one line that names the file and the fix.
    """
