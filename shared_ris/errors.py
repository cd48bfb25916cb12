"""One base class for every error a user can fix; the CLI prints these as one line, no traceback."""


class SharedRISError(ValueError):
    """Bad input (file, recipe, checkpoint, text, data): the message names the culprit and the fix."""


class CheckpointError(SharedRISError):
    """A checkpoint cannot be used; the message is one line naming the file and the fix."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type when it has none), at most ``limit``
    characters: what a one-line error quotes of a library's multi-line explanation."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
