"""Public HTTP endpoints: POST /v1/rank, /healthz, /readyz, /metrics.

/v1/rank raises RankError for every refusal (the app's one handler renders it) and
records its metrics once, in `_Recorded`, however the request ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from modelpack.httpbody import BodyError, read_capped
from ranker_server import codec
from ranker_server.errors import RankError, outcome_of
from ranker_server.metrics import Metrics

if TYPE_CHECKING:
    from ranker_server.app import RankerState

log = logging.getLogger(__name__)
router = APIRouter()
RANK_PATH = "/v1/rank"

_RANK_DOC: dict[str, Any] = {
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
    "responses": {"200": {"description": "`{request_id, model, version, scores}` (or a "
                          "RankResponse for protobuf bodies)"},
                  "4xx": {"description": "`{detail, reason, field}` naming the bad field"}},
}


def record(metrics: Metrics, version: str, status: int, reason: str, started: float) -> None:
    """Count one answered /v1/rank request (`reason`: the RankError's, "" for a 200)."""
    if reason:
        metrics.errors.labels(reason).inc()
    metrics.requests.labels(version, str(status)).inc()
    metrics.request_duration.labels(version, outcome_of(status, reason)).observe(
        time.monotonic() - started)


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
        record(self.metrics, self.version, status, reason, self.started)
        if self.scores is not None and status == 200:
            m, version = self.metrics, self.version
            m.score_sum.labels(version).inc(float(self.scores.sum(dtype="float64")))
            m.scores.labels(version).inc(self.scores.size)
        if bug:
            raise RankError(500, "internal", "internal error") from exc


async def _read_body(request: Request, limit: int) -> bytes:
    try:
        return await read_capped(request.headers.get("content-length"), request.stream(), limit)
    except BodyError as e:
        raise RankError(e.status, "body_too_large", e.message, field="body") from None


@router.post(RANK_PATH, openapi_extra=_RANK_DOC)
async def rank(request: Request) -> Response:
    """Score one user's candidates with one version (JSON or protobuf body)."""
    st: RankerState = request.state.ranker
    cfg = st.config
    with _Recorded(st.metrics) as rec:
        kind = codec.body_kind(request.headers.get("content-type", ""))
        parsed = codec.parse_body(await _read_body(request, cfg.max_body_bytes), kind)
        env = parsed.envelope
        if env.model and env.model != cfg.model:
            raise RankError(404, "unknown_model", f"model: {env.model!r} is not served here "
                            f"(this ranker serves {cfg.model!r})", field="model")
        st.batcher.check_capacity()  # again (ShedGate checked before the body): before decoding
        timeout_ms = min(env.timeout_ms or cfg.default_timeout_ms, cfg.max_timeout_ms)
        with st.registry.acquire(env.version) as lease:  # until the batcher takes it over
            rec.version = lease.version.version
            decoded = codec.decode(parsed, lease.version.schema, cfg.max_candidates)
            item = st.batcher.submit(lease, decoded, rec.started + timeout_ms / 1000.0)
        try:
            rec.scores = await asyncio.wait_for(item.future, item.deadline - time.monotonic())
        except TimeoutError:
            raise RankError(504, "deadline", f"deadline of {timeout_ms} ms expired before the "
                            "scores were ready") from None
        body, media = codec.encode_response(kind, env.request_id, cfg.model, rec.version,
                                            rec.scores)
        return Response(body, media_type=media)


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
    """Prometheus text exposition."""
    return Response(request.state.ranker.metrics.render(), media_type=CONTENT_TYPE_LATEST)
