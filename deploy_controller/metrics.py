"""The controller's own Prometheus metrics, on a registry per app (no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
            "by kind (shard_load, ranker_load, ranker_prepare, ranker_split)", ["kind"],
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

    def set_phase(self, model: str, phase: Phase | None) -> None:
        self.phase.labels(model).set(0 if phase is None or phase is Phase.DONE else int(phase))
