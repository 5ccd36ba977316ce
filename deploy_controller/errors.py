"""The one refusal type of the controller's operations (rollouts and delta streams)."""

from __future__ import annotations


class ControllerError(Exception):
    """A refused request; `status` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
