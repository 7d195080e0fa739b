"""Exceptions that map to the CLI's exit codes.

A ``UserError`` is a mistake the user can fix (bad key, missing folder, wrong adapter): the CLI prints its
one-sentence message and exits 2, never a traceback. ``NonFiniteLoss`` ends a run with exit 3.
"""


class UserError(Exception):
    """A mistake in the job, the command line or the files it names; exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """The job config is malformed or asks for something not supported."""


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite; exit code 3."""

    exit_code = 3
