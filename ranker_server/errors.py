"""The one exception a request can fail with, carrying its HTTP status and reason."""

from __future__ import annotations

from typing import Any


class RankError(Exception):
    """A failed request: HTTP `status`, a metric-safe `reason`, the offending `field` if any.

    `reason` becomes the `ranker_errors_total{reason}` label, so it is one of a small
    fixed set of words, never an ID or free text; `message` is for humans.
    """

    def __init__(self, status: int, reason: str, message: str, *, field: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"detail": self.message, "reason": self.reason}
        if self.field is not None:
            out["field"] = self.field
        return out

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


def outcome_of(status: int, reason: str = "") -> str:
    """The `outcome` label of ranker_request_duration_seconds for an HTTP status."""
    if reason == "version_mismatch":
        return reason
    if status == 200:
        return "ok"
    if status == 429:
        return "overload"
    if status == 504:
        return "timeout"
    if status < 500:
        return "client_error"
    return "server_error"
