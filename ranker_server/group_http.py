"""The --workers supervisor's admin port (ranker_server.group holds the logic) and its main.

On --admin-port: /admin/v1/* (bearer token checked before the body is read, then passed
to every worker), GET /admin/v1/group (each worker: pid, restarts, readiness), /healthz,
/readyz (every worker ready and in step) and /metrics (every worker's samples with a
`worker` label, plus the supervisor's own). The data port belongs to the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import AsyncIterator
from types import FrameType

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from modelpack.httpbody import BodyError, read_capped
from ranker_server.admin import MAX_ADMIN_BODY_BYTES, check_bearer
from ranker_server.config import RankerConfig
from ranker_server.errors import AdminError
from ranker_server.group import Group
from ranker_server.ports import bind

log = logging.getLogger("ranker_server.group")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?( .*)$")
_PASSED_HEADERS = ("authorization", "content-type", "content-length")


def merge_metrics(texts: list[tuple[int, str]]) -> str:
    """Prometheus text from several workers as one exposition: each family's HELP and TYPE
    once, then every worker's samples of it with worker="K" added to their labels."""
    families: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for worker, text in texts:
        family = ""
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split(" ", 3)[2]
                head = families.setdefault(family, [])
                if line not in head:
                    head.append(line)
                continue
            m = _SAMPLE.match(line)
            if m is None:
                continue
            name, labels, rest = m.groups()
            inner = labels[1:-1] + "," if labels and labels != "{}" else ""
            samples.setdefault(family or name, []).append(
                f'{name}{{{inner}worker="{worker}"}}{rest}')
    out = [line for fam in families for line in (*families[fam], *samples.pop(fam, []))]
    out += [line for rest in samples.values() for line in rest]
    return "\n".join(out) + "\n"


def create_app(group: Group) -> Starlette:
    cfg = group.config

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "alive", "workers": len(group.workers)})

    async def readyz(_: Request) -> Response:
        ok, details = await group.readiness()
        if ok:
            return JSONResponse({"status": "ready", "workers": len(details)})
        why = "draining" if group.draining else "; ".join(
            f"worker {d['worker']}: " + ("not running" if not d["running"] else
                                         "not in step with the group yet" if not d["synced"]
                                         else "not ready")
            for d in details if not (d["ready"] and d["synced"]))
        return JSONResponse({"status": "not ready", "reason": why}, status_code=503)

    async def metrics(_: Request) -> Response:
        details = (await group.readiness())[1]
        own = [
            "# HELP ranker_group_workers Worker processes of this ranker, by state.",
            "# TYPE ranker_group_workers gauge",
            *(f'ranker_group_workers{{state="{s}"}} {n}' for s, n in (
                ("configured", len(details)),
                ("running", sum(d["running"] for d in details)),
                ("ready", sum(d["ready"] and d["synced"] for d in details)))),
            "# HELP ranker_group_worker_restarts_total Times a worker was started again.",
            "# TYPE ranker_group_worker_restarts_total counter",
            *(f'ranker_group_worker_restarts_total{{worker="{d["worker"]}"}} {d["restarts"]}'
              for d in details)]
        text = merge_metrics(await group.metrics()) + "\n".join(own) + "\n"
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def admin(request: Request) -> Response:
        try:
            check_bearer(request.headers.get("authorization", ""), cfg.admin_token())
            if request.url.path == "/admin/v1/group" and request.method == "GET":
                ok, details = await group.readiness()
                return JSONResponse({"ready": ok, "data_port": group.data_port,
                                     "workers": details})
            body = await read_capped(request.headers.get("content-length"), request.stream(),
                                     MAX_ADMIN_BODY_BYTES)
        except AdminError as e:
            return JSONResponse({"detail": e.message}, status_code=e.status)
        except BodyError as e:
            return JSONResponse({"detail": e.message}, status_code=e.status)
        headers = {k: v for k, v in request.headers.items() if k in _PASSED_HEADERS}
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        reply = await group.admin(request.method, path, body, headers)
        return Response(reply.body, status_code=reply.status, media_type=reply.content_type)

    async def elsewhere(request: Request) -> Response:
        return JSONResponse({"detail": f"port {cfg.admin_port} of a --workers ranker serves the "
                                       "admin API, /metrics and the probes; ranking requests "
                                       f"go to port {group.data_port}"}, status_code=404)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        group.start()
        task = asyncio.create_task(group.supervise())
        try:
            yield
        finally:
            group.draining = True
            await task
            await group.stop()

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    return Starlette(routes=[
        Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics),
        Route("/admin/{rest:path}", admin, methods=methods),
        Route("/{rest:path}", elsewhere, methods=methods)], lifespan=lifespan)


class _Server(uvicorn.Server):
    """Exit 0 after SIGTERM once the workers have drained (uvicorn's own re-raises it)."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True


def run_group(config: RankerConfig, argv: list[str]) -> int:
    """Supervise config.workers ranker processes on config.port (see ranker_server.group)."""
    try:
        data = bind(config.host, config.port, reuse_port=True)  # held, never listened on:
        admin = bind(config.host, config.admin_port or 0)  # it fixes the port the workers join
    except OSError as e:
        log.error("cannot bind %s port %d / admin port %s: %s", config.host, config.port,
                  config.admin_port, e)
        return 1
    admin_port = admin.getsockname()[1]
    # --admin-port 0 resolved, for the messages that name it (workers get their own).
    group = Group(dataclasses.replace(config, admin_port=admin_port), argv,
                  data.getsockname()[1])
    if config.port_file is not None:
        tmp = config.port_file.with_name(config.port_file.name + ".tmp")
        tmp.write_text(f"{group.data_port}\nadmin={admin_port}\n")
        os.replace(tmp, config.port_file)
    server = _Server(uvicorn.Config(create_app(group), log_config=None, access_log=False,
                                    log_level=config.log_level.lower(), lifespan="on"))
    log.info("ranker group of %d workers: data port %d, admin port %d", config.workers,
             group.data_port, admin_port)
    server.run([admin])
    data.close()
    return 0 if server.started else 1
