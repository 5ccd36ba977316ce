"""The exceptions a request can fail with; the app renders every one by one handler.

Handlers raise, never build error responses: `create_app` registers one exception
handler for HttpError, which answers `body()` as JSON with `status` and `headers()`.
"""

from __future__ import annotations

from typing import Any


class HttpError(Exception):
    """A request refused with an HTTP `status`; `message` says why, for humans."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"detail": self.message}

    def headers(self) -> dict[str, str]:
        return {}


class RankError(HttpError):
    """A failed /v1/rank request: a metric-safe `reason` and the offending `field` if any.

    `reason` becomes the `ranker_errors_total{reason}` label, so it is one of a small
    fixed set of words, never an ID or free text.
    """

    def __init__(self, status: int, reason: str, message: str, *, field: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(status, message)
        self.reason = reason
        self.field = field
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"detail": self.message, "reason": self.reason}
        if self.field is not None:
            out["field"] = self.field
        return out

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


class AdminError(HttpError):
    """An admin request that cannot be carried out (401 asks for the bearer token)."""

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}


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
