"""The controller's one typed configuration, validated at startup."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from deploy_controller.gates import GateConfig
from deploy_controller.state import validate_canary
from modelpack.configcli import require_at_least, require_path, require_port


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names it and its value."""


@dataclass(frozen=True)
class ControllerConfig:
    """Every knob of the deploy controller; each field has a default and a docstring."""

    host: str = "127.0.0.1"
    """Address the HTTP API listens on."""
    port: int = 8090
    """Port of the HTTP API (0 = any free port)."""
    port_file: Path | None = None
    """Once the API listens, write its bound port here (first line), atomically."""
    journal: Path = Path("deploy-journal.sqlite")
    """SQLite journal file; created if missing. Keep it on durable storage."""
    desired_state: Path | None = None
    """Desired-state file the controller keeps in step with the journal and the servers
    read at startup (their --desired-state); default desired-state.json beside the journal."""
    reconcile_interval_s: float = 5.0
    """Seconds between reconcile passes that repair servers drifted from the desired state
    (a restarted shard or ranker missing a version); 0 turns reconciling off."""
    delta_poll_s: float = 1.0
    """Seconds between looks at the active version's delta directory in the store; a newer
    delta that verifies is applied to every shard replica, then every ranker moves to it
    (health-gated) and it is committed. 0 = follow off (`deployctl delta advance` only)."""
    delta_gate_s: float = 2.0
    """Seconds the health gate watches the rankers after they move to a new delta seq
    (errors, p99, mismatches, mean-score drift vs the previous seq); 0 = commit at once."""
    admin_token_file: Path | None = None
    """File holding the bearer token that every mutating API call must present."""
    fleet_token_file: Path | None = None
    """Token for the rankers' and shards' admin APIs; defaults to admin_token_file."""
    discovery: Literal["local", "kubernetes"] = "local"
    """How the fleet is found: a fleet file, or pods listed through the Kubernetes API."""
    fleet: Path | None = None
    """Fleet file (JSON or YAML) for discovery=local."""
    store: Path | None = None
    """Model store; when set, a rollout of a version missing there is refused up front."""
    k8s_namespace: str = "default"
    """Namespace whose pods discovery=kubernetes lists."""
    k8s_ranker_selector: str = "app.kubernetes.io/component=ranker"
    """Label selector of ranker pods."""
    k8s_shard_selector: str = "app.kubernetes.io/component=embedding-shard"
    """Label selector of embedding-shard pods."""
    k8s_ranker_port: int = 8080
    """Ranker pods' HTTP port."""
    k8s_shard_port: int = 50051
    """Embedding-shard pods' gRPC port."""
    k8s_ranker_admin_port: int | None = None
    """Ranker pods' admin port (their --admin-port); unset: admin on k8s_ranker_port."""
    k8s_shard_admin_port: int | None = None
    """Embedding-shard pods' admin port (their --admin-port); unset: admin on k8s_shard_port."""
    k8s_shard_label: str = "hybrid-serving/shard"
    """Pod label holding the shard index; without it, StatefulSet ordinal mod k8s_num_shards."""
    k8s_num_shards: int = 0
    """Number of shards when the index comes from the pod ordinal (0 = use the label only)."""
    k8s_desired_configmap: str = ""
    """ConfigMap (in k8s_namespace) the desired state is also written to, key
    desired-state.json, for shard and ranker pods to mount; empty: the file only."""
    default_canary: tuple[int, ...] = (5, 25, 100)
    """Traffic shares (percent) of the canary steps when a rollout names none."""
    default_bake_s: float = 60.0
    """Seconds to watch each canary step when a rollout names no bake time."""
    gate_interval_s: float = 5.0
    """Seconds between health-gate evaluations during a bake."""
    gates: GateConfig = field(default_factory=GateConfig)
    """Health-gate thresholds."""
    gate_fail_after: int = 2
    """Consecutive failing gate evaluations that fail a bake (a single blip is tolerated)."""
    gate_max_failures: int = 3
    """Failing evaluations in one bake, consecutive or not, that fail it as flapping."""
    step_attempts: int = 4
    """Tries of one server call that failed in a retryable way (timeout, 5xx, 409)."""
    retry_backoff_s: float = 0.5
    """First pause between tries; doubles each time."""
    ranker_unload_timeout_s: float = 30.0
    """How long a ranker may wait for a version's in-flight requests when unloading it."""
    shard_drain_timeout_s: float = 30.0
    """How long a shard may wait for a version's in-flight lookups when unloading it."""
    http_timeout_s: float = 120.0
    """Timeout of one ranker admin call (loading a dense model can take a while)."""
    grpc_timeout_s: float = 600.0
    """Timeout of one shard LoadVersion (verifies every checksum of the tables)."""
    bluegreen_max_load: float = 2.0
    """Blue/green capacity rule: the most a replica may carry, as a multiple of its steady
    load (every replica serving): a version's share x a shard's replicas / the replicas
    holding it must stay <= this after every step (2 replicas per shard need 2.0)."""
    default_strategy: Literal["auto", "in_place", "blue_green"] = "auto"
    """Rollout strategy when a request names none: auto = in place when both versions fit
    every shard replica, blue/green when they do not."""
    max_unsupervised_s: float = 300.0
    """On restart, a canary left without gates for longer than this is rolled back."""
    crash_at: str = ""
    """Testing only: `STEP:begin|end` kills this process with SIGKILL at that journal write."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Python logging level of the controller (httpx's own lines stay at WARNING and up)."""

    def validate(self) -> ControllerConfig:
        """Raise ConfigError naming the first bad value; returns self."""
        require_port(ConfigError, "port", self.port)
        require_port(ConfigError, "k8s_ranker_admin_port", self.k8s_ranker_admin_port)
        require_port(ConfigError, "k8s_shard_admin_port", self.k8s_shard_admin_port)
        if self.admin_token_file is None:
            raise ConfigError("admin_token_file is required: mutating calls need a bearer token")
        require_path(ConfigError, "admin_token_file", self.admin_token_file, "file")
        require_path(ConfigError, "fleet_token_file", self.fleet_token_file, "file")
        if self.discovery not in ("local", "kubernetes"):
            raise ConfigError(f"discovery must be 'local' or 'kubernetes', got {self.discovery!r}")
        if self.discovery == "local" and self.fleet is None:
            raise ConfigError("discovery=local needs a fleet file (--fleet FILE)")
        require_path(ConfigError, "store", self.store, "dir")
        try:
            validate_canary(self.default_canary)
            self.gates.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        require_at_least(ConfigError, 0, {
            "default_bake_s": self.default_bake_s, "ranker_unload_timeout_s": self.ranker_unload_timeout_s,
            "shard_drain_timeout_s": self.shard_drain_timeout_s,
            "max_unsupervised_s": self.max_unsupervised_s, "retry_backoff_s": self.retry_backoff_s,
            "k8s_num_shards": self.k8s_num_shards,
            "reconcile_interval_s": self.reconcile_interval_s, "delta_poll_s": self.delta_poll_s,
            "delta_gate_s": self.delta_gate_s})
        require_at_least(ConfigError, 0, {
            "gate_interval_s": self.gate_interval_s, "http_timeout_s": self.http_timeout_s,
            "grpc_timeout_s": self.grpc_timeout_s}, strictly=True)
        require_at_least(ConfigError, 1, {"bluegreen_max_load": self.bluegreen_max_load})
        if self.default_strategy not in ("auto", "in_place", "blue_green"):
            raise ConfigError("default_strategy must be auto, in_place or blue_green, got "
                              f"{self.default_strategy!r}")
        require_at_least(ConfigError, 1, {
            "gate_fail_after": self.gate_fail_after, "gate_max_failures": self.gate_max_failures,
            "step_attempts": self.step_attempts})
        if self.crash_at and not self.crash_at.endswith((":begin", ":end")):
            raise ConfigError(f"crash_at must be STEP:begin or STEP:end, got {self.crash_at!r}")
        return self

    def desired_state_path(self) -> Path:
        return self.desired_state or self.journal.with_name("desired-state.json")

    def read_token(self, fleet: bool = False) -> str:
        path = self.fleet_token_file if fleet and self.fleet_token_file else self.admin_token_file
        if path is None:
            raise ConfigError("no token file configured")
        token = Path(path).read_text(encoding="utf-8").strip()
        if not token:
            raise ConfigError(f"token file {path} is empty")
        return token

