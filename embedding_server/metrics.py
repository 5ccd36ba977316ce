"""Prometheus metrics of one server process (base units; labels never carry IDs).

Metrics are registered in a registry owned by the server, not the global default, so
tests and several servers in one process never collide. With --workers > 1 the
supervisor sets PROMETHEUS_MULTIPROC_DIR before the children start: prometheus_client
then keeps every value in per-process files, and the supervisor's /metrics merges them
(gauges by the multiprocess mode chosen below).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

# 50 µs .. 50 ms, denser where a 512-16384-row lookup lands.
LATENCY_BUCKETS = (5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 7.5e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3,
                   7.5e-3, 1e-2, 2e-2, 5e-2)


class Metrics:
    """The server's instruments."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.lookup_seconds = Histogram(
            "embedding_lookup_duration_seconds", "Lookup RPC handling time, parse to packed answer",
            buckets=LATENCY_BUCKETS, registry=r)
        self.rows = Counter("embedding_rows_total", "Rows served by Lookup",
                            ["table", "output"], registry=r)
        self.errors = Counter("embedding_errors_total",
                              "RPCs (and streamed lookups) that ended in an error, by status code and "
                              "reason (version_not_loaded and fingerprint_mismatch apart)",
                              ["code", "reason"], registry=r)
        # Each worker maps the same files (one page cache), so the max is the truth.
        self.loaded_bytes = Gauge("embedding_loaded_bytes", "Table bytes mapped per loaded version",
                                  ["model", "version"], registry=r, multiprocess_mode="livemax")
        # Deltas: each worker holds its own overlays (summed); a seq is applied where all have it.
        self.overlay_bytes = Gauge("embedding_delta_overlay_bytes",
                                   "Memory of the delta overlays per loaded version (in the budget)",
                                   ["model", "version"], registry=r, multiprocess_mode="livesum")
        self.applied_seq = Gauge("embedding_delta_applied_seq",
                                 "Delta seq most recently made readable per loaded version",
                                 ["model", "version"], registry=r, multiprocess_mode="livemin")
        self.delta_rows = Counter("embedding_delta_rows_applied_total",
                                  "Delta rows in this shard's range applied into overlays", registry=r)
        self.apply_seconds = Histogram("embedding_delta_apply_duration_seconds",
                                       "ApplyDeltas work: verify, merge, index, publish",
                                       buckets=(1e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                                                2.5, 5.0, 10.0), registry=r)
        self.inflight = Gauge("embedding_inflight_requests", "Lookups being handled now",
                              registry=r, multiprocess_mode="livesum")

    def set_loaded(self, model: str, version: str, nbytes: int) -> None:
        self.loaded_bytes.labels(model, version).set(nbytes)

    def set_deltas(self, model: str, version: str, applied_seq: int, overlay_bytes: int) -> None:
        self.applied_seq.labels(model, version).set(applied_seq)
        self.overlay_bytes.labels(model, version).set(overlay_bytes)

    def clear_loaded(self, model: str, version: str) -> None:
        for gauge in (self.loaded_bytes, self.overlay_bytes, self.applied_seq):
            # Zero first: in multiprocess mode the per-process file keeps the last value.
            gauge.labels(model, version).set(0)
            gauge.remove(model, version)


def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> int:
    """Serve /metrics in a daemon thread; returns the bound port (port 0 = a free one)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)


def multiprocess_registry() -> CollectorRegistry:
    """A registry that merges the values every worker wrote to PROMETHEUS_MULTIPROC_DIR."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        raise RuntimeError("PROMETHEUS_MULTIPROC_DIR is not set")
    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry
