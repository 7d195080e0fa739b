"""Exceptions that map to the CLI's exit codes.

A ``UserError`` is a mistake the user can fix (bad key, missing folder, wrong adapter): the CLI prints its
one-sentence message and exits 2, never a traceback. ``NonFiniteLoss`` ends a run with exit 3. ``ProcessLost``
(a job on several processes lost one of them) ends in one line with exit 1.
"""


class UserError(Exception):
    """A mistake in the job, the command line or the files it names; exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """The job config is malformed or asks for something not supported.

    The message is one line (the first problem, and how many more); ``problems`` lists every problem found at the
    stage that failed (the schema's, or the checks after it), one line each, for a form that marks each field."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite; exit code 3."""

    exit_code = 3


class ProcessLost(Exception):
    """Another process of a job on several processes died or hung; exit code 1 (what was saved is intact)."""

    exit_code = 1
