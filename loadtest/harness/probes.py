"""Asking a running server: readiness probes for ServerProcess's `ready=` hook, metric sums, free ports.

Each probe takes an address ("127.0.0.1:8080") or anything with an `.address` (a
ServerProcess), so it serves directly as `ServerProcess(..., ready=grpc_serving)`:

    ServerProcess.module("embedding_server", ..., ready=grpc_serving)
    ServerProcess.module("ranker_server", ..., ready=http_ready)
    ServerProcess.module("deploy_controller", ..., ready=lambda s: http_ready(s, "/healthz"))

grpc and httpx are imported inside the probes: a caller that probes only one kind of
server does not pay for importing the other client.
"""

from __future__ import annotations

import socket
from typing import Protocol

LOOPBACK = "127.0.0.1"
EMBEDDING_SERVICE = "hybrid.embedding.v1.EmbeddingService"


class Addressed(Protocol):
    @property
    def address(self) -> str: ...


def _address(target: str | Addressed) -> str:
    return target if isinstance(target, str) else target.address


def http_ready(target: str | Addressed, path: str = "/readyz", timeout: float = 1.0) -> bool:
    """True once GET http://address/path answers 200 (the ranker's /readyz by default)."""
    import httpx

    try:
        return httpx.get(f"http://{_address(target)}{path}", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def grpc_serving(target: str | Addressed, timeout: float = 1.0) -> bool:
    """True once the embedding server's gRPC health service says SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(_address(target)) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=EMBEDDING_SERVICE), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(r.status == health_pb2.HealthCheckResponse.SERVING)


def metric_sum(target: str | Addressed, prefix: str, timeout: float = 10.0) -> float:
    """Sum of the samples on GET http://address/metrics whose line starts with `prefix`
    (a metric name, or a name and the start of its labels: over every label set)."""
    import httpx

    text = httpx.get(f"http://{_address(target)}/metrics", timeout=timeout).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix))


def port_free(port: int, host: str = LOOPBACK) -> bool:
    """True if `port` can be bound on `host` right now (a hint: another process may take it)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
