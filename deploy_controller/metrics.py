"""The controller's own Prometheus metrics, on a registry per app (no globals)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from deploy_controller.state import Phase


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.phase = Gauge(
            "deploy_rollout_phase",
            "Phase of the model's active rollout: 0 idle, 1 stage dense, 2 stage embeddings "
            "and switch, 3 retire, 4 rolling back", ["model"], registry=self.registry)
        self.step_duration = Histogram(
            "deploy_step_duration_seconds", "Wall time of one rollout step",
            ["step", "outcome"], registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))
        self.rollbacks = Counter(
            "deploy_rollbacks", "Rollouts that started rolling back, by reason",
            ["reason"], registry=self.registry)
        self.rollouts = Counter(
            "deploy_rollouts", "Rollouts that ended, by final status", ["status"],
            registry=self.registry)
        self.gate_evaluations = Counter(
            "deploy_gate_evaluations", "Health-gate evaluations during bakes, by result",
            ["result"], registry=self.registry)
        self.recoveries = Counter(
            "deploy_recoveries", "Interrupted rollouts found at startup, by decision",
            ["decision"], registry=self.registry)

        self.reconcile_repairs = Counter(
            "deploy_controller_reconcile_repairs", "Servers repaired toward the desired state, "
            "by kind (shard_load, shard_seq, ranker_load, ranker_prepare, ranker_split, "
            "ranker_seq)", ["kind"],
            registry=self.registry)
        self.reconcile_errors = Counter(
            "deploy_controller_reconcile_errors", "Reconcile calls that failed (server "
            "unreachable, load refused)", registry=self.registry)
        self.reconcile_passes = Counter(
            "deploy_controller_reconcile_passes", "Reconcile passes, by result (ok, drift, "
            "error)", ["result"], registry=self.registry)
        self.reconcile_last = Gauge(
            "deploy_controller_reconcile_last_timestamp_seconds",
            "Unix time of the last reconcile pass", registry=self.registry)

        self.delta_committed_seq = Gauge(
            "deploy_delta_committed_seq", "The model's committed delta seq (of its serving "
            "version; 0 = the version's own rows)", ["model"], registry=self.registry)
        self.delta_advances = Counter(
            "deploy_delta_advances", "Delta operations that ended, by outcome (committed, "
            "reverted, refused, gate_failed, failed)", ["outcome"], registry=self.registry)
        self._written_at: Callable[[], dict[str, float]] = dict
        self.registry.register(_Freshness(lambda: self._written_at()))

    def freshness_from(self, written_at: Callable[[], dict[str, float]]) -> None:
        """Where the freshness lag comes from: model -> written_at of its committed delta."""
        self._written_at = written_at

    def set_phase(self, model: str, phase: Phase | None) -> None:
        self.phase.labels(model).set(0 if phase is None or phase is Phase.DONE else int(phase))


class _Freshness(Collector):
    """deploy_delta_freshness_lag_seconds, computed at scrape time (it grows between
    commits, so a gauge set at commit would read 0 until the next one)."""

    def __init__(self, written_at: Callable[[], dict[str, float]]) -> None:
        self._written_at = written_at

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("deploy_delta_freshness_lag_seconds", "Seconds since the "
                              "committed delta of the model was written (now - written_at)",
                              labels=["model"])
        now = time.time()
        for model, at in sorted(self._written_at().items()):
            g.add_metric([model], max(0.0, now - at))
        yield g
