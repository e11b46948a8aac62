"""Errors. ``KdbenchError``: the user's, printed by the CLI as one line with a non-zero exit. ``RunFailed``: one run's,
recorded as a failed run while the sweep goes on."""


class KdbenchError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class RunFailed(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss); recorded as failed, the sweep continues."""
