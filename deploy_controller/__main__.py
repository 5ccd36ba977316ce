"""`python -m deploy_controller` / `deploy-controller`: run the controller's HTTP API.

Every ControllerConfig field is a flag (`--gate-<name>` for the health-gate
thresholds), with the field's docstring as its help. SIGTERM/SIGINT stop accepting
requests, cancel running rollout steps (the journal makes them resumable) and exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any

from deploy_controller.config import ConfigError, ControllerConfig, field_docs
from deploy_controller.gates import GateConfig

log = logging.getLogger("deploy_controller")
CRASH_ENV = "DEPLOY_CONTROLLER_CRASH_AT"


def _add(parser: argparse.ArgumentParser, flag: str, dest: str, hint: Any, default: Any,
         doc: str) -> None:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    kwargs: dict[str, Any] = {"dest": dest, "default": default,
                              "help": f"{doc} (default: {default})"}
    if origin is typing.Literal:
        kwargs["choices"] = list(args)
    elif origin is tuple:
        kwargs["type"] = lambda s: tuple(int(x) for x in s.split(",") if x.strip())
        kwargs["metavar"] = "P1,P2,..."
    elif hint in (int, float, str):
        kwargs["type"] = hint
    else:  # Path or Path | None
        kwargs["type"] = Path
    parser.add_argument(flag, **kwargs)


def parse_args(argv: list[str] | None = None) -> tuple[ControllerConfig, str]:
    p = argparse.ArgumentParser(prog="deploy-controller", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(ControllerConfig)
    docs = field_docs()
    for f in dataclasses.fields(ControllerConfig):
        if f.name in ("gates", "crash_at"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        _add(p, "--" + f.name.replace("_", "-"), f.name, hints[f.name], default,
             docs.get(f.name, ""))
    gate_hints = typing.get_type_hints(GateConfig)
    gate_docs = field_docs(GateConfig)
    for f in dataclasses.fields(GateConfig):
        _add(p, "--gate-" + f.name.replace("_", "-"), "gate_" + f.name, gate_hints[f.name],
             f.default, gate_docs.get(f.name, ""))
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ns = vars(p.parse_args(argv))
    level = ns.pop("log_level")
    gates = GateConfig(**{f.name: ns.pop("gate_" + f.name) for f in dataclasses.fields(GateConfig)})
    cfg = ControllerConfig(**ns, gates=gates, crash_at=os.environ.get(CRASH_ENV, ""))
    return cfg, level


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
