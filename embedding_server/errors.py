"""The one exception type the request path raises: a gRPC status code, its message, a reason.

The reason is the machine-readable half (protos/embedding.proto lists them): unary Lookup
sends it as trailing metadata (modelpack.lookup.REASON_METADATA), LookupStream in
LookupFailure.reason.
"""

from __future__ import annotations

import grpc

from modelpack.lookup import DELTA_REFUSED as DELTA_REFUSED

# The reasons both tiers read are the lookup contract's (modelpack.lookup); the rest only
# the server raises.
from modelpack.lookup import DRAINING as DRAINING
from modelpack.lookup import FINGERPRINT_MISMATCH as FINGERPRINT_MISMATCH
from modelpack.lookup import SEQ_NOT_APPLIED as SEQ_NOT_APPLIED
from modelpack.lookup import VERSION_NOT_LOADED as VERSION_NOT_LOADED

# The message travels as the grpc-message trailer, and gRPC bounds metadata (8 KiB by
# default): a message echoing a 10k-character name broke the call instead of explaining it.
MAX_MESSAGE = 900

INVALID_ARGUMENT = "invalid_argument"
OVER_LIMIT = "over_limit"
OVERLOADED = "overloaded"
DEADLINE_EXCEEDED = "deadline_exceeded"
UNAUTHENTICATED = "unauthenticated"
INTERNAL = "internal"

_C = grpc.StatusCode
# Where a raise site names no reason: the one each code means on the lookup path.
_DEFAULT_REASON = {_C.INVALID_ARGUMENT: INVALID_ARGUMENT, _C.UNAVAILABLE: DRAINING,
                   _C.RESOURCE_EXHAUSTED: OVERLOADED, _C.DEADLINE_EXCEEDED: DEADLINE_EXCEEDED,
                   _C.UNAUTHENTICATED: UNAUTHENTICATED, _C.INTERNAL: INTERNAL}


class ServiceError(Exception):
    """Ends an RPC (or one streamed lookup) with `code`, `message` and `reason`."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "") -> None:
        if len(message) > MAX_MESSAGE:  # it may echo a caller's value of any length
            message = f"{message[:MAX_MESSAGE]}... ({len(message) - MAX_MESSAGE} more characters)"
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _DEFAULT_REASON.get(code, str(code.name).lower())


def internal_error(e: Exception) -> ServiceError:
    """A bug, not the caller's fault: INTERNAL naming what raised."""
    return ServiceError(grpc.StatusCode.INTERNAL, f"embedding server error: {type(e).__name__}: {e}")
