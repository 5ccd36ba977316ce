"""The one exception type the request path raises: a gRPC status code and its message."""

from __future__ import annotations

import grpc

# The message travels as the grpc-message trailer, and gRPC bounds metadata (8 KiB by
# default): a message echoing a 10k-character name broke the call instead of explaining it.
MAX_MESSAGE = 900


class ServiceError(Exception):
    """Ends an RPC with `code` and `message` (the servicer turns it into context.abort)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        if len(message) > MAX_MESSAGE:  # it may echo a caller's value of any length
            message = f"{message[:MAX_MESSAGE]}... ({len(message) - MAX_MESSAGE} more characters)"
        super().__init__(message)
        self.code = code
        self.message = message
