"""create_app(config): the FastAPI app, its resources built and torn down in one lifespan,
its routers and its one error handler registered once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ranker_server import admin, api
from ranker_server.batcher import Batcher
from ranker_server.config import RankerConfig
from ranker_server.device import Device
from ranker_server.errors import AdminError, HttpError, RankError
from ranker_server.lifecycle import Lifecycle
from ranker_server.local_tables import LocalTables
from ranker_server.metrics import Metrics
from ranker_server.pipeline import Pipeline
from ranker_server.ports import AdminPortGate
from ranker_server.remote_tables import RemoteTables
from ranker_server.sources import TableSource
from ranker_server.versions import VersionRegistry

log = logging.getLogger(__name__)


@dataclass
class RankerState:
    """Everything a request handler may touch, reached through `request.state.ranker`."""

    config: RankerConfig
    metrics: Metrics
    registry: VersionRegistry
    lifecycle: Lifecycle
    source: TableSource
    batcher: Batcher
    device: Device
    admin_token: str | None
    draining: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def begin_drain(self) -> None:
        """SIGTERM: /readyz fails from now on; requests still in flight are served."""
        if not self.draining:
            log.info("draining: readiness is now false")
        self.draining = True


def _source(config: RankerConfig) -> TableSource:
    if config.local_tables:
        return LocalTables(config.store)
    return RemoteTables(config.embedding_shards, config.prepare_timeout_s,
                        lookup_token=config.embedding_token())


def _response(e: HttpError) -> Response:
    return Response(json.dumps(e.body()), status_code=e.status, media_type="application/json",
                    headers=e.headers())


def _render(request: Request, exc: Exception) -> Response:
    """Every refusal a handler raises (RankError, AdminError), as its JSON body and status."""
    # Registered for HttpError only; the fallback keeps the signature Starlette expects honest.
    return _response(exc if isinstance(exc, HttpError) else HttpError(500, "internal error"))


class ShedGate:
    """ASGI middleware: POST /v1/rank gets 429 (Retry-After) while the batcher's queue is full,
    decided from the headers alone, before the body is read or parsed and before routing: a
    ranker past its capacity spends its event loop on the requests it admits. (The batcher
    checks again on submit: requests admitted together may still find the queue full.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == api.RANK_PATH and scope["method"] == "POST":
            started = time.monotonic()
            st: RankerState = scope["state"]["ranker"]  # the lifespan's state
            try:
                st.batcher.check_capacity()
            except RankError as e:
                api.record(st.metrics, "none", e.status, e.reason, started)
                # The body is never received: uvicorn discards it as it arrives.
                await _response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(config: RankerConfig, *, state_out: list[RankerState] | None = None,
               admin_port: int | None = None) -> FastAPI:
    """Build the ranker app; `state_out` receives its RankerState once started (for main/tests).
    `admin_port` (the bound --admin-port): admin is answered only on requests to that port."""
    config.validate()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, RankerState]]:
        metrics = Metrics()
        device = Device(config.device)
        source: TableSource | None = None
        batcher: Batcher | None = None
        state: RankerState | None = None
        try:
            source = _source(config)
            registry = VersionRegistry(config.model, metrics)
            lifecycle = Lifecycle(config, registry, source, device)
            pipeline = Pipeline(device, source, metrics, serial_lookups=config.debug_serial_lookups)
            batcher = Batcher(config, pipeline, metrics)
            state = RankerState(config, metrics, registry, lifecycle, source, batcher, device,
                                config.admin_token())
            try:
                plan = await lifecycle.load_startup()
            except AdminError as e:
                log.error("cannot start: %s: %s", config.model, e.message)
                raise
            batcher.start()
            bring_up = asyncio.create_task(lifecycle.bring_up(plan))
            state.tasks.add(bring_up)
            if state_out is not None:
                state_out.append(state)
            yield {"ranker": state}
        finally:
            if state is not None:
                state.begin_drain()
                for t in state.tasks:
                    t.cancel()
            if batcher is not None:
                await batcher.drain(config.drain_timeout_s)
            if source is not None:
                await source.close()
            device.close()
            log.info("ranker stopped")

    app = FastAPI(title="ranker", version="1", lifespan=lifespan,
                  description="Scores ad candidates with a versioned model whose INT4 embedding "
                              "tables live on remote shards.")
    app.include_router(api.router)
    app.include_router(admin.router)
    app.add_exception_handler(HttpError, _render)
    app.add_middleware(ShedGate)  # inside the admin gate: /v1/rank is refused on the admin port
    if admin_port is not None:
        app.add_middleware(AdminPortGate, admin_port=admin_port)
    return app
