"""create_app(config): the FastAPI app, its resources built and torn down in one lifespan,
its routers and its one error handler registered once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.types import Receive, Scope, Send

from ranker_server import admin, api
from ranker_server.batcher import Batcher
from ranker_server.cache_metrics import CacheCollector
from ranker_server.cached_tables import CachedTables, store_delta_rows
from ranker_server.config import RankerConfig
from ranker_server.device import Device
from ranker_server.errors import AdminError, HttpError
from ranker_server.lifecycle import Lifecycle
from ranker_server.local_tables import LocalTables
from ranker_server.metrics import Metrics
from ranker_server.pipeline import Pipeline
from ranker_server.ports import AdminPortGate
from ranker_server.remote_tables import RemoteTables
from ranker_server.row_cache import RowCache
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
    cache: RowCache | None = None  # the hot-row cache in front of `source` (--cache-bytes)
    draining: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def begin_drain(self) -> None:
        """SIGTERM: /readyz fails from now on; requests still in flight are served."""
        if not self.draining:
            log.info("draining: readiness is now false")
        self.draining = True


def _source(config: RankerConfig, metrics: Metrics) -> TableSource:
    if config.local_tables:
        return LocalTables(config.store)
    return RemoteTables(config.embedding_shards, config.prepare_timeout_s,
                        lookup_token=config.embedding_token(),
                        transport=config.embedding_transport, metrics=metrics,
                        prepare_min_replicas=config.prepare_min_replicas,
                        routing_refresh_s=config.routing_refresh_s)


def _cached(config: RankerConfig, metrics: Metrics, device: Device, source: TableSource
            ) -> tuple[TableSource, RowCache | None]:
    """`source` behind the row cache when --cache-bytes is set; its counters on /metrics."""
    if config.cache_bytes == 0:
        return source, None
    cache = RowCache(config.cache_bytes, config.cache_policy, device.torch_device)
    metrics.registry.register(CacheCollector(cache.stats))
    log.info("row cache: %d bytes on %s, policy %s", config.cache_bytes, device.torch_device,
             config.cache_policy)
    return CachedTables(source, cache, store_delta_rows(config.store)), cache


def _render(request: Request, exc: Exception) -> Response:
    """Every refusal a handler raises (RankError, AdminError), as its JSON body and status."""
    # Registered for HttpError only; the fallback keeps the signature Starlette expects honest.
    return api.error_response(exc if isinstance(exc, HttpError) else HttpError(500, "internal error"))


class RankerApp(FastAPI):
    """FastAPI, with /v1/rank answered ahead of it (api.serve_rank: no telemetry check, no
    middleware, no routing) yet documented in its OpenAPI; on the admin port, /v1/rank goes
    the normal way, to the admin port gate's 404."""

    admin_port: int | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == api.RANK_PATH and (
                self.admin_port is None or (scope.get("server") or ("", 0))[1] != self.admin_port):
            await api.serve_rank(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            doc = super().openapi()
            doc["paths"] = {api.RANK_PATH: {"post": api.RANK_OPENAPI}, **doc["paths"]}
        return super().openapi()


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
            source, cache = _cached(config, metrics, device, _source(config, metrics))
            registry = VersionRegistry(config.model, metrics)
            lifecycle = Lifecycle(config, registry, source, device)
            pipeline = Pipeline(device, source, metrics, serial_lookups=config.debug_serial_lookups)
            batcher = Batcher(config, pipeline, metrics)
            state = RankerState(config, metrics, registry, lifecycle, source, batcher, device,
                                config.admin_token(), cache)
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

    app = RankerApp(title="ranker", version="1", lifespan=lifespan,
                  description="Scores ad candidates with a versioned model whose INT4 embedding "
                              "tables live on remote shards.")
    app.include_router(api.router)
    app.include_router(admin.router)
    app.add_exception_handler(HttpError, _render)
    if admin_port is not None:
        app.admin_port = admin_port
        app.add_middleware(AdminPortGate, admin_port=admin_port)
    return app
