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
from types import FrameType

import uvicorn

from modelpack.configcli import ConfigFlags, Flag
from ranker_server.app import RankerState, create_app
from ranker_server.config import ConfigError, RankerConfig, parse_shards
from ranker_server.device import resolve_device
from ranker_server.ports import bind

log = logging.getLogger("ranker_server")


def _shards(spec: str) -> tuple[tuple[str, ...], ...]:
    return parse_shards(spec) if spec else ()


# Only where an option differs from its field: the shards are parsed after argparse so
# that a bad target is a ConfigError naming it.
FLAGS = ConfigFlags(RankerConfig, env_prefix="RANKER_", flags={
    "embedding_shards": Flag(default="", metavar="SHARDS", convert=_shards),
})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ranker-server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    FLAGS.add_to(p)
    return p


def config_from_args(args: argparse.Namespace) -> RankerConfig:
    return RankerConfig(**FLAGS.values(args)).validate()


class DrainingServer(uvicorn.Server):
    """uvicorn, with readiness dropped before the listener closes, and exit 0 after SIGTERM."""

    def __init__(self, config: uvicorn.Config, ranker: RankerConfig,
                 state: list[RankerState], admin_port: int | None = None) -> None:
        super().__init__(config)
        self.ranker = ranker
        self.state = state
        self.admin_port = admin_port

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
            admin = f"admin={self.admin_port}\n" if self.admin_port is not None else ""
            tmp.write_text(f"{port}\n{admin}")
            os.replace(tmp, self.ranker.port_file)
        log.info("ranker serving %s on http://%s:%s (admin on port %s)", self.ranker.model,
                 self.ranker.host,
                 self.servers[0].sockets[0].getsockname()[1] if self.servers else "?",
                 self.admin_port if self.admin_port is not None else "the same")


def fast_stack() -> tuple[str, str]:
    """uvicorn's (loop, http) implementations: uvloop and httptools (C parsers; the pure-Python
    h11 stack saturates the event loop on small requests), or asyncio/h11 if either is missing."""
    try:
        import httptools  # noqa: F401
        import uvloop  # noqa: F401
    except ImportError as e:
        log.warning("uvloop/httptools unavailable (%s): serving on asyncio + h11, slower", e)
        return "asyncio", "h11"
    return "uvloop", "httptools"


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
    if config.workers > 1:
        from ranker_server.group_http import run_group

        return run_group(config, list(sys.argv[1:] if argv is None else argv))
    # Bound here, before the app: the admin gate needs the port 0 resolved to.
    sockets: list[socket.socket] | None = None
    admin_port: int | None = None
    if config.group_worker:  # the data port shared with the group, admin private
        try:
            sockets = [bind(config.host, config.port, reuse_port=True), bind("127.0.0.1", 0)]
        except OSError as e:
            log.error("worker cannot join port %d: %s", config.port, e)
            return 1
        admin_port = sockets[1].getsockname()[1]
    elif config.admin_port is not None:
        try:
            sockets = [bind(config.host, config.port), bind(config.host, config.admin_port)]
        except OSError as e:
            log.error("cannot listen on %s port %d or admin port %d: %s", config.host,
                      config.port, config.admin_port, e)
            return 1
        admin_port = sockets[1].getsockname()[1]
    # The event loop, staging and compute threads pass the GIL back and forth on every
    # batch; at the default 5 ms a thread can wait out a whole interval for it. 1 ms: +14%
    # candidates/s with small JSON requests (10 paired windows on 2 cores, all better).
    sys.setswitchinterval(0.001)
    state: list[RankerState] = []
    app = create_app(config, state_out=state, admin_port=admin_port)
    loop, http = fast_stack()
    server = DrainingServer(
        # No proxy-headers middleware or Server header: per-request work the ranker never uses.
        uvicorn.Config(app, host=config.host, port=config.port, log_config=None, loop=loop, http=http,
                       proxy_headers=False, server_header=False,
                       log_level=config.log_level.lower(), access_log=False,
                       timeout_graceful_shutdown=int(config.drain_timeout_s) or 1,
                       lifespan="on"),
        config, state, admin_port)
    server.run(sockets)
    if not server.started:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
