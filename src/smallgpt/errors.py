"""Errors the user can fix.

`UserError` is raised for anything caused by input (files, configs, checkpoints) or by the machine
(a full disk, a busy run folder, no network). The CLI prints its one-line message and exits with its
`exit_code`; any other exception is a bug and keeps its traceback. docs/errors.md lists the codes.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""

    exit_code = 2


class TrainingDiverged(UserError):
    """The loss, a gradient norm or the weights stopped being finite; the checkpoints are kept."""

    exit_code = 3
