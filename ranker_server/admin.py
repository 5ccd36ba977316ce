"""Admin HTTP API (bearer token): load, prepare, activate, split, unload, list versions.

The deploy controller drives rollouts through exactly these endpoints. Errors are
`{"detail": message}` with 400 (body not UTF-8 JSON, or holding NaN, Infinity or a
number past 64 bits), 401 (no or wrong token), 403 (admin API disabled), 404 (no such
version), 409 (state forbids it: not prepared, still has traffic, shards disagree), 413
(body over MAX_ADMIN_BODY_BYTES), 415 (body not sent as JSON) and 422 (a field of the
wrong type or value, or a version that fails verification).

Every route is authorized once, by the router's dependency, before anything reads the
request's body: handlers take no body parameters (FastAPI would read those before
running dependencies) and read the body themselves, after the token was checked, with
modelpack.httpbody (capped, strictly parsed).
"""

from __future__ import annotations

import hmac
import json
import math
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request, Response

from modelpack.httpbody import BodyError, json_content_type, read_capped, strict_json
from ranker_server.errors import AdminError

MAX_ADMIN_BODY_BYTES = 64 << 10  # its bodies name a version or a split: a few hundred bytes

if TYPE_CHECKING:
    from ranker_server.app import RankerState


def check_bearer(authorization: str, admin_token: str | None) -> None:
    """AdminError unless the admin API is on and `authorization` carries its bearer token
    (also the --workers supervisor's check, before it reads a body to pass on)."""
    if admin_token is None:
        raise AdminError(403, "admin API disabled: start the ranker with --admin-token-file")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                            admin_token.encode()):
        raise AdminError(401, "missing or wrong bearer token (Authorization: Bearer <token>)")


async def _authorize(request: Request) -> None:
    """Every admin route's first step: the admin API is on and the bearer token matches."""
    st: RankerState = request.state.ranker
    check_bearer(request.headers.get("authorization", ""), st.admin_token)


router = APIRouter(prefix="/admin/v1", dependencies=[Depends(_authorize)])


def _json(body: Any) -> Response:
    return Response(json.dumps(body), media_type="application/json")


def _state(request: Request) -> RankerState:
    st: RankerState = request.state.ranker
    return st


async def _body(request: Request) -> dict[str, Any]:
    try:
        raw = await read_capped(request.headers.get("content-length"), request.stream(),
                                MAX_ADMIN_BODY_BYTES)
        json_content_type(request.headers.get("content-type"))
        body = strict_json(raw)
    except BodyError as e:
        raise AdminError(e.status, e.message) from None
    if not isinstance(body, dict):
        raise AdminError(422, "body: must be a JSON object")
    return body


@router.get("/versions")
async def list_versions(request: Request) -> Response:
    """`{model, active, split, versions: [{version, fingerprint, state, traffic_share, ...}]}`."""
    return _json(_state(request).registry.listing())


@router.post("/versions")
async def load_version(request: Request) -> Response:
    """Body `{"version": str}`: load STORE/MODEL/VERSION's dense model beside the others."""
    st = _state(request)
    version = (await _body(request)).get("version")
    if not isinstance(version, str):
        raise AdminError(422, "version: must be a string")
    return _json(st.registry.info(await st.lifecycle.load(version)))


@router.post("/versions/{version}/prepare")
async def prepare_version(version: str, request: Request) -> Response:
    """Handshake: every shard replica must report the version READY with our fingerprint."""
    st = _state(request)
    return _json(st.registry.info(await st.lifecycle.prepare(version)))


@router.post("/versions/{version}/activate")
async def activate_version(version: str, request: Request) -> Response:
    """Make a prepared version the only one taking traffic; answers the new listing."""
    st = _state(request)
    await st.lifecycle.activate(version)
    return _json(st.registry.listing())


@router.put("/split")
async def set_split(request: Request) -> Response:
    """Body `{"split": {version: share}}`: prepared versions, shares >= 0 summing to 1."""
    st = _state(request)
    split = (await _body(request)).get("split")
    if not isinstance(split, dict):
        raise AdminError(422, "split: must be an object mapping version to share")
    await st.lifecycle.set_split(split)
    return _json(st.registry.listing())


@router.delete("/versions/{version}")
async def unload_version(version: str, request: Request, timeout_s: float = 30.0) -> Response:
    """Unload a version without traffic once its in-flight requests finish (or 409)."""
    st = _state(request)
    if not (math.isfinite(timeout_s) and 0 <= timeout_s <= 3600):
        raise AdminError(422, f"timeout_s: must be in [0, 3600], got {timeout_s}")
    await st.lifecycle.unload(version, timeout_s)
    return _json(st.registry.listing())
