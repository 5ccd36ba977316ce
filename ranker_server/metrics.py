"""Prometheus metrics of one ranker, in a registry of its own (no process-wide globals).

Names use base units (`_seconds`) and `_total` for counters. Labels carry versions,
outcomes, status codes and error reasons, never request or entity IDs.
"""

from __future__ import annotations

import contextlib
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# 0.25 ms .. 10 s: resolves a sub-millisecond CPU forward and a stuck multi-second request.
_LATENCY = (0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03,
            0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0)
_CANDIDATES = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# A delta written -> served: ~1 s in the demo, minutes when a controller is paused.
_FRESHNESS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class Metrics:
    """Every metric the ranker exports; create one per app."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.request_duration = Histogram(
            "ranker_request_duration_seconds", "Time from admission to response of /v1/rank.",
            ["version", "outcome"], buckets=_LATENCY, registry=r)
        self.queue_wait = Histogram(
            "ranker_queue_wait_seconds", "Time a request waited for its batch to start.",
            buckets=_LATENCY, registry=r)
        self.batch_candidates = Histogram(
            "ranker_batch_candidates", "Candidates per device batch.",
            buckets=_CANDIDATES, registry=r)
        self.lookup_duration = Histogram(
            "ranker_lookup_duration_seconds", "Embedding lookups of one batch, fired to answered.",
            buckets=_LATENCY, registry=r)
        self.forward_duration = Histogram(
            "ranker_device_forward_seconds",
            "Device work of one batch: dequantize, pool, dense forward, scores back.",
            buckets=_LATENCY, registry=r)
        self.version_mismatch = Counter(
            "ranker_version_mismatch", "Requests failed because a shard answered with another "
            "version or fingerprint than the request was pinned to.", registry=r)
        self.version_not_loaded = Counter(
            "ranker_version_not_loaded", "Requests failed because a shard does not hold the "
            "version the request was pinned to READY (not loaded yet, or unloading).", registry=r)
        self.lookup_rows_requested = Counter(
            "ranker_lookup_rows_requested", "Table rows the batches asked for, repeats included.",
            registry=r)
        self.lookup_rows_unique = Counter(
            "ranker_lookup_rows_unique", "Table rows sent to the embedding shards: each row once "
            "per table per batch.", registry=r)
        self.errors = Counter(
            "ranker_errors", "Failed requests by reason.", ["reason"], registry=r)
        self.requests = Counter(
            "ranker_requests", "Answered /v1/rank requests by version and HTTP status.",
            ["version", "code"], registry=r)
        # A gauge only because a Counter would be renamed ranker_score_sum_total; it only grows
        # (scores are probabilities), so Δsum / Δranker_scores_total is the mean score.
        self.score_sum = Gauge(
            "ranker_score_sum", "Sum of returned scores (with ranker_scores_total: the mean).",
            ["version"], registry=r)
        self.scores = Counter(
            "ranker_scores", "Returned scores (one per candidate).", ["version"], registry=r)
        self.inflight = Gauge(
            "ranker_inflight_requests", "Requests pinned to a version and not yet finished.",
            ["version"], registry=r)
        self.traffic_share = Gauge(
            "ranker_traffic_share", "Share of new requests routed to a version.",
            ["version"], registry=r)
        self.delta_seq = Gauge(
            "ranker_delta_seq", "The delta seq new batches of a version read at (0: its own "
            "rows).", ["model", "version"], registry=r)
        self.delta_age = Gauge(
            "ranker_delta_age_seconds", "Age of the delta a version is served at: now minus "
            "its manifest's written_at (absent at seq 0).", ["model", "version"], registry=r)
        self.delta_freshness = Histogram(
            "ranker_delta_freshness_seconds", "From a delta's manifest written_at to this "
            "ranker serving it (observed when a version's seq advances).", ["model"],
            buckets=_FRESHNESS, registry=r)
        self.seq_not_applied = Counter(
            "ranker_seq_not_applied", "Lookups a shard replica refused because it cannot read "
            "the delta seq named (failed over to a sibling, or failed).", ["shard"], registry=r)

    def count_failed_request(self, reason: str) -> None:
        """A request failed for `reason`: the two version failures have counters of their own
        (counted per request, even if its caller already gave up: the rollout gates read them)."""
        if reason == "version_mismatch":
            self.version_mismatch.inc()
        elif reason == "version_not_loaded":
            self.version_not_loaded.inc()

    def delta_served(self, model: str, version: str, seq: int, written_at: float, *,
                     fresh: bool) -> None:
        """`version` is now read at `seq`, written at `written_at` (0: seq 0, nothing
        written); `fresh`: an advance, whose lag the freshness histogram records."""
        self.delta_seq.labels(model, version).set(seq)
        if seq == 0 or written_at <= 0:
            with contextlib.suppress(KeyError):
                self.delta_age.remove(model, version)
            return
        self.delta_age.labels(model, version).set_function(lambda: time.time() - written_at)
        if fresh:
            self.delta_freshness.labels(model).observe(max(0.0, time.time() - written_at))

    def forget_version(self, model: str, version: str) -> None:
        """Drop the gauges of an unloaded version so dashboards stop showing it."""
        for g in (self.inflight, self.traffic_share):
            with contextlib.suppress(KeyError):
                g.remove(version)
        for g in (self.delta_seq, self.delta_age):
            with contextlib.suppress(KeyError):
                g.remove(model, version)

    def render(self) -> bytes:
        return generate_latest(self.registry)
