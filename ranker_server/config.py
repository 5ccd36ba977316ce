"""The ranker's one typed configuration object, validated once at startup."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from modelpack.configcli import require_at_least, require_path, require_port
from modelpack.schema import SchemaError, check_name
from ranker_server.cache_policy import POLICIES, Policy

DeviceKind = Literal["auto", "cuda", "cpu"]


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and the value."""


def parse_shards(spec: str) -> tuple[tuple[str, ...], ...]:
    """`--embedding-shards` -> one replica tuple per shard, in shard order.

    Shards are separated by `,`; each is one `dns:///host:port` target (gRPC resolves
    and balances its replicas) or fixed `host:port` replicas joined with `|`.
    """
    shards: list[tuple[str, ...]] = []
    for i, part in enumerate(spec.split(",")):
        replicas = tuple(r.strip() for r in part.split("|"))
        if not part.strip() or any(not r for r in replicas):
            raise ConfigError(f"embedding_shards: shard {i} in {spec!r} is empty")
        for r in replicas:
            if ":///" in r:
                if len(replicas) > 1:
                    raise ConfigError(
                        f"embedding_shards: shard {i} mixes a resolver target {r!r} with "
                        "other replicas; use one dns:/// target or host:port replicas")
            elif r.rpartition(":")[0] == "" or not r.rpartition(":")[2].isdigit():
                raise ConfigError(
                    f"embedding_shards: shard {i} replica {r!r} is not host:port or dns:///host:port")
        shards.append(replicas)
    return tuple(shards)


@dataclass(frozen=True)
class RankerConfig:
    """Everything the ranker needs; every field has a default and is checked by validate()."""

    store: Path = Path("demo_store")
    """Model store directory holding STORE/<model>/<version>/."""
    model: str = "ads_ctr"
    """The one model this ranker serves; requests naming another model get 404."""
    version: str = "v1"
    """Version loaded, prepared and activated at startup (unless the desired state names one)."""
    desired_state: Path | None = None
    """The fleet's desired-state file (written by the deploy controller): when it names this
    ranker's model, its versions are loaded and prepared and its split served at startup,
    instead of --version; missing or unreadable, --version is used."""
    embedding_shards: tuple[tuple[str, ...], ...] = ()
    """Embedding shards in shard order, each a tuple of replica targets. On the command line:
    comma-separated shards, each a dns:///host:port target or host:port replicas joined with |."""
    embedding_transport: Literal["stream", "unary"] = "stream"
    """How lookups reach the shards: "stream" (one long-lived LookupStream per replica) or
    "unary" (one Lookup call per shard per batch, for comparison and older shards)."""
    routing_refresh_s: float = 1.0
    """Seconds between the embedding client's ListVersions rounds that learn which replica
    holds which version READY (a lookup then goes only to replicas that can answer it); a
    refusal also triggers one. 0: no routing."""
    prepare_min_replicas: int = 0
    """Replicas per shard that must hold a version READY for prepare and /readyz: 0 = every
    replica (in-place rollouts); 1 for fleets rolled out blue/green. Another build always
    refuses. The controller's prepare may ask for 1 per call (?min_replicas=1)."""
    local_tables: bool = False
    """Read tables in-process from the store instead of calling embedding shards."""
    cache_bytes: int = 0
    """Bytes of the hot-row cache in front of the embedding tier, on --device (GPU memory on
    CUDA, host memory on the CPU): packed INT4 rows keyed by (version, table, row), exact at
    every delta seq; only misses go over the wire. 0: off (no cache)."""
    cache_policy: Policy = "tinylfu"
    """Row cache admission and eviction: tinylfu (a miss displaces the least recently used
    row only if asked for more often) or lru (every miss admitted)."""
    device: DeviceKind = "auto"
    """Where the dense model runs: cuda, cpu, or auto (cuda when available)."""
    host: str = "127.0.0.1"
    """Address the HTTP server binds."""
    port: int = 8080
    """HTTP port; 0 picks a free one (see port_file)."""
    port_file: Path | None = None
    """If set, the bound port is written here (atomically) once the server accepts requests;
    with --admin-port, a later line `admin=PORT` names the admin listener's port."""
    admin_port: int | None = None
    """Serve /admin/v1/* (with /metrics and /healthz) on this port only, so a NetworkPolicy
    can let only the controller reach it; 0 picks a free one. Unset: admin on --port."""
    admin_token_file: Path | None = None
    """File holding the admin bearer token; without it the admin API answers 403."""
    embedding_token_file: Path | None = None
    """File holding the bearer token the embedding shards' Lookup requires (their
    --lookup-token-file); sent with every lookup. Without it lookups carry no token."""
    max_batch_candidates: int = 4096
    """Upper bound on candidates in one device batch (a single request may fill it alone)."""
    max_batch_wait_ms: float = 1.0
    """How long the oldest queued request may wait for others to join its batch."""
    eager_dispatch: bool = True
    """Start a batch at once when none is running; --no-eager-dispatch always waits
    max_batch_wait_ms for the batch to fill."""
    max_queue: int = 256
    """Requests that may wait for a batch; beyond it new requests get 429."""
    shed_loop_lag_ms: float = 0.0
    """Also answer 429 while the event loop runs more than this many ms late (a timer's
    lateness, sampled every 5 ms): requests it reads then have already waited that long
    unread. Bounds latency when the loop, not the queue, is the bottleneck. 0: off."""
    max_batches_in_flight: int = 2
    """Batches in the pipeline at once: 2 lets batch k+1's lookups overlap batch k's forward."""
    max_candidates: int = 1000
    """Most candidates one request may carry (more is a 422 naming `candidates`)."""
    max_body_bytes: int = 16 << 20
    """Largest request body accepted (more is a 413)."""
    default_timeout_ms: int = 1000
    """Deadline of requests that carry no timeout_ms."""
    max_timeout_ms: int = 60_000
    """Upper bound applied to a request's timeout_ms."""
    debug_serial_lookups: bool = False
    """Debug: await the lookups before preparing dense inputs (disables the overlap)."""
    prepare_timeout_s: float = 5.0
    """Deadline of the ListVersions calls of one prepare handshake."""
    startup_retry_s: float = 0.5
    """Pause between attempts to prepare the startup version while shards come up."""
    drain_grace_s: float = 1.0
    """After SIGTERM: seconds with /readyz failing before the listener closes."""
    drain_timeout_s: float = 30.0
    """After SIGTERM: most seconds to wait for in-flight requests before exiting."""
    retry_after_s: int = 1
    """Retry-After header value on 429 and overload 503 answers."""
    log_level: str = "info"
    """Python logging level: debug, info, warning, error or critical."""
    workers: int = 1
    """Ranker processes serving --port together (SO_REUSEPORT) and sharing the device: one
    Python process answers a few hundred requests/s, a GPU takes far more. Above 1, this
    process supervises them and serves the admin API, the probes and /metrics on
    --admin-port (required, as is --admin-token-file), passing every admin change to every
    worker and restarting any that did not take it."""
    group_worker: bool = False
    """Set by a --workers supervisor on the processes it starts, never by hand: join --port
    with SO_REUSEPORT and serve admin on a private loopback port."""
    group_admin_port: int | None = None
    """Set by a --workers supervisor on its workers: /metrics on the data port answers the
    whole group's metrics, read from the supervisor on this loopback port."""

    def validate(self) -> RankerConfig:
        """Raise ConfigError naming the first bad field and value; return self."""
        try:
            check_name("model", self.model)
            check_name("version", self.version)
        except SchemaError as e:
            raise ConfigError(str(e)) from None
        require_path(ConfigError, "store", self.store, "dir")
        if self.local_tables == bool(self.embedding_shards):
            raise ConfigError(
                "embedding_shards: give either --embedding-shards or --local-tables, "
                f"got shards={list(self.embedding_shards)!r} local_tables={self.local_tables}")
        if self.embedding_transport not in ("stream", "unary"):
            raise ConfigError(f"embedding_transport: must be stream or unary, got "
                              f"{self.embedding_transport!r}")
        require_at_least(ConfigError, 0, {"cache_bytes": self.cache_bytes,
                                          "routing_refresh_s": self.routing_refresh_s,
                                          "prepare_min_replicas": self.prepare_min_replicas})
        if self.cache_policy not in POLICIES:
            raise ConfigError(f"cache_policy: must be one of {', '.join(POLICIES)}, got "
                              f"{self.cache_policy!r}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"device: must be auto, cuda or cpu, got {self.device!r}")
        require_port(ConfigError, "port", self.port)
        require_port(ConfigError, "admin_port", self.admin_port)
        require_port(ConfigError, "group_admin_port", self.group_admin_port)
        if self.admin_port and self.admin_port == self.port:
            raise ConfigError(f"admin_port: {self.admin_port} is --port; give another one")
        require_path(ConfigError, "admin_token_file", self.admin_token_file, "file")
        if self.admin_token_file is not None and not self.admin_token():
            raise ConfigError(f"admin_token_file {str(self.admin_token_file)!r} is empty")
        require_path(ConfigError, "embedding_token_file", self.embedding_token_file, "file")
        if self.embedding_token_file is not None and not self.embedding_token():
            raise ConfigError(f"embedding_token_file {str(self.embedding_token_file)!r} is empty")
        require_at_least(ConfigError, 0, {
            "max_batch_candidates": self.max_batch_candidates, "max_queue": self.max_queue,
            "max_batches_in_flight": self.max_batches_in_flight,
            "max_candidates": self.max_candidates, "max_body_bytes": self.max_body_bytes,
            "default_timeout_ms": self.default_timeout_ms, "max_timeout_ms": self.max_timeout_ms,
            "prepare_timeout_s": self.prepare_timeout_s, "startup_retry_s": self.startup_retry_s,
            "drain_timeout_s": self.drain_timeout_s}, strictly=True)
        require_at_least(ConfigError, 0, {
            "max_batch_wait_ms": self.max_batch_wait_ms, "drain_grace_s": self.drain_grace_s,
            "retry_after_s": self.retry_after_s, "shed_loop_lag_ms": self.shed_loop_lag_ms})
        if self.max_candidates > self.max_batch_candidates:
            raise ConfigError(
                f"max_candidates: {self.max_candidates} exceeds max_batch_candidates "
                f"{self.max_batch_candidates}; one request must fit one batch")
        if self.default_timeout_ms > self.max_timeout_ms:
            raise ConfigError(f"default_timeout_ms: {self.default_timeout_ms} exceeds "
                              f"max_timeout_ms {self.max_timeout_ms}")
        require_at_least(ConfigError, 1, {"workers": self.workers})
        if self.workers > 1 and (self.admin_port is None or self.admin_token_file is None):
            raise ConfigError(f"workers: {self.workers} workers need --admin-port and "
                              "--admin-token-file (their supervisor passes admin changes on)")
        if self.group_worker and self.workers != 1:
            raise ConfigError("group_worker: a worker of a group runs with --workers 1")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"log_level: unknown level {self.log_level!r}")
        return self

    def admin_token(self) -> str | None:
        """The admin bearer token, or None when the admin API is disabled."""
        return _read_token(self.admin_token_file)

    def embedding_token(self) -> str | None:
        """The token sent with every Lookup, or None."""
        return _read_token(self.embedding_token_file)


def _read_token(path: Path | None) -> str | None:
    return None if path is None else path.read_text(encoding="utf-8").strip()
