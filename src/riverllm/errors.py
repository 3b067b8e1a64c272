"""The one exception type that reaches users.

Anything a user can get wrong (a model name, a file, a flag) raises `RiverError` with a one-line
message that says what is wrong and what to do. The CLI prints that line and exits non-zero; the
server turns it into a 4xx body. Everything else is a bug and keeps its traceback.
"""


class RiverError(Exception):
    """A user-facing error: one line, what is wrong and what to do."""

    exit_code: int = 2
