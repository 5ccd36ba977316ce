"""Bearer-token checks: the admin RPCs' (LoadVersion, UnloadVersion) and the data port's."""

from __future__ import annotations

import hmac

import grpc

from embedding_server.errors import ServiceError

PEER_HEADER = "x-embedding-peer"  # set on calls one --workers sibling forwards to another


def metadata_value(context: grpc.ServicerContext, key: str) -> str | None:
    """The first value of request metadata `key` (lowercase), or None."""
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return str(v)
    return None


class AdminAuth:
    """Checks `authorization: Bearer <token>` against the configured token.

    Without a configured token every admin call is refused: an embedding server must
    never be reconfigurable by whoever can reach its port.
    """

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def check(self, context: grpc.ServicerContext) -> None:
        """Raise UNAUTHENTICATED unless the call carries the right bearer token."""
        if self._token is None:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED,
                               "admin RPCs are disabled: this server was started without "
                               "--admin-token-file")
        header = metadata_value(context, "authorization")
        if header is None:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED,
                               "admin RPC needs metadata 'authorization: Bearer <token>'")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "admin RPC: wrong bearer token")


class LookupToken:
    """The optional bearer token of the data port (--lookup-token-file); admin's check, reused."""

    def __init__(self, token: str | None) -> None:
        self._auth = AdminAuth(token) if token else None

    def check(self, context: grpc.ServicerContext) -> None:
        """Raise UNAUTHENTICATED unless no token is configured or the call carries it."""
        if self._auth is None:
            return
        try:
            self._auth.check(context)
        except ServiceError:
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED,
                               "Lookup needs metadata 'authorization: Bearer <token>' with the token "
                               "of this server's --lookup-token-file") from None
