"""The controller's HTTP API (FastAPI). Mutating calls need `Authorization: Bearer <token>`.

    POST /v1/rollouts                  {model, version, canary?: [5, 25, 100], bake_s?}
    GET  /v1/rollouts                  active rollouts and the most recent ones
    GET  /v1/rollouts/{id}             journal row + steps + live fleet view + last gate
    POST /v1/rollouts/{id}/abort       {reason?}
    POST /v1/models/{model}/rollback   {reason?, bake_s?}
    GET  /v1/history?model=&limit=
    GET  /healthz, GET /metrics
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from deploy_controller.config import ControllerConfig
from deploy_controller.controller import Controller, ControllerError
from deploy_controller.discovery import Discovery, LocalDiscovery
from deploy_controller.fleet import Fleet, RemoteFleet
from deploy_controller.journal import Journal, Rollout
from deploy_controller.metrics import ControllerMetrics


class RolloutBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="model name (STORE/<model>/)")
    version: str = Field(description="version to roll out (STORE/<model>/<version>/)")
    canary: list[int] | None = Field(default=None, description="traffic shares in percent, "
                                     "increasing, ending at 100")
    bake_s: float | None = Field(default=None, ge=0, le=86400,
                                 description="seconds to watch each canary step")


class AbortBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="", max_length=500)


class RollbackBody(AbortBody):
    bake_s: float | None = Field(default=None, ge=0, le=86400)


def _controller(request: Request) -> Controller:
    c: Controller = request.app.state.controller
    return c


# Module level: FastAPI resolves these (string) annotations in the module's globals.
Ctl = Annotated[Controller, Depends(_controller)]


def make_discovery(cfg: ControllerConfig) -> Discovery:
    if cfg.discovery == "kubernetes":
        from deploy_controller.kube import KubernetesDiscovery

        return KubernetesDiscovery(cfg)
    assert cfg.fleet is not None
    return LocalDiscovery(cfg.fleet)


def _public(r: Rollout | dict[str, Any]) -> dict[str, Any]:
    """Rollout JSON without the bulky baseline scrapes journaled for bakes."""
    d = r.to_json() if isinstance(r, Rollout) else r
    for e in d.get("events", []):
        if "baseline" in e["detail"]:
            e["detail"] = {k: v for k, v in e["detail"].items() if k != "baseline"}
    return d


def build_app(cfg: ControllerConfig, *, fleet: Fleet | None = None) -> FastAPI:
    """The app; its lifespan opens the journal, recovers rollouts, and cleans up after."""
    token = cfg.read_token()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        journal = Journal(cfg.journal)
        the_fleet = fleet or RemoteFleet(make_discovery(cfg), cfg.read_token(fleet=True),
                                         http_timeout_s=cfg.http_timeout_s,
                                         grpc_timeout_s=cfg.grpc_timeout_s)
        controller = Controller(cfg, journal, the_fleet, ControllerMetrics())
        app.state.controller = controller
        try:
            await controller.start()
            yield
        finally:
            await controller.stop()
            if fleet is None:
                await the_fleet.close()
            journal.close()

    app = FastAPI(title="deploy-controller", lifespan=lifespan,
                  description="Three-phase, version-consistent rollouts of ranking models.")

    def authorized(authorization: Annotated[str | None, Header()] = None) -> None:
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 token.encode()):
            raise ControllerError(401, "missing or wrong bearer token")

    auth = [Depends(authorized)]

    @app.exception_handler(ControllerError)
    async def refused(_: Request, e: ControllerError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse({"detail": e.message}, status_code=e.status, headers=headers)

    @app.post("/v1/rollouts", status_code=202, dependencies=auth)
    async def create(body: RolloutBody, c: Ctl) -> dict[str, Any]:
        return _public(await c.create(body.model, body.version, body.canary, body.bake_s))

    @app.get("/v1/rollouts")
    async def listing(c: Ctl, model: str | None = None) -> dict[str, Any]:
        return {"active": [_public(c.get(r.id)) for r in c.journal.active(model)],
                "recent": [_public(r) for r in c.history(model, 10)]}

    @app.get("/v1/rollouts/{rollout_id}")
    async def get(rollout_id: str, c: Ctl) -> dict[str, Any]:
        return _public(c.get(rollout_id))

    @app.post("/v1/rollouts/{rollout_id}/abort", status_code=202, dependencies=auth)
    async def abort(rollout_id: str, c: Ctl, body: AbortBody | None = None) -> dict[str, Any]:
        return _public(c.abort(rollout_id, body.reason if body else ""))

    @app.post("/v1/models/{model}/rollback", status_code=202, dependencies=auth)
    async def rollback(model: str, c: Ctl, body: RollbackBody | None = None) -> dict[str, Any]:
        body = body or RollbackBody()
        return _public(await c.rollback(model, body.reason, body.bake_s))

    @app.get("/v1/history")
    async def history(c: Ctl, model: str | None = None,
                      limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> dict[str, Any]:
        return {"rollouts": [_public(r) for r in c.history(model, limit)]}

    @app.get("/healthz")
    async def healthz(c: Ctl) -> dict[str, Any]:
        return {"status": "ok", "running": c.running()}

    @app.get("/metrics")
    async def metrics(c: Ctl) -> PlainTextResponse:
        return PlainTextResponse(generate_latest(c.metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    return app
