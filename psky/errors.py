"""Errors shared across psky's layers."""


class UserError(Exception):
    """A failure the user can act on: the CLI prints it as one line, no traceback.

    `status` is the exit status: 1 for a failed operation, 2 for a usage error."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status
