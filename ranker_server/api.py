"""Public HTTP endpoints: POST /v1/rank, /healthz, /readyz, /metrics.

POST /v1/rank, the hot path, is a bare ASGI app (`serve_rank`) that the app calls ahead of
FastAPI's middleware and routing, whose per-request cost was a third of the event loop's
time under load: overload is shed from the headers alone, before the body is read. It raises
RankError for every refusal, rendered by `error_answer` (which the app's one handler
uses too), and records its metrics once, in `_Recorded`, however the request ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import Receive, Scope, Send

from modelpack.httpbody import BodyError, read_capped
from ranker_server import codec
from ranker_server.errors import HttpError, RankError, outcome_of
from ranker_server.metrics import Metrics

if TYPE_CHECKING:
    from ranker_server.app import RankerState

log = logging.getLogger(__name__)
router = APIRouter()
RANK_PATH = "/v1/rank"

RANK_OPENAPI: dict[str, Any] = {
    "summary": "Rank", "operationId": "rank",
    "description": "Score one user's candidates with one version (JSON or protobuf body).",
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {
                "type": "object", "required": ["user", "candidates"],
                "properties": {
                    "request_id": {"type": "string", "maxLength": 256},
                    "model": {"type": "string"}, "version": {"type": "string"},
                    "timeout_ms": {"type": "integer", "minimum": 1},
                    "user": {"type": "object", "description": "user feature name -> value"},
                    "candidates": {"type": "array", "minItems": 1,
                                   "items": {"type": "object",
                                             "description": "candidate feature name -> value"}},
                    "labels": {"type": "array", "description": "ignored"},
                }}},
            "application/x-protobuf": {"schema": {
                "type": "string", "format": "binary",
                "description": "hybrid.ranker.v1.RankRequest (protos/ranker.proto)"}},
        },
    },
    "responses": {"200": {"description": "`{request_id, model, version, seq, scores}` (seq: "
                          "the version's delta seq the scores were read at; or a "
                          "RankResponse for protobuf bodies)"},
                  "4xx": {"description": "`{detail, reason, field}` naming the bad field"},
                  "429": {"description": "overloaded: the queue is full; retry after "
                          "`Retry-After` seconds"}},
}
"""The OpenAPI operation of POST /v1/rank (not a FastAPI route: see serve_rank)."""


Answer = tuple[int, bytes, list[tuple[bytes, bytes]]]
"""An HTTP answer: status, body, headers (besides content-length)."""


def error_answer(e: HttpError) -> Answer:
    """A refusal as its status, JSON body and headers: the one rendering of every refusal."""
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in e.headers().items()]
    return e.status, json.dumps(e.body()).encode(), [(b"content-type", b"application/json"),
                                                     *headers]


def error_response(e: HttpError) -> Response:
    """error_answer as a Response (the app's exception handler)."""
    status, body, headers = error_answer(e)
    return Response(body, status_code=status,
                    headers={k.decode("latin-1"): v.decode("latin-1") for k, v in headers})


class _Recorded:
    """One /v1/rank request's metrics, recorded once on leaving the `with` block, however
    it is left; a bug (any exception but RankError) is logged and becomes a RankError 500."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.started = time.monotonic()
        self.version = "none"  # the version label until a lease names one
        self.scores: npt.NDArray[np.float32] | None = None

    def __enter__(self) -> _Recorded:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        bug = isinstance(exc, Exception) and not isinstance(exc, RankError)
        if bug:
            log.error("rank request failed", exc_info=exc)  # never the client's fault
        status, reason = 200, ""
        if isinstance(exc, RankError):
            status, reason = exc.status, exc.reason
        elif bug:
            status, reason = 500, "internal"
        m, version = self.metrics, self.version
        if reason:
            m.errors.labels(reason).inc()
        m.requests.labels(version, str(status)).inc()
        m.request_duration.labels(version, outcome_of(status, reason)).observe(
            time.monotonic() - self.started)
        if self.scores is not None and status == 200:
            m.score_sum.labels(version).inc(float(self.scores.sum(dtype="float64")))
            m.scores.labels(version).inc(self.scores.size)
        if bug:
            raise RankError(500, "internal", "internal error") from exc


async def serve_rank(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI app of /v1/rank (the lifespan's RankerState in the scope), its answer sent
    as two bare messages: no Starlette Response, no per-request header objects."""
    if scope["method"] == "POST":
        status, body, headers = await rank(scope["state"]["ranker"], scope, receive)
    else:
        status, body = 405, b'{"detail": "method not allowed: POST only"}'
        headers = [(b"content-type", b"application/json"), (b"allow", b"POST")]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", b"%d" % len(body)), *headers]})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:  # ASGI: lower-case names
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _chunks(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RankError(400, "malformed_body", "body: the client went away before sending "
                            "all of it", field="body")
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    try:
        return await read_capped(_header(scope, b"content-length"), _chunks(receive), limit)
    except BodyError as e:
        raise RankError(e.status, "body_too_large", e.message, field="body") from None


async def rank(st: RankerState, scope: Scope, receive: Receive) -> Answer:
    """Score one user's candidates with one version (JSON or protobuf body)."""
    cfg = st.config
    try:
        with _Recorded(st.metrics) as rec:
            # Shed from the headers alone: the body of a refused request is never read
            # (uvicorn discards it as it arrives), so overload costs the loop little.
            st.batcher.check_capacity()
            kind = codec.body_kind(_header(scope, b"content-type") or "")
            parsed = codec.parse_body(await _read_body(scope, receive, cfg.max_body_bytes), kind)
            env = parsed.envelope
            if env.model and env.model != cfg.model:
                raise RankError(404, "unknown_model", f"model: {env.model!r} is not served here "
                                f"(this ranker serves {cfg.model!r})", field="model")
            st.batcher.check_capacity()  # again, before decoding: reading took a while
            timeout_ms = min(env.timeout_ms or cfg.default_timeout_ms, cfg.max_timeout_ms)
            with st.registry.acquire(env.version) as lease:  # until the batcher takes it over
                rec.version = lease.version.version
                decoded = codec.decode(parsed, lease.version.schema, cfg.max_candidates)
                item = st.batcher.submit(lease, decoded, rec.started + timeout_ms / 1000.0)
            try:
                rec.scores = await asyncio.wait_for(item.future, item.deadline - time.monotonic())
            except TimeoutError:
                raise RankError(504, "deadline", f"deadline of {timeout_ms} ms expired before "
                                "the scores were ready") from None
            body, media = codec.encode_response(kind, env.request_id, cfg.model, rec.version,
                                                rec.scores, item.seq)
            return 200, body, [(b"content-type", media.encode())]
    except RankError as e:
        return error_answer(e)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Alive: the process answers HTTP."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    """Ready: every shard replica can serve every version with traffic (the prepare
    handshake's checks, cached a second), not merely an answering shard."""
    st: RankerState = request.state.ranker
    reason = "draining: shutting down" if st.draining else await st.lifecycle.unservable()
    if reason is not None:
        return Response(json.dumps({"status": "not ready", "reason": reason}), status_code=503,
                        media_type="application/json")
    return Response(json.dumps({"status": "ready", "active": st.registry.active}),
                    media_type="application/json")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition. A --workers worker answers on the data port with the whole
    group's (its supervisor's merge): a scrape that lands on any one worker must not read as
    that worker's counters, which would seem to reset from scrape to scrape."""
    st: RankerState = request.state.ranker
    group = st.config.group_admin_port
    server = request.scope.get("server")
    if group is not None and server is not None and server[1] != request.app.admin_port:
        import httpx

        try:
            host = st.config.host if st.config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
            async with httpx.AsyncClient(timeout=2.0) as client:
                r = await client.get(f"http://{host}:{group}/metrics")
            return Response(r.content, status_code=r.status_code, media_type=CONTENT_TYPE_LATEST)
        except httpx.HTTPError as e:
            return Response(f"group metrics unavailable: {e}\n", status_code=503,
                            media_type="text/plain")
    return Response(st.metrics.render(), media_type=CONTENT_TYPE_LATEST)
