"""The one error type the app shows to users as a single line, without a traceback.

Anything a user can fix by downloading a file, installing a package or setting an override is raised
as `SetupError`; `hicache.app.main` prints its message on one line and exits with status 2. Every
other exception is a bug and keeps its traceback.
"""


class SetupError(RuntimeError):
    """Something the user must provide (weights, a package, a data file); the message says what and where."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
