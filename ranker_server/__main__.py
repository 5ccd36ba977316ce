"""`ranker-server` / `python -m ranker_server`: parse flags, validate, serve until SIGTERM.

Every flag can also come from the environment as RANKER_<FLAG> (e.g. RANKER_EMBEDDING_SHARDS),
which is how the Kubernetes manifests configure it; a flag on the command line wins.
SIGTERM drains: /readyz fails first, the listener closes `--drain-grace-s` later, requests
in flight finish (up to `--drain-timeout-s`), then the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from pathlib import Path
from types import FrameType

import uvicorn

from ranker_server.app import RankerState, create_app
from ranker_server.config import ConfigError, RankerConfig, parse_shards
from ranker_server.device import resolve_device

log = logging.getLogger("ranker_server")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get("RANKER_" + name.upper(), default)


def build_parser() -> argparse.ArgumentParser:
    d = RankerConfig()
    p = argparse.ArgumentParser(prog="ranker-server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(flag: str, help: str, default: object, **kw: object) -> None:
        dest = flag.lstrip("-").replace("-", "_")
        env = _env(dest)
        p.add_argument(flag, default=env if env is not None else default, help=help, **kw)  # type: ignore[arg-type]

    add("--store", "model store directory (STORE/MODEL/VERSION)", str(d.store))
    add("--model", "model name served", d.model)
    add("--version", "version loaded, prepared and activated at startup", d.version)
    add("--embedding-shards", "embedding shards in shard order, comma-separated; each a "
        "dns:///host:port target or host:port replicas joined with '|'", "")
    add("--local-tables", "read tables in-process instead of from embedding shards", False,
        action="store_const", const=True)
    add("--device", "auto | cuda | cpu", d.device, choices=["auto", "cuda", "cpu"])
    add("--host", "bind address", d.host)
    add("--port", "HTTP port (0 = pick a free one)", d.port, type=int)
    add("--port-file", "write the bound port to this file once serving", None)
    add("--admin-token-file", "file with the admin bearer token (no file: admin API off)", None)
    add("--max-batch-candidates", "most candidates per device batch", d.max_batch_candidates,
        type=int)
    add("--max-batch-wait-ms", "longest wait for a batch to fill", d.max_batch_wait_ms,
        type=float)
    add("--no-eager-dispatch", "always wait --max-batch-wait-ms for a batch to fill, even "
        "when the device is idle", False, action="store_const", const=True)
    add("--max-queue", "requests that may wait for a batch; more get 429", d.max_queue, type=int)
    add("--max-batches-in-flight", "batches in the pipeline at once", d.max_batches_in_flight,
        type=int)
    add("--max-candidates", "most candidates per request", d.max_candidates, type=int)
    add("--max-body-bytes", "largest request body", d.max_body_bytes, type=int)
    add("--default-timeout-ms", "deadline of requests without timeout_ms", d.default_timeout_ms,
        type=int)
    add("--max-timeout-ms", "cap on a request's timeout_ms", d.max_timeout_ms, type=int)
    add("--prepare-timeout-s", "deadline of the prepare handshake's ListVersions calls",
        d.prepare_timeout_s, type=float)
    add("--startup-retry-s", "pause between prepare attempts of the startup version",
        d.startup_retry_s, type=float)
    add("--retry-after-s", "Retry-After of 429 answers", d.retry_after_s, type=int)
    add("--debug-serial-lookups", "await lookups before dense prep (no overlap; benchmarks)",
        False, action="store_const", const=True)
    add("--drain-grace-s", "after SIGTERM, seconds not-ready before closing the listener",
        d.drain_grace_s, type=float)
    add("--drain-timeout-s", "after SIGTERM, most seconds to finish in-flight requests",
        d.drain_timeout_s, type=float)
    add("--log-level", "debug | info | warning | error", d.log_level)
    return p


def config_from_args(args: argparse.Namespace) -> RankerConfig:
    def flag(v: object) -> bool:
        return v is True or (isinstance(v, str) and v.lower() in ("1", "true", "yes"))

    return RankerConfig(
        store=Path(args.store), model=args.model, version=args.version,
        embedding_shards=parse_shards(args.embedding_shards) if args.embedding_shards else (),
        local_tables=flag(args.local_tables), device=args.device, host=args.host,
        port=int(args.port), port_file=Path(args.port_file) if args.port_file else None,
        admin_token_file=Path(args.admin_token_file) if args.admin_token_file else None,
        max_batch_candidates=int(args.max_batch_candidates),
        max_batch_wait_ms=float(args.max_batch_wait_ms), max_queue=int(args.max_queue),
        eager_dispatch=not flag(args.no_eager_dispatch),
        max_batches_in_flight=int(args.max_batches_in_flight),
        max_candidates=int(args.max_candidates), max_body_bytes=int(args.max_body_bytes),
        default_timeout_ms=int(args.default_timeout_ms), max_timeout_ms=int(args.max_timeout_ms),
        prepare_timeout_s=float(args.prepare_timeout_s),
        startup_retry_s=float(args.startup_retry_s), retry_after_s=int(args.retry_after_s),
        debug_serial_lookups=flag(args.debug_serial_lookups),
        drain_grace_s=float(args.drain_grace_s), drain_timeout_s=float(args.drain_timeout_s),
        log_level=args.log_level,
    ).validate()


class DrainingServer(uvicorn.Server):
    """uvicorn, with readiness dropped before the listener closes, and exit 0 after SIGTERM."""

    def __init__(self, config: uvicorn.Config, ranker: RankerConfig,
                 state: list[RankerState]) -> None:
        super().__init__(config)
        self.ranker = ranker
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Deliberately not uvicorn's: it re-raises the signal after shutdown (exit 143).
        if self.state and not self.state[0].draining:
            log.info("signal %d: draining for %.1f s, then closing", sig, self.ranker.drain_grace_s)
            self.state[0].begin_drain()
            loop = asyncio.get_event_loop()
            loop.call_soon_threadsafe(loop.call_later, self.ranker.drain_grace_s,
                                      self._close)
        elif self.should_exit:
            self.force_exit = True  # a second signal while closing: stop waiting
        else:
            self.should_exit = True

    def _close(self) -> None:
        self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.ranker.port_file is not None and self.servers and not self.should_exit:
            port = self.servers[0].sockets[0].getsockname()[1]
            tmp = self.ranker.port_file.with_name(self.ranker.port_file.name + ".tmp")
            tmp.write_text(f"{port}\n")
            os.replace(tmp, self.ranker.port_file)
        log.info("ranker serving %s on http://%s:%s", self.ranker.model, self.ranker.host,
                 self.servers[0].sockets[0].getsockname()[1] if self.servers else "?")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=str(args.log_level).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        resolve_device(config.device)  # fail here, not in the lifespan, on a missing GPU
    except (ConfigError, ValueError) as e:
        print(f"ranker-server: error: {e}", file=sys.stderr)
        return 2
    state: list[RankerState] = []
    app = create_app(config, state_out=state)
    server = DrainingServer(
        uvicorn.Config(app, host=config.host, port=config.port, log_config=None,
                       log_level=config.log_level.lower(), access_log=False,
                       timeout_graceful_shutdown=int(config.drain_timeout_s) or 1,
                       lifespan="on"),
        config, state)
    server.run()
    if not server.started:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
