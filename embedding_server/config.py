"""The embedding server's one typed config object, its command line, and its validation."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    """(model, version) pairs loaded before the server reports SERVING."""
    host: str = "127.0.0.1"
    """Interface to listen on; 0.0.0.0 or [::] to accept remote clients."""
    port: int = 50051
    """gRPC port; 0 picks a free port (printed, and written to port_file)."""
    port_file: Path | None = None
    """If set, the bound gRPC port (line 1) and metrics port (line 2) are written here."""
    metrics_port: int | None = None
    """Prometheus /metrics HTTP port; None disables it, 0 picks a free port."""
    admin_token_file: Path | None = None
    """File the admin token was read from (passed on to --workers children)."""
    admin_token: str | None = field(default=None, repr=False)
    """Bearer token admin RPCs must present; None disables admin RPCs entirely."""
    memory_budget_bytes: int = 0
    """Upper bound on table bytes mapped by all loaded versions together."""
    workers: int = 1
    """Server processes sharing the port through SO_REUSEPORT (one core each)."""
    max_rows_per_request: int = 1 << 20
    """Largest total row count one Lookup may ask for (INVALID_ARGUMENT above)."""
    max_concurrent: int = 32
    """Lookups allowed in flight at once; more get RESOURCE_EXHAUSTED."""
    grace_period_s: float = 10.0
    """On SIGTERM, seconds in-flight RPCs get to finish before they are cancelled."""
    drain_timeout_s: float = 30.0
    """Default time UnloadVersion waits for a version's in-flight lookups."""
    log_level: str = "INFO"
    """Python logging level name."""
    peer_dir: Path | None = None
    """Internal (set by the --workers supervisor): where sibling workers list their ports."""

    @property
    def threads(self) -> int:
        """gRPC handler threads: one per allowed lookup plus a few for admin and health."""
        return self.max_concurrent + 8

    def validate(self) -> ServerConfig:
        """Raise ConfigError naming the first bad setting; return self when all are sane."""
        if not self.store.is_dir():
            raise ConfigError(f"--store {self.store}: not a directory")
        if self.num_shards < 1:
            raise ConfigError(f"--num-shards must be >= 1, got {self.num_shards}")
        if not 0 <= self.shard < self.num_shards:
            raise ConfigError(f"--shard must be in [0, {self.num_shards}), got {self.shard}")
        for name, port in (("--port", self.port), ("--metrics-port", self.metrics_port)):
            if port is not None and not 0 <= port <= 65535:
                raise ConfigError(f"{name} must be in [0, 65535], got {port}")
        if self.metrics_port is not None and self.metrics_port == self.port != 0:
            raise ConfigError(f"--metrics-port {self.metrics_port} is also the gRPC --port")
        if self.memory_budget_bytes <= 0:
            raise ConfigError(f"--memory-budget must be > 0 bytes, got {self.memory_budget_bytes}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.max_rows_per_request < 1:
            raise ConfigError(f"--max-rows-per-request must be >= 1, got {self.max_rows_per_request}")
        if self.max_concurrent < 1:
            raise ConfigError(f"--max-concurrent must be >= 1, got {self.max_concurrent}")
        if self.grace_period_s < 0:
            raise ConfigError(f"--grace-period must be >= 0 seconds, got {self.grace_period_s}")
        if self.drain_timeout_s <= 0:
            raise ConfigError(f"--drain-timeout must be > 0 seconds, got {self.drain_timeout_s}")
        if self.admin_token is not None and not self.admin_token:
            raise ConfigError("--admin-token-file is empty; put a non-empty token in it")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        return self


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="embedding-server",
        description="Serve one row shard of INT4 embedding tables over gRPC "
        "(hybrid.embedding.v1.EmbeddingService), memory-mapped from a model store.",
    )
    p.add_argument("--store", required=True, type=Path, help="model store root: STORE/<model>/<version>/")
    p.add_argument("--shard", type=int, default=0, help="this server's shard index k (default 0)")
    p.add_argument("--num-shards", type=int, default=1, help="total shards S (default 1)")
    p.add_argument("--preload", action="append", default=[], metavar="MODEL/VERSION",
                   help="load this version at startup, before reporting SERVING (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port; 0 = pick a free one (default 50051)")
    p.add_argument("--port-file", type=Path, default=None,
                   help="write the bound gRPC port (line 1) and metrics port (line 2) here, atomically")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port; 0 = pick a free one (default: off)")
    p.add_argument("--admin-token-file", type=Path, default=None,
                   help="file holding the bearer token that LoadVersion/UnloadVersion must send as "
                   "'authorization: Bearer <token>'. Without it, admin RPCs are refused entirely "
                   "(versions can then only come from --preload)")
    p.add_argument("--memory-budget", default="0.8",
                   help="max bytes of mapped table files over all loaded versions: bytes "
                   "(8000000000, 8G, 8GiB) or a fraction of RAM/cgroup limit (default 0.8)")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes sharing the port via SO_REUSEPORT (default 1)")
    p.add_argument("--max-rows-per-request", type=int, default=1 << 20,
                   help="largest total rows in one Lookup (default 1048576)")
    p.add_argument("--max-concurrent", type=int, default=32,
                   help="lookups in flight per process; beyond it RESOURCE_EXHAUSTED (default 32)")
    p.add_argument("--grace-period", type=float, default=10.0,
                   help="seconds in-flight RPCs get to finish after SIGTERM (default 10)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="default seconds UnloadVersion waits for in-flight lookups (default 30)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    p.add_argument("--peer-dir", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def config_from_args(argv: Sequence[str] | None = None) -> ServerConfig:
    """Parse the command line into a validated ServerConfig (ConfigError on bad values)."""
    a = build_parser().parse_args(argv)
    token = None
    if a.admin_token_file is not None:
        try:
            token = a.admin_token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--admin-token-file {a.admin_token_file}: cannot read it: {e}") from None
    return ServerConfig(
        store=a.store, shard=a.shard, num_shards=a.num_shards,
        preload=tuple(parse_model_version(s) for s in a.preload),
        host=a.host, port=a.port, port_file=a.port_file, metrics_port=a.metrics_port,
        admin_token_file=a.admin_token_file, admin_token=token,
        memory_budget_bytes=parse_memory_budget(a.memory_budget),
        workers=a.workers, max_rows_per_request=a.max_rows_per_request,
        max_concurrent=a.max_concurrent, grace_period_s=a.grace_period,
        drain_timeout_s=a.drain_timeout, log_level=a.log_level, peer_dir=a.peer_dir,
    ).validate()


def worker_argv(cfg: ServerConfig, port: int, peer_dir: Path) -> list[str]:
    """Command-line flags for one --workers child: same settings, one process, fixed port.

    Children serve no metrics and write no port file: the supervisor does both.
    """
    argv = ["--store", str(cfg.store), "--shard", str(cfg.shard), "--num-shards", str(cfg.num_shards),
            "--host", cfg.host, "--port", str(port), "--workers", "1",
            "--memory-budget", str(cfg.memory_budget_bytes),
            "--max-rows-per-request", str(cfg.max_rows_per_request),
            "--max-concurrent", str(cfg.max_concurrent), "--grace-period", str(cfg.grace_period_s),
            "--drain-timeout", str(cfg.drain_timeout_s), "--log-level", cfg.log_level,
            "--peer-dir", str(peer_dir)]
    for model, version in cfg.preload:
        argv += ["--preload", f"{model}/{version}"]
    if cfg.admin_token_file is not None:
        argv += ["--admin-token-file", str(cfg.admin_token_file)]
    return argv
