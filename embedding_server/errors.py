"""The one exception type the request path raises: a gRPC status code and its message."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Ends an RPC with `code` and `message` (the servicer turns it into context.abort)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
