"""The embedding server's one typed config object, its command line, and its validation."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from modelpack.configcli import ConfigFlags, Flag, require_at_least, require_path, require_port
from modelpack.schema import SchemaError, check_name

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


class ConfigError(ValueError):
    """A server setting that cannot work; the message names the flag and the bad value."""


@dataclass(frozen=True)
class ServerConfig:
    """Every setting of one embedding server process (or of a --workers supervisor)."""

    store: Path
    """Model store root: versions live in STORE/<model>/<version>/."""
    shard: int = 0
    """This server's shard index k: it serves rows [k*R/S, (k+1)*R/S) of every table."""
    num_shards: int = 1
    """S, the number of row shards the tables are split into across servers."""
    preload: tuple[tuple[str, str], ...] = ()
    """Versions (MODEL/VERSION) loaded before the server reports SERVING; repeat the flag
    for several."""
    desired_state: Path | None = None
    """The fleet's desired-state file (written by the deploy controller): at startup the
    server loads every version it lists for this server's models before reporting SERVING,
    whatever --preload says; a missing file means 'nothing desired yet'."""
    host: str = "127.0.0.1"
    """Interface to listen on; 0.0.0.0 or [::] to accept remote clients."""
    port: int = 50051
    """gRPC port; 0 picks a free port (printed, and written to port_file)."""
    port_file: Path | None = None
    """If set, the bound gRPC port (line 1), metrics port (line 2) and `admin=PORT` (with
    --admin-port) are written here, atomically."""
    metrics_port: int | None = None
    """Prometheus /metrics HTTP port; unset disables it, 0 picks a free port."""
    admin_token_file: Path | None = None
    """File holding the bearer token LoadVersion/UnloadVersion/ApplyDeltas must send as
    'authorization: Bearer <token>'. Without it admin RPCs are refused entirely (versions
    then come only from --preload)."""
    admin_port: int | None = None
    """Serve LoadVersion/UnloadVersion/ApplyDeltas on this port only (the data port refuses them with
    PERMISSION_DENIED; ListVersions stays on both), so a NetworkPolicy can let only the
    controller reach admin; 0 picks a free port. Unset: admin on --port. With --workers,
    every worker listens on it (SO_REUSEPORT), like on --port."""
    admin_token: str | None = field(default=None, repr=False)
    """Bearer token admin RPCs must present (read from admin_token_file); None disables them."""
    memory_budget_bytes: int = 0
    """Upper bound on table bytes mapped by all loaded versions together: bytes (8000000000,
    8G, 8GiB) or a fraction of RAM or of the cgroup memory limit (e.g. 0.5)."""
    workers: int = 1
    """Server processes sharing the port through SO_REUSEPORT (one core each)."""
    lookup_token_file: Path | None = None
    """File holding a bearer token every Lookup must send as 'authorization: Bearer
    <token>' (the data port's own token, not the admin one). Without it Lookup is open to
    whoever reaches the port."""
    max_rows_per_request: int = 1 << 20
    """Largest total row count one Lookup may ask for (INVALID_ARGUMENT above)."""
    max_bags_per_request: int = 1 << 20
    """Largest total count of output vectors (bags; one per row when unpooled) one Lookup
    may ask for: empty bags cost no rows but still an answer each."""
    max_tables_per_request: int = 1024
    """Most table groups one Lookup may carry (the ranker sends one per table of the model)."""
    max_response_bytes: int = 64 << 20
    """Largest answer one Lookup may need, computed before any work as rows or bags times
    the row width of the requested output (4 + dim/2 bytes packed, 2*dim fp16, 4*dim fp32)."""
    max_concurrent: int = 32
    """Lookups allowed in flight per process at once; more get RESOURCE_EXHAUSTED."""
    max_streams: int = 64
    """LookupStreams open at once per process (each holds a gRPC thread while open); more
    are refused at open with RESOURCE_EXHAUSTED. Rankers keep one per replica each."""
    readable_seqs: int = 2
    """Delta seqs kept readable per version (the most recently applied ones, seq 0 = the
    version's own rows until K deltas were applied): rankers at s and s+1 are both served
    while the fleet advances; each costs the memory of its overlay."""
    grace_period_s: float = 10.0
    """On SIGTERM, seconds in-flight RPCs get to finish before they are cancelled."""
    drain_timeout_s: float = 30.0
    """Default seconds UnloadVersion waits for a version's in-flight lookups."""
    log_level: str = "INFO"
    """Python logging level: DEBUG, INFO, WARNING or ERROR."""
    peer_dir: Path | None = None
    """Internal (set by the --workers supervisor): where sibling workers list their ports."""

    @property
    def threads(self) -> int:
        """gRPC handler threads: one per allowed lookup and per open stream, a few for admin
        and health."""
        return self.max_concurrent + self.max_streams + 8

    def validate(self) -> ServerConfig:
        """Raise ConfigError naming the first bad setting; return self when all are sane."""
        require_path(ConfigError, "--store", self.store, "dir")
        require_at_least(ConfigError, 1, {"--num-shards": self.num_shards})
        if not 0 <= self.shard < self.num_shards:
            raise ConfigError(f"--shard must be in [0, {self.num_shards}), got {self.shard}")
        require_port(ConfigError, "--port", self.port)
        require_port(ConfigError, "--metrics-port", self.metrics_port)
        require_port(ConfigError, "--admin-port", self.admin_port)
        if self.admin_port and self.admin_port in (self.port, self.metrics_port):
            raise ConfigError(f"--admin-port {self.admin_port} is also --port or --metrics-port")
        if self.metrics_port is not None and self.metrics_port == self.port != 0:
            raise ConfigError(f"--metrics-port {self.metrics_port} is also the gRPC --port")
        require_at_least(ConfigError, 0, {"--memory-budget": self.memory_budget_bytes}, strictly=True)
        require_at_least(ConfigError, 1, {
            "--workers": self.workers, "--max-rows-per-request": self.max_rows_per_request,
            "--max-bags-per-request": self.max_bags_per_request,
            "--max-tables-per-request": self.max_tables_per_request,
            "--max-response-bytes": self.max_response_bytes, "--max-concurrent": self.max_concurrent,
            "--max-streams": self.max_streams, "--readable-seqs": self.readable_seqs})
        require_at_least(ConfigError, 0, {"--grace-period": self.grace_period_s})
        require_at_least(ConfigError, 0, {"--drain-timeout": self.drain_timeout_s}, strictly=True)
        for flag, token in (("--admin-token-file", self.admin_token),
                            ("--lookup-token-file", self.lookup_token())):
            if token is not None and not token:
                raise ConfigError(f"{flag} is empty; put a non-empty token in it")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        return self

    def lookup_token(self) -> str | None:
        """The data port's bearer token (read from lookup_token_file); None: Lookup is open."""
        return _read_token("--lookup-token-file", self.lookup_token_file)


def total_memory_bytes() -> int:
    """Physical RAM, or the cgroup memory limit when the container has a smaller one."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw.isdigit():
            total = min(total, int(raw))
    return int(total)


def parse_memory_budget(text: str, total: int | None = None) -> int:
    """'0.5' -> half of RAM; '8GiB', '8G', '8000000000' -> bytes."""
    s = text.strip()
    try:
        frac = float(s)
    except ValueError:
        frac = -1.0
    if "." in s and 0 < frac <= 1:
        return int(frac * (total if total is not None else total_memory_bytes()))
    m = _SIZE_RE.match(s)
    if not m or (m.group(2) is None and "." in m.group(1)):
        raise ConfigError(
            f"--memory-budget {text!r}: give bytes (e.g. 8000000000, 8G, 8GiB) "
            "or a fraction of RAM in (0, 1] (e.g. 0.5)"
        )
    unit = (m.group(2) or "").upper().removesuffix("B")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_model_version(text: str) -> tuple[str, str]:
    """'MODEL/VERSION' -> (model, version), both checked as safe path components."""
    parts = text.split("/")
    if len(parts) != 2:
        raise ConfigError(f"--preload {text!r}: expected MODEL/VERSION")
    try:
        return check_name("model", parts[0]), check_name("version", parts[1])
    except SchemaError as e:
        raise ConfigError(f"--preload {text!r}: {e}") from None


def _preload(texts: list[str]) -> tuple[tuple[str, str], ...]:
    return tuple(parse_model_version(t) for t in texts)


# Only where an option differs from its field: older flag names, a repeated flag, and
# values parsed after argparse so that their errors are ConfigErrors naming the value.
FLAGS = ConfigFlags(ServerConfig, skip=("admin_token",), flags={
    "preload": Flag(repeat=True, metavar="MODEL/VERSION", convert=_preload,
                    unparse=lambda pairs: [f"{m}/{v}" for m, v in pairs]),
    "memory_budget_bytes": Flag(name="--memory-budget", default="0.8", convert=parse_memory_budget),
    "grace_period_s": Flag(name="--grace-period"),
    "drain_timeout_s": Flag(name="--drain-timeout"),
    "peer_dir": Flag(hidden=True),
})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="embedding-server",
        description="Serve one row shard of INT4 embedding tables over gRPC "
        "(hybrid.embedding.v1.EmbeddingService), memory-mapped from a model store.",
    )
    FLAGS.add_to(p)
    return p


def config_from_args(argv: Sequence[str] | None = None) -> ServerConfig:
    """Parse the command line into a validated ServerConfig (ConfigError on bad values)."""
    values = FLAGS.values(build_parser().parse_args(argv))
    token = _read_token("--admin-token-file", values["admin_token_file"])
    return ServerConfig(**values, admin_token=token).validate()


def _read_token(flag: str, path: Path | None) -> str | None:
    """The stripped contents of a token file; ConfigError naming `flag` if unreadable."""
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag} {path}: cannot read it: {e}") from None


def worker_argv(cfg: ServerConfig, port: int, peer_dir: Path) -> list[str]:
    """Command-line flags for one --workers child: same settings, one process, fixed port.

    Children serve no metrics and write no port file: the supervisor does both.
    """
    child = replace(cfg, port=port, workers=1, peer_dir=peer_dir, metrics_port=None, port_file=None)
    return FLAGS.argv(child)
