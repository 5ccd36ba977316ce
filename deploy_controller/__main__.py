"""`python -m deploy_controller` / `deploy-controller`: run the controller's HTTP API.

Every ControllerConfig field is a flag (`--gate-<name>` for the health-gate
thresholds), with the field's docstring as its help. SIGTERM/SIGINT stop accepting
requests, cancel running rollout steps (the journal makes them resumable) and exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from deploy_controller.config import ConfigError, ControllerConfig
from deploy_controller.gates import GateConfig
from modelpack.configcli import ConfigFlags

log = logging.getLogger("deploy_controller")
CRASH_ENV = "DEPLOY_CONTROLLER_CRASH_AT"


FLAGS = ConfigFlags(ControllerConfig, skip=("gates", "crash_at"))
GATE_FLAGS = ConfigFlags(GateConfig, prefix="gate-")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deploy-controller", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    FLAGS.add_to(p)
    GATE_FLAGS.add_to(p)
    return p


def parse_args(argv: list[str] | None = None) -> tuple[ControllerConfig, str]:
    """The command line -> (ControllerConfig, log level); validate() is left to the caller."""
    ns = build_parser().parse_args(argv)
    cfg = ControllerConfig(**FLAGS.values(ns), gates=GateConfig(**GATE_FLAGS.values(ns)),
                           crash_at=os.environ.get(CRASH_ENV, ""))
    return cfg, cfg.log_level


def _server(app: Any, cfg: ControllerConfig, level: str) -> Any:
    import socket

    import uvicorn

    class Server(uvicorn.Server):
        """Writes the bound port to cfg.port_file once listening (port 0 = any free one)."""

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and cfg.port_file is not None:
                port = self.servers[0].sockets[0].getsockname()[1]
                tmp = cfg.port_file.with_name(cfg.port_file.name + ".tmp")
                tmp.write_text(f"{port}\n")
                os.replace(tmp, cfg.port_file)
                log.info("listening on port %d (written to %s)", port, cfg.port_file)

    return Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=level,
                                 lifespan="on", timeout_graceful_shutdown=10))


def main(argv: list[str] | None = None) -> int:
    cfg, level = parse_args(argv)
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per admin/metrics call drowns the rollout's own log at INFO.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))
    try:
        cfg.validate()
    except ConfigError as e:
        print(f"deploy-controller: {e}", file=sys.stderr)
        return 2
    from deploy_controller.app import build_app

    log.info("deploy controller on %s:%d, journal %s, discovery %s", cfg.host, cfg.port,
             cfg.journal, cfg.discovery)
    _server(build_app(cfg), cfg, level).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
