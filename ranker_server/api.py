"""Public HTTP endpoints: POST /v1/rank, /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ranker_server import codec
from ranker_server.batcher import RankItem
from ranker_server.errors import RankError, outcome_of
from ranker_server.versions import Lease

if TYPE_CHECKING:
    from ranker_server.app import RankerState

log = logging.getLogger(__name__)
router = APIRouter()

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


def _error(e: RankError) -> Response:
    return Response(json.dumps(e.body()), status_code=e.status, media_type="application/json",
                    headers=e.headers())


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RankError(413, "body_too_large", f"body: {declared} bytes, at most {limit}",
                        field="body")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RankError(413, "body_too_large", f"body: more than {limit} bytes", field="body")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("/v1/rank", openapi_extra=_RANK_DOC)
async def rank(request: Request) -> Response:
    """Score one user's candidates with one version (JSON or protobuf body)."""
    st: RankerState = request.state.ranker
    cfg = st.config
    started = time.monotonic()
    version, status, reason = "none", 200, ""
    lease: Lease | None = None
    submitted = False
    try:
        kind = codec.body_kind(request.headers.get("content-type", ""))
        parsed = codec.parse_body(await _read_body(request, cfg.max_body_bytes), kind)
        if parsed.model and parsed.model != cfg.model:
            raise RankError(404, "unknown_model", f"model: {parsed.model!r} is not served here "
                            f"(this ranker serves {cfg.model!r})", field="model")
        st.batcher.check_capacity()  # shed before spending CPU on decoding
        lease = st.registry.acquire(parsed.version)
        version = lease.version.version
        decoded = codec.decode(parsed, lease.version.schema, cfg.max_candidates)
        timeout_ms = min(parsed.timeout_ms or cfg.default_timeout_ms, cfg.max_timeout_ms)
        item = RankItem(lease, decoded, started + timeout_ms / 1000.0)
        st.batcher.submit(item)
        submitted = True
        try:
            scores = await asyncio.wait_for(item.future, item.deadline - time.monotonic())
        except TimeoutError:
            raise RankError(504, "deadline", f"deadline of {timeout_ms} ms expired before the "
                            "scores were ready") from None
        body, media = codec.encode_response(kind, decoded.request_id, cfg.model, version, scores)
        st.metrics.score_sum.labels(version).inc(float(scores.sum(dtype="float64")))
        st.metrics.scores.labels(version).inc(scores.size)
        return Response(body, media_type=media)
    except RankError as e:
        # Counted in metrics; batch failures are logged once per batch by the batcher.
        status, reason = e.status, e.reason
        return _error(e)
    except Exception:
        # A bug, never the client's fault; logged with the traceback.
        log.exception("rank request failed")
        status, reason = 500, "internal"
        return _error(RankError(500, "internal", "internal error"))
    finally:
        if lease is not None and not submitted:
            lease.release()
        if reason:
            st.metrics.errors.labels(reason).inc()
        st.metrics.requests.labels(version, str(status)).inc()
        st.metrics.request_duration.labels(version, outcome_of(status, reason)).observe(
            time.monotonic() - started)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Alive: the process answers HTTP."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    """Ready: an active, prepared version and every embedding shard answering."""
    st: RankerState = request.state.ranker
    reason: str | None = None
    if st.draining:
        reason = "draining: shutting down"
    elif st.registry.active is None:
        reason = st.lifecycle.startup_error or "no active version"
    else:
        reason = await st.source.unreachable()
    if reason is not None:
        return Response(json.dumps({"status": "not ready", "reason": reason}), status_code=503,
                        media_type="application/json")
    return Response(json.dumps({"status": "ready", "active": st.registry.active}),
                    media_type="application/json")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    return Response(request.state.ranker.metrics.render(), media_type=CONTENT_TYPE_LATEST)
