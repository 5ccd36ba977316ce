"""gRPC EmbeddingService: status codes, auth, deadlines and metrics around the real work.

Lookups are bounded by our own in-flight counter rather than grpc's
maximum_concurrent_rpcs, so overload sheds lookups (RESOURCE_EXHAUSTED) while health
checks and admin calls still get through. Unary Lookup and every message of a
LookupStream (streams.py) go through the same `answer`; answers leave as wire bytes
(registered without a response serializer, see server.method_handlers). Every failure is a
ServiceError: on unary turned into context.abort with its code and message and the
reason as trailing metadata x-embedding-reason, on a stream into that lookup's
LookupFailure; counted by code and reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

import grpc

from embedding_server.auth import PEER_HEADER, AdminAuth, LookupToken, metadata_value
from embedding_server.config import ServerConfig
from embedding_server.errors import DRAINING, VERSION_NOT_LOADED, ServiceError, internal_error
from embedding_server.lookup import OUTPUT_NAMES, execute, measure, resolve
from embedding_server.metrics import Metrics
from embedding_server.peers import Peers, merge_version_lists
from embedding_server.streams import StreamSet, serve_stream
from embedding_server.versions import Entry, VersionRegistry
from modelpack.delta import DeltaError, check_seq
from modelpack.lookup import DRAINING_METADATA, REASON_METADATA
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
        self.draining = False  # set on SIGTERM: new lookups get UNAVAILABLE (reason draining)
        # time.monotonic() of the latest lookup's arrival or answer: a drain waits until it
        # is _QUIET_S old, so a client that sends again as soon as it is answered is told
        # `draining` instead of meeting server.stop(), which CANCELs calls not yet handled.
        self.last_arrival = 0.0
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, int], Any] = {}
        self.streams = StreamSet(cfg.max_streams)

    @property
    def inflight(self) -> int:
        """Lookups being handled right now."""
        return self._inflight

    def count_error(self, err: ServiceError) -> None:
        self.metrics.errors.labels(err.code.name, err.reason).inc()

    def _abort(self, context: grpc.ServicerContext, err: ServiceError) -> NoReturn:
        self.count_error(err)
        trailers = [(REASON_METADATA, err.reason)]
        if err.reason == DRAINING:
            trailers.append(DRAINING_METADATA)
        context.set_trailing_metadata(tuple(trailers))
        context.abort(err.code, err.message)
        raise AssertionError("context.abort returned")  # it raises; this satisfies NoReturn

    # ---------------------------------------------------------------- Lookup

    def refuse_draining(self) -> None:
        """UNAVAILABLE (reason draining) once SIGTERM has arrived."""
        if self.draining:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                               "embedding server is shutting down (SIGTERM); retry on another replica",
                               DRAINING)

    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> bytes:
        """The answer as LookupResponse wire bytes (registered with no response serializer)."""
        self.last_arrival = time.monotonic()
        try:
            self.lookup_token.check(context)
            self.refuse_draining()
            left = _remaining(context)
            return self.answer(request, None if left is None else time.monotonic() + left)
        except ServiceError as e:
            self._abort(context, e)
        except Exception as e:  # a bug, not the caller's fault: say so, keep serving
            log.exception("Lookup failed")
            self._abort(context, internal_error(e))

    def LookupStream(self, requests: Iterator[pb.LookupRequest], context: grpc.ServicerContext
                     ) -> Iterator[bytes]:
        return serve_stream(self, requests, context)

    def answer(self, request: pb.LookupRequest, deadline: float | None) -> bytes:
        """One lookup, unary or streamed: its wire bytes, or ServiceError. `deadline` is a
        time.monotonic() value (None = none); the request's own timeout_s can shorten it."""
        t0 = time.perf_counter()
        with self._lock:
            overloaded = self._inflight >= self.cfg.max_concurrent
            if not overloaded:
                self._inflight += 1
        if overloaded:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"embedding server overloaded: {self.cfg.max_concurrent} lookups already in flight "
                "(--max-concurrent); retry later or on another replica")
        self.metrics.inflight.inc()
        try:
            if request.timeout_s > 0:
                mine = time.monotonic() + request.timeout_s
                deadline = mine if deadline is None else min(deadline, mine)
            if deadline is not None and time.monotonic() >= deadline:
                raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   "deadline passed before the lookup started")
            groups = measure(request, self.cfg)  # the cost limits, before anything else
            try:
                entry, version, state = self.versions.hold(request.model, request.version,
                                                           request.fingerprint, request.seq)
            except ServiceError as e:  # names are checked only here: a READY entry's are valid
                if e.reason == VERSION_NOT_LOADED:
                    self._names(request.model, request.version)
                raise
            try:
                resolve(groups, version, state, self.cfg)
                out = execute(groups, version, state.seq, request.id, self.cfg, deadline)
            finally:
                self.versions.release(entry)
            for g in groups:  # only once the whole lookup has succeeded
                self._rows_counter(g.name, g.output).inc(g.num_rows)
            self.metrics.lookup_seconds.observe(time.perf_counter() - t0)
            return out
        finally:
            self.metrics.inflight.dec()
            with self._lock:
                self._inflight -= 1
            self.last_arrival = time.monotonic()

    def _rows_counter(self, table: str, output: int) -> Any:
        key = (table, output)
        c = self._counters.get(key)
        if c is None:  # resolved once per (table, output): labels() costs a lock and a dict
            c = self._counters[key] = self.metrics.rows.labels(table, OUTPUT_NAMES[output])
        return c

    # ---------------------------------------------------------------- admin

    def _info(self, e: Entry) -> pb.VersionInfo:
        return pb.VersionInfo(model=e.model, version=e.version, fingerprint=e.fingerprint,
                              state=_STATES[e.state], bytes=e.nbytes, shard=self.cfg.shard,
                              num_shards=self.cfg.num_shards, error=e.error, in_flight=e.in_flight,
                              readable_seqs=e.readable_seqs, applied_seq=e.applied_seq,
                              overlay_bytes=e.overlay_bytes)

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

    def ApplyDeltas(self, request: pb.ApplyDeltasRequest, context: grpc.ServicerContext
                    ) -> pb.VersionInfo:
        self._refuse_admin_here(context)
        return self.apply_deltas(request, context)

    def apply_deltas(self, request: pb.ApplyDeltasRequest, context: grpc.ServicerContext
                     ) -> pb.VersionInfo:
        """ApplyDeltas itself, wherever it is served: token, names and seq checked first."""
        def local() -> pb.VersionInfo:
            return self._info(self.apply_local(request.model, request.version, request.seq,
                                               request.fingerprint))

        def run() -> pb.VersionInfo:
            self._names(request.model, request.version)
            if request.seq:
                try:
                    check_seq(request.seq, "ApplyDeltas seq")
                except DeltaError as e:
                    raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"{e} (or 0: the version's own rows)") from None
            return self._fan_out(context, "ApplyDeltas", request, local)

        return self._admin(context, run)

    def apply_local(self, model: str, version: str, seq: int, fingerprint: str = "") -> Entry:
        """Make (model, version) readable at `seq` in this process, with its metrics (the
        startup replay calls this too)."""
        t0 = time.perf_counter()
        e, rows = self.versions.apply_deltas(model, version, seq, fingerprint)
        self.metrics.set_deltas(e.model, e.version, e.applied_seq, e.overlay_bytes)
        if rows:
            self.metrics.delta_rows.inc(rows)
            self.metrics.apply_seconds.observe(time.perf_counter() - t0)
        return e

    def load_version(self, request: pb.LoadVersionRequest, context: grpc.ServicerContext
                     ) -> pb.VersionInfo:
        """LoadVersion itself, wherever it is served (the data port or --admin-port)."""
        def local() -> pb.VersionInfo:
            e = self.versions.load(request.model, request.version)
            self.metrics.set_loaded(e.model, e.version, e.nbytes)
            self.metrics.set_deltas(e.model, e.version, e.applied_seq, e.overlay_bytes)
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
