"""One embedding server process: build, preload, serve, and shut down gracefully.

A sync grpc.server with a thread pool, chosen by measurement on this 2-core machine
(4096-row INT4_PACKED round trips, same handler; see the issue note): ~0.95 ms p50 and
~1,000-1,700 calls/s for the sync server against 8 ms p50 and ~130-520 calls/s for
grpc.aio, which stalls on ~80 KB responses. The kernels release the GIL, so handler
threads overlap their numpy/torch work.

SIGTERM / SIGINT: health turns NOT_SERVING, new lookups get UNAVAILABLE (on streams: failure
reason draining, then the streams end), running ones get up to --grace-period seconds to
finish, the server stops, the process exits 0.
"""

from __future__ import annotations

import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from embedding_server.admin_port import start_admin_server
from embedding_server.auth import AdminAuth
from embedding_server.config import ServerConfig
from embedding_server.desired import committed_seq, read_desired, startup_versions
from embedding_server.errors import ServiceError
from embedding_server.metrics import Metrics, serve_metrics
from embedding_server.peers import Peers
from embedding_server.runtime import setup_logging, stop_event, write_port_file
from embedding_server.servicer import EmbeddingServicer
from embedding_server.versions import VersionRegistry
from protos import embedding_pb2 as pb

log = logging.getLogger("embedding_server")
_QUIET_S = 0.2  # SIGTERM: stop once no lookup has arrived or been answered for this long
_SEND_S = 1.0  # then answers still on their way out get this long before the rest is cancelled
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EmbeddingService"].full_name


def _set_health(h: health.HealthServicer, status: int) -> None:
    for name in ("", SERVICE_NAME):
        h.set(name, status)


def method_handlers(servicer: EmbeddingServicer) -> dict[str, grpc.RpcMethodHandler]:
    """EmbeddingService's handlers, as protoc's add_..._to_server makes them, except that
    Lookup and LookupStream answer wire bytes already (no response serializer)."""
    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name["EmbeddingService"].methods:
        parse = getattr(pb, m.input_type.name).FromString
        serialize = (None if m.name in ("Lookup", "LookupStream")
                     else getattr(pb, m.output_type.name).SerializeToString)
        make = (grpc.stream_stream_rpc_method_handler if m.client_streaming
                else grpc.unary_unary_rpc_method_handler)
        handlers[m.name] = make(getattr(servicer, m.name), request_deserializer=parse,
                                response_serializer=serialize)
    return handlers


def build_server(cfg: ServerConfig, servicer: EmbeddingServicer, health_servicer: health.HealthServicer
                 ) -> grpc.Server:
    """The grpc.Server with the embedding, health and reflection services (not started)."""
    options = [
        # Only --workers children share a port; a lone server must fail on a taken port
        # rather than silently splitting traffic with whatever else holds it.
        ("grpc.so_reuseport", 1 if cfg.peer_dir is not None else 0),
        # rows + offsets of the largest allowed request, with room for the envelope.
        ("grpc.max_receive_message_length", cfg.max_rows_per_request * 16 + (1 << 20)),
        ("grpc.max_send_message_length", -1),
    ]
    server = grpc.server(ThreadPoolExecutor(max_workers=cfg.threads, thread_name_prefix="rpc"),
                         options=options)
    handlers = method_handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    return server


def serve(cfg: ServerConfig) -> int:
    """Run one server process until SIGTERM/SIGINT; returns the exit code."""
    setup_logging(cfg.log_level)
    # One intra-op thread: each lookup is a small kernel call and concurrency comes from
    # gRPC threads and --workers processes. Several OpenMP teams spinning on 2 cores made
    # concurrent FBGEMM calls thousands of times slower (seen: a test stuck for 26 min).
    torch.set_num_threads(1)
    stop = stop_event("shutting down")

    metrics = Metrics()
    versions = VersionRegistry(cfg.store, cfg.shard, cfg.num_shards, cfg.memory_budget_bytes,
                               cfg.readable_seqs)
    peers = Peers(cfg.peer_dir) if cfg.peer_dir is not None else None
    servicer = EmbeddingServicer(cfg, versions, metrics, AdminAuth(cfg.admin_token), peers)
    health_servicer = health.HealthServicer()
    _set_health(health_servicer, health_pb2.HealthCheckResponse.NOT_SERVING)
    server = build_server(cfg, servicer, health_servicer)
    try:
        port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        private_port = (server.add_insecure_port("127.0.0.1:0")
                        if peers is not None and cfg.admin_port is None else 0)
    except RuntimeError as e:  # grpc raises when it cannot bind
        log.error("cannot listen on %s:%d: %s", cfg.host, cfg.port, e)
        return 1
    admin: grpc.Server | None = None
    admin_port: int | None = None
    if cfg.admin_port is not None:
        try:  # before the data server starts: it never serves admin RPCs
            admin, admin_port, private = start_admin_server(servicer, cfg.host, cfg.admin_port,
                                                            worker=peers is not None)
        except RuntimeError as e:
            log.error("cannot listen on admin port %s:%d: %s", cfg.host, cfg.admin_port, e)
            return 1
        log.info("admin RPCs on %s:%d only", cfg.host, admin_port)
        private_port = private or private_port
    server.start()
    log.info("embedding server shard %d of %d listening on %s:%d (budget %d bytes, admin %s)",
             cfg.shard, cfg.num_shards, cfg.host, port, cfg.memory_budget_bytes,
             "enabled" if cfg.admin_token else "disabled")
    metrics_port = None
    if cfg.metrics_port is not None and peers is None:
        metrics_port = serve_metrics(cfg.host, cfg.metrics_port, metrics.registry)
        log.info("metrics on http://%s:%d/metrics", cfg.host, metrics_port)

    # Before SERVING: what the fleet serves (the desired state), else --preload.
    wanted = read_desired(cfg.desired_state)
    for model, version, fingerprint in startup_versions(cfg.store, cfg.preload, wanted):
        if stop.is_set():
            break
        try:
            entry = versions.load(model, version)
        except ServiceError as err:
            if model not in wanted:
                log.error("preload of %s/%s failed: %s", model, version, err.message)
                server.stop(0).wait()
                if admin is not None:
                    admin.stop(0).wait()
                return 2
            # Serve what can be served; ListVersions shows it FAILED, the rankers' prepare
            # refuses it and the controller's reconcile loop retries.
            log.error("desired version %s/%s failed to load: %s", model, version, err.message)
            continue
        if fingerprint and entry.fingerprint != fingerprint:
            log.error("desired version %s/%s has fingerprint %s in this store, the desired "
                      "state says %s: rankers will refuse it", model, version,
                      entry.fingerprint, fingerprint)
        metrics.set_loaded(entry.model, entry.version, entry.nbytes)
        replay(servicer, model, version, committed_seq(wanted, model, version))

    if not stop.is_set():
        # Everything made so far (torch, FBGEMM, the mapped versions' objects) lives as long
        # as the process: out of the collector's generations, a full collection no longer
        # walks those ~200k objects in the middle of some lookup.
        gc.freeze()
        _set_health(health_servicer, health_pb2.HealthCheckResponse.SERVING)
        if cfg.port_file is not None:
            write_port_file(cfg.port_file, port, metrics_port, admin_port)
        if peers is not None:
            peers.register(private_port)
        log.info("SERVING")
        stop.wait()

    if admin is not None:
        admin.stop(0)  # no new admin work while draining; a running call is cancelled
    drain(server, servicer, health_servicer, cfg.grace_period_s)
    return 0


def replay(servicer: EmbeddingServicer, model: str, version: str, seq: int) -> None:
    """Make a just-loaded version readable at its committed delta seq before SERVING.

    If that fails (a delta missing, corrupt, or over the budget), the version is turned
    FAILED with the reason (ListVersions shows it): serving it at an older seq would only
    answer seq_not_applied to rankers at the committed one, and a FAILED version is what
    the rankers' prepare and the controller's reconcile already act on (LoadVersion +
    ApplyDeltas again). The server still reports SERVING for its other versions.
    """
    if seq == 0:
        return
    t0 = time.monotonic()
    try:
        servicer.apply_local(model, version, seq)
    except ServiceError as err:
        log.error("desired version %s/%s: replay of deltas 1..%d failed, version not served: %s",
                  model, version, seq, err.message)
        servicer.versions.fail(model, version, f"replay of deltas 1..{seq} failed: {err.message}")
        servicer.metrics.clear_loaded(model, version)
        return
    log.info("desired version %s/%s replayed to committed delta seq %d in %.2fs", model, version,
             seq, time.monotonic() - t0)


def drain(server: grpc.Server, servicer: EmbeddingServicer, health_servicer: health.HealthServicer,
          grace_s: float) -> None:
    """Finish running lookups, answer new ones UNAVAILABLE, then stop the server.

    Lookups are refused with a retriable UNAVAILABLE (on a stream: failure reason
    draining, then the stream ends) while the running ones finish, and until none has
    arrived or been answered for _QUIET_S, before server.stop(): on stop, grpc core CANCELs calls that have
    arrived but not yet reached a handler, and clients do not retry CANCELLED. Streams
    still open then are idle ones (embedding_server.streams): stop cancels them after _SEND_S.
    """
    servicer.draining = True
    health_servicer.enter_graceful_shutdown()
    deadline = time.monotonic() + grace_s
    log.info("draining: %d lookups in flight, %d streams open, up to %.1fs for them",
             servicer.inflight, len(servicer.streams), grace_s)
    while time.monotonic() < deadline and (
            servicer.inflight or time.monotonic() - servicer.last_arrival < _QUIET_S):
        time.sleep(0.005)
    # Nothing running: answers still being sent get _SEND_S, not the rest of the grace,
    # which idle streams (embedding_server.streams) would otherwise hold the process for.
    left = max(deadline - time.monotonic(), 0.0)
    server.stop(left if servicer.inflight else min(left, _SEND_S)).wait()
    log.info("stopped: %d lookups still running were cancelled by the grace period", servicer.inflight)
