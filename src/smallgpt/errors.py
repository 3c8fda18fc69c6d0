"""Errors the user can fix.

`UserError` is raised for anything caused by input (files, configs, checkpoints). The CLI prints
its one-line message and exits with status 2; any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
