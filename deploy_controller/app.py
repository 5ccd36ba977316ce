"""The controller's HTTP API (FastAPI). Mutating calls need `Authorization: Bearer <token>`.

    POST /v1/rollouts                  {model, version, canary?: [5, 25, 100], bake_s?,
                                        strategy?: auto | in-place | blue-green}
    POST /v1/rollouts/plan             same body: the plan it would follow, nothing started
    GET  /v1/rollouts                  active rollouts and the most recent ones
    GET  /v1/rollouts/{id}             journal row + steps + live fleet view + last gate
    POST /v1/rollouts/{id}/abort       {reason?}
    POST /v1/models/{model}/rollback   {reason?, bake_s?}
    GET  /v1/history?model=&limit=
    GET  /v1/deltas                    every delta stream's status
    GET  /v1/deltas/{model}            committed / newest / target seq, state, lag, servers' seqs
    POST /v1/deltas/{model}/advance    {to?: seq}  (default: the newest seq that verifies)
    POST /v1/deltas/{model}/revert     {to: seq, reason?}  (the stream pauses)
    POST /v1/deltas/{model}/pause      {reason?}
    POST /v1/deltas/{model}/resume
    GET  /healthz (alive), GET /readyz (journal open, discovery working), GET /metrics

Bodies are read by the handlers themselves, after the token was checked (FastAPI reads a
declared body parameter before it runs any dependency): at most MAX_BODY_BYTES, JSON
only, strictly parsed (modelpack.httpbody), then validated by the pydantic model. Every
refusal is a 4xx naming the problem; no error answer echoes the raw input.
"""

from __future__ import annotations

import asyncio
import hmac
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deploy_controller.config import ControllerConfig
from deploy_controller.controller import Controller
from deploy_controller.discovery import Discovery, DiscoveryError, LocalDiscovery
from deploy_controller.errors import ControllerError
from deploy_controller.fleet import Fleet, RemoteFleet
from deploy_controller.journal import Journal, Rollout
from deploy_controller.metrics import ControllerMetrics
from modelpack.httpbody import BodyError, json_content_type, read_capped, strict_json

MAX_BODY_BYTES = 64 << 10  # the API's bodies are a few hundred bytes
DISCOVERY_CACHE_S = 1.0  # /readyz lists the fleet at most this often
DISCOVERY_TIMEOUT_S = 2.0  # answers 503 with the reason within the k8s probe's 3 s timeout


class RolloutBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="model name (STORE/<model>/)")
    version: str = Field(description="version to roll out (STORE/<model>/<version>/)")
    canary: list[int] | None = Field(default=None, description="traffic shares in percent, "
                                     "increasing, ending at 100")
    bake_s: float | None = Field(default=None, ge=0, le=86400, allow_inf_nan=False,
                                 description="seconds to watch each canary step")
    strategy: Literal["auto", "in-place", "blue-green", "in_place", "blue_green"] | None = Field(
        default=None, description="auto (default): in place when both versions fit every "
        "shard replica, else blue/green")


class AbortBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="", max_length=500)


class RollbackBody(AbortBody):
    bake_s: float | None = Field(default=None, ge=0, le=86400, allow_inf_nan=False)


Seq = Annotated[int, Field(strict=True, ge=0, le=2**63 - 1, description="a delta seq")]


class AdvanceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: Seq | None = Field(default=None, description="seq to advance to (default: the newest "
                           "seq on disk that verifies)")


class RevertBody(AbortBody):
    to: Seq = Field(description="seq to go back to (0: the version's own rows)")


Body = TypeVar("Body", bound=BaseModel)


def _documented(model: type[BaseModel], required: bool) -> dict[str, Any]:
    """The OpenAPI requestBody of a handler that reads its body itself (clients, fuzz tests)."""
    return {"requestBody": {"required": required, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}


async def _read_body(request: Request, model: type[Body], required: bool) -> Body | None:
    """The body as `model` (None if empty and optional): 413, 415, 400 or 422 otherwise."""
    try:
        raw = await read_capped(request.headers.get("content-length"), request.stream(),
                                MAX_BODY_BYTES)
        if not raw.strip():
            if required:
                raise ControllerError(422, "body: required (a JSON object)")
            return None
        json_content_type(request.headers.get("content-type"))
        obj = strict_json(raw)
    except BodyError as e:
        raise ControllerError(e.status, e.message) from None
    if not isinstance(obj, dict):
        raise ControllerError(422, f"body: must be a JSON object, got {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False, include_context=False,
                                              include_input=False)) from None


def _validation_errors(e: RequestValidationError) -> list[dict[str, Any]]:
    """Location, message and type of each error: never the input, which may be raw bytes
    (FastAPI's default handler failed to encode those and answered 500)."""
    return [{"loc": [str(x) if not isinstance(x, int) else x for x in err.get("loc", ())],
             "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))}
            for err in e.errors()]


class Readiness:
    """/readyz's verdict: the journal answers a query (every time: it is cheap) and
    discovery lists the fleet (at most once per DISCOVERY_CACHE_S: it may be a k8s call)."""

    def __init__(self) -> None:
        self._checked_at = -DISCOVERY_CACHE_S
        self._discovery: str | None = None

    async def reason(self, c: Controller) -> str | None:
        """Why the controller is not ready, or None."""
        try:
            c.journal.history(limit=1)
        except sqlite3.Error as e:
            return f"journal {c.journal.path}: {e}"
        now = time.monotonic()
        if now - self._checked_at >= DISCOVERY_CACHE_S:
            self._discovery = await self._discover(c.fleet)
            self._checked_at = now
        return self._discovery

    @staticmethod
    async def _discover(fleet: Fleet) -> str | None:
        try:
            await asyncio.wait_for(fleet.topology(), DISCOVERY_TIMEOUT_S)
        except DiscoveryError as e:
            return f"discovery: {e}"
        except TimeoutError:
            return f"discovery: no fleet listing within {DISCOVERY_TIMEOUT_S:.0f} s"
        return None


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

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_errors(e)}, status_code=422)

    @app.post("/v1/rollouts", status_code=202, dependencies=auth,
              openapi_extra=_documented(RolloutBody, required=True))
    async def create(request: Request, c: Ctl) -> dict[str, Any]:
        body = await _read_body(request, RolloutBody, required=True)
        assert body is not None
        return _public(await c.create(body.model, body.version, body.canary, body.bake_s,
                                      body.strategy))

    @app.post("/v1/rollouts/plan", dependencies=auth,
              openapi_extra=_documented(RolloutBody, required=True))
    async def plan(request: Request, c: Ctl) -> dict[str, Any]:
        body = await _read_body(request, RolloutBody, required=True)
        assert body is not None
        return await c.plan(body.model, body.version, body.canary, body.strategy)

    @app.get("/v1/rollouts")
    async def listing(c: Ctl, model: str | None = None) -> dict[str, Any]:
        return {"active": [_public(c.get(r.id)) for r in c.journal.active(model)],
                "recent": [_public(r) for r in c.history(model, 10)]}

    @app.get("/v1/rollouts/{rollout_id}")
    async def get(rollout_id: str, c: Ctl) -> dict[str, Any]:
        return _public(c.get(rollout_id))

    @app.post("/v1/rollouts/{rollout_id}/abort", status_code=202, dependencies=auth,
              openapi_extra=_documented(AbortBody, required=False))
    async def abort(rollout_id: str, request: Request, c: Ctl) -> dict[str, Any]:
        body = await _read_body(request, AbortBody, required=False)
        return _public(c.abort(rollout_id, body.reason if body else ""))

    @app.post("/v1/models/{model}/rollback", status_code=202, dependencies=auth,
              openapi_extra=_documented(RollbackBody, required=False))
    async def rollback(model: str, request: Request, c: Ctl) -> dict[str, Any]:
        body = await _read_body(request, RollbackBody, required=False) or RollbackBody()
        return _public(await c.rollback(model, body.reason, body.bake_s))

    @app.get("/v1/history")
    async def history(c: Ctl, model: str | None = None,
                      limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> dict[str, Any]:
        return {"rollouts": [_public(r) for r in c.history(model, limit)]}

    @app.get("/v1/deltas")
    async def deltas(c: Ctl) -> dict[str, Any]:
        return {"streams": [await c.deltas.status(s.model) for s in c.deltas.dj.streams()]}

    @app.get("/v1/deltas/{model}")
    async def delta_status(model: str, c: Ctl) -> dict[str, Any]:
        return await c.deltas.status(model)

    @app.post("/v1/deltas/{model}/advance", status_code=202, dependencies=auth,
              openapi_extra=_documented(AdvanceBody, required=False))
    async def delta_advance(model: str, request: Request, c: Ctl) -> dict[str, Any]:
        body = await _read_body(request, AdvanceBody, required=False) or AdvanceBody()
        return (await c.deltas.advance(model, body.to)).to_json()

    @app.post("/v1/deltas/{model}/revert", status_code=202, dependencies=auth,
              openapi_extra=_documented(RevertBody, required=True))
    async def delta_revert(model: str, request: Request, c: Ctl) -> dict[str, Any]:
        body = await _read_body(request, RevertBody, required=True)
        assert body is not None
        return (await c.deltas.revert(model, body.to, body.reason)).to_json()

    @app.post("/v1/deltas/{model}/pause", dependencies=auth,
              openapi_extra=_documented(AbortBody, required=False))
    async def delta_pause(model: str, request: Request, c: Ctl) -> dict[str, Any]:
        body = await _read_body(request, AbortBody, required=False) or AbortBody()
        return (await c.deltas.pause(model, body.reason)).to_json()

    @app.post("/v1/deltas/{model}/resume", dependencies=auth)
    async def delta_resume(model: str, request: Request, c: Ctl) -> dict[str, Any]:
        await _read_body(request, AbortBody, required=False)  # only {} or nothing
        return (await c.deltas.resume(model)).to_json()

    @app.get("/healthz")
    async def healthz(c: Ctl) -> dict[str, Any]:
        return {"status": "ok", "running": c.running()}

    readiness = Readiness()

    @app.get("/readyz")
    async def readyz(c: Ctl) -> JSONResponse:
        """200 when the journal is open and discovery lists the fleet; 503 with the reason."""
        reason = await readiness.reason(c)
        if reason is not None:
            return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics(c: Ctl) -> PlainTextResponse:
        return PlainTextResponse(generate_latest(c.metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    return app
