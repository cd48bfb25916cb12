"""One base class for every error a user can fix; the CLI prints these as one line, no traceback."""


class SharedRISError(ValueError):
    """Bad input (file, recipe, checkpoint, text, data): the message names the culprit and the fix."""


class CheckpointError(SharedRISError):
    """A checkpoint cannot be used; the message is one line naming the file and the fix."""
