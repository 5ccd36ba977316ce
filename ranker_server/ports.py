"""--admin-port: the data and admin listeners of one app, told apart by the local port.

One uvicorn server serves both sockets, so both share the app's one lifespan and its
RankerState (no second copy of the registry to keep in step). This gate routes by the
port a request arrived on: /admin/* only on the admin port (404 naming it elsewhere),
and on the admin port only admin, /metrics (the controller's gates scrape it) and the
probes; so a NetworkPolicy on the admin port isolates exactly the admin API.
"""

from __future__ import annotations

import json
import socket

from starlette.types import ASGIApp, Receive, Scope, Send

ADMIN_PREFIX = "/admin/"
ON_ADMIN_PORT = ("/metrics", "/healthz", "/readyz")  # besides /admin/*


class AdminPortGate:
    """ASGI middleware: 404 for admin off the admin port and for data on it."""

    def __init__(self, app: ASGIApp, admin_port: int) -> None:
        self.app, self.admin_port = app, admin_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            server = scope.get("server")
            on_admin = server is not None and server[1] == self.admin_port
            is_admin = path.startswith(ADMIN_PREFIX)
            if is_admin and not on_admin:
                await _not_found(send, f"the admin API is served on port {self.admin_port} only")
                return
            if on_admin and not is_admin and path not in ON_ADMIN_PORT:
                await _not_found(send, f"port {self.admin_port} serves only the admin API, "
                                       "/metrics and the probes")
                return
        await self.app(scope, receive, send)


async def _not_found(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": 404,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A bound TCP socket (uvicorn listens on it); OSError when the port is taken.

    Made from getaddrinfo, so its proto is IPPROTO_TCP: asyncio sets TCP_NODELAY only on
    such sockets, and without it every response waited ~40 ms for a delayed ACK.
    `reuse_port`: SO_REUSEPORT, so the workers of one ranker (--workers) each listen on the
    same port and the kernel spreads connections over them."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
