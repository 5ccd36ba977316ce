"""gRPC EmbeddingService: status codes, auth, deadlines and metrics around the real work.

Lookups are bounded by our own in-flight counter rather than grpc's
maximum_concurrent_rpcs, so overload sheds lookups (RESOURCE_EXHAUSTED) while health
checks and admin calls still get through. Every failure is a ServiceError turned into
context.abort with its code and message, and counted by code.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn, TypeVar

import grpc

from embedding_server.auth import PEER_HEADER, AdminAuth, metadata_value
from embedding_server.config import ServerConfig
from embedding_server.errors import ServiceError
from embedding_server.limits import LookupToken, check_answer, check_cost
from embedding_server.lookup import run_lookup
from embedding_server.metrics import Metrics
from embedding_server.peers import Peers, merge_version_lists
from embedding_server.versions import Entry, VersionRegistry
from modelpack.lookup import DRAINING_METADATA
from modelpack.schema import SchemaError, check_name
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg

log = logging.getLogger(__name__)
T = TypeVar("T")
_STATES = {"": pb.VERSION_STATE_UNSPECIFIED, "LOADING": pb.VERSION_STATE_LOADING,
           "READY": pb.VERSION_STATE_READY, "UNLOADING": pb.VERSION_STATE_UNLOADING,
           "FAILED": pb.VERSION_STATE_FAILED}


def _remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left before the client's deadline, None without one."""
    left = context.time_remaining()
    return None if left is None or left > 1e8 else float(left)


class EmbeddingServicer(pbg.EmbeddingServiceServicer):
    """Implements hybrid.embedding.v1.EmbeddingService over a VersionRegistry."""

    def __init__(self, cfg: ServerConfig, versions: VersionRegistry, metrics: Metrics,
                 auth: AdminAuth, peers: Peers | None = None) -> None:
        self.cfg, self.versions, self.metrics, self.auth, self.peers = cfg, versions, metrics, auth, peers
        self.lookup_token = LookupToken(cfg.lookup_token())
        self.admin_port: int | None = None  # bound --admin-port: admin RPCs only there
        self._inflight = 0
        self.draining = False  # set on SIGTERM: new lookups get UNAVAILABLE, running ones finish
        self.last_arrival = 0.0  # time.monotonic() of the latest Lookup call
        self._lock = threading.Lock()
        self._on_rows: Callable[[str, str, int], None] = (
            lambda table, output, n: metrics.rows.labels(table, output).inc(n))

    @property
    def inflight(self) -> int:
        """Lookups being handled right now."""
        return self._inflight

    def _abort(self, context: grpc.ServicerContext, err: ServiceError) -> NoReturn:
        self.metrics.errors.labels(err.code.name).inc()
        context.abort(err.code, err.message)
        raise AssertionError("context.abort returned")  # it raises; this satisfies NoReturn

    # ---------------------------------------------------------------- Lookup

    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> pb.LookupResponse:
        t0 = time.perf_counter()
        self.last_arrival = time.monotonic()
        try:
            self.lookup_token.check(context)
        except ServiceError as e:
            self._abort(context, e)
        if self.draining:
            context.set_trailing_metadata((DRAINING_METADATA,))
            self._abort(context, ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                "embedding server is shutting down (SIGTERM); retry on another replica"))
        with self._lock:
            if self._inflight >= self.cfg.max_concurrent:
                overloaded = True
            else:
                overloaded = False
                self._inflight += 1
        if overloaded:
            self._abort(context, ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"embedding server overloaded: {self.cfg.max_concurrent} lookups already in flight "
                "(--max-concurrent); retry later or on another replica"))
        self.metrics.inflight.inc()
        try:
            left = _remaining(context)
            if left is not None and left <= 0:
                raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   "deadline passed before the lookup started")
            self._names(request.model, request.version)
            cost = check_cost(request, self.cfg)  # the cost limits, before any work
            with self.versions.acquire(request.model, request.version, request.fingerprint) as v:
                check_answer(request, cost, v.tables, self.cfg)
                resp = run_lookup(v, request, shard=self.cfg.shard, num_shards=self.cfg.num_shards,
                                  deadline=None if left is None else time.monotonic() + left,
                                  on_rows=self._on_rows)
            self.metrics.lookup_seconds.observe(time.perf_counter() - t0)
            return resp
        except ServiceError as e:
            self._abort(context, e)
        except Exception as e:  # a bug, not the caller's fault: say so, keep serving
            log.exception("Lookup failed")
            self._abort(context, ServiceError(grpc.StatusCode.INTERNAL,
                                              f"embedding server error: {type(e).__name__}: {e}"))
        finally:
            self.metrics.inflight.dec()
            with self._lock:
                self._inflight -= 1

    # ---------------------------------------------------------------- admin

    def _info(self, e: Entry) -> pb.VersionInfo:
        return pb.VersionInfo(model=e.model, version=e.version, fingerprint=e.fingerprint,
                              state=_STATES[e.state], bytes=e.nbytes, shard=self.cfg.shard,
                              num_shards=self.cfg.num_shards, error=e.error, in_flight=e.in_flight)

    @staticmethod
    def _names(model: str, version: str) -> None:
        try:
            check_name("model", model)
            check_name("version", version)
        except SchemaError as e:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None

    def _fan_out(self, context: grpc.ServicerContext, method: str, request: object,
                 local: Callable[[], T]) -> T:
        """Run `local` here and `method` on every --workers sibling; fail if any failed."""
        if self.peers is None or metadata_value(context, PEER_HEADER) is not None:
            return local()
        with ThreadPoolExecutor(max_workers=1) as pool:
            mine = pool.submit(local)
            theirs = self.peers.call_all(method, request, metadata_value(context, "authorization"),
                                         _remaining(context))
            result = mine.result()  # raises our own ServiceError first
        for addr, r in theirs:
            if isinstance(r, grpc.RpcError):
                raise ServiceError(r.code(), f"worker {addr}: {r.details()}")
        return result

    def _admin(self, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            self.auth.check(context)
            return fn()
        except ServiceError as e:
            self._abort(context, e)

    def _refuse_admin_here(self, context: grpc.ServicerContext) -> None:
        """With --admin-port, this (data port) servicer's admin RPCs answer PERMISSION_DENIED."""
        if self.admin_port is not None:
            self._abort(context, ServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"admin RPCs are served on port {self.admin_port} only, not the data port"))

    def LoadVersion(self, request: pb.LoadVersionRequest, context: grpc.ServicerContext) -> pb.VersionInfo:
        self._refuse_admin_here(context)
        return self.load_version(request, context)

    def UnloadVersion(self, request: pb.UnloadVersionRequest, context: grpc.ServicerContext
                      ) -> pb.VersionInfo:
        self._refuse_admin_here(context)
        return self.unload_version(request, context)

    def load_version(self, request: pb.LoadVersionRequest, context: grpc.ServicerContext
                     ) -> pb.VersionInfo:
        """LoadVersion itself, wherever it is served (the data port or --admin-port)."""
        def local() -> pb.VersionInfo:
            e = self.versions.load(request.model, request.version)
            self.metrics.set_loaded(e.model, e.version, e.nbytes)
            return self._info(e)

        def run() -> pb.VersionInfo:
            self._names(request.model, request.version)
            return self._fan_out(context, "LoadVersion", request, local)

        return self._admin(context, run)

    def unload_version(self, request: pb.UnloadVersionRequest, context: grpc.ServicerContext
                       ) -> pb.VersionInfo:
        """UnloadVersion itself, wherever it is served."""
        def local() -> pb.VersionInfo:
            timeout = request.drain_timeout_s if request.drain_timeout_s > 0 else self.cfg.drain_timeout_s
            left = _remaining(context)
            if left is not None:
                timeout = min(timeout, max(left - 0.05, 0.0))  # answer before the caller gives up
            e = self.versions.unload(request.model, request.version, timeout)
            self.metrics.clear_loaded(e.model, e.version)
            return self._info(e)

        def run() -> pb.VersionInfo:
            self._names(request.model, request.version)
            return self._fan_out(context, "UnloadVersion", request, local)

        return self._admin(context, run)

    def ListVersions(self, request: pb.ListVersionsRequest, context: grpc.ServicerContext
                     ) -> pb.ListVersionsResponse:
        infos = [self._info(e) for e in self.versions.snapshot(request.model)]
        if self.peers is not None and metadata_value(context, PEER_HEADER) is None:
            others = []
            for addr, r in self.peers.call_all("ListVersions", request, None, _remaining(context)):
                if isinstance(r, grpc.RpcError):
                    self._abort(context, ServiceError(r.code(), f"worker {addr}: {r.details()}"))
                others.append(list(r.versions))
            infos = merge_version_lists(infos, others)
        return pb.ListVersionsResponse(
            versions=infos, shard=self.cfg.shard, num_shards=self.cfg.num_shards,
            memory_budget_bytes=self.versions.budget, memory_used_bytes=self.versions.used_bytes())

    def CheckFit(self, request: pb.LoadVersionRequest, context: grpc.ServicerContext) -> pb.FitInfo:
        try:
            self._names(request.model, request.version)
            fit = self.versions.check_fit(request.model, request.version)
        except ServiceError as e:
            self._abort(context, e)
        return pb.FitInfo(fits=fit.fits, required_bytes=fit.required, available_bytes=fit.available,
                          reason=fit.reason)
