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

Delta seqs (issue 12), the contract the deploy controller calls:

    PUT /admin/v1/versions/{version}/seq   body {"seq": S} or {"seq": S, "fingerprint": F}

S: an integer >= 0 (0 = the version's own rows, deltas 1..S applied otherwise); F, if
given (a non-empty string), must be delta S's manifest fingerprint in the ranker's store
(for S = 0: the version's own fingerprint; empty or absent: not checked). Before switching, the ranker
checks that deltas 1..S of that version exist in its --store and form a verified chain at
the manifest level (each manifest belongs to this build of the version, at its seq,
linked to the one before); lowering S (a revert) is allowed. Batches formed after the
200 read at S; batches already formed finish at the seq they pinned. Idempotent.
200: the version's entry, as listed by GET /admin/v1/versions, plus "previous_seq".
Errors: 401/403 (token, checked before the body is read), 400/413/415 (body), 404 (the
version is not loaded on this ranker), 409 (the version is being unloaded; or F is not
the fingerprint of the store's delta S), 422 (`seq` missing or not an integer >= 0,
`fingerprint` not a string; or delta k <= S missing or failing its manifest checks: the
message names the delta, e.g. "ads_ctr/v1 delta 3: ...").

GET /admin/v1/versions lists, per version, "seq" (what new batches read at),
"delta_fingerprint" ("" at seq 0) and "delta_written_at" (unix seconds; 0 at seq 0).
A --workers supervisor passes the PUT to every worker and keeps each version's seq in
its group state (`deltas`), so a restarted worker comes back at it. A restarted ranker
starts each version at the desired state's committed seq (`deltas: {V: S}`); a version
loaded by POST /admin/v1/versions starts at 0.

/v1/rank answers carry the seq they were read at: JSON `seq` beside `version`,
RankResponse.seq in protobuf. A shard replica that cannot read the seq
(FAILED_PRECONDITION `seq_not_applied`) is failed over to a sibling; when no replica of
a shard can, the request fails 503 reason `seq_not_applied` (never served from other
rows). Metrics: ranker_delta_seq{model,version} (the seq new batches read at),
ranker_delta_age_seconds{model,version} (now - the served delta's written_at; absent at
seq 0), ranker_delta_freshness_seconds{model} (histogram: written_at -> this ranker
serving it, observed when the seq advances), ranker_seq_not_applied_total{shard}
(replica refusals, whether failed over or not); requests failing it count in
ranker_errors_total{reason="seq_not_applied"}. An answer echoing another seq than the
lookup named is the version-mismatch alarm: 503 version_mismatch, counted in
ranker_version_mismatch_total.

GET /admin/v1/cache shows the hot-row cache (--cache-bytes; `{"enabled": false}` when
off): size, policy, device, occupancy and, per version, hits and misses (requested and
unique), wire bytes saved, lookups skipped, entries, bytes, evictions, invalidations and
the delta seq learned (ranker_cache_* on /metrics). Under --workers it is one worker's:
each worker process has a cache of its own.
"""

from __future__ import annotations

import hmac
import json
import math
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request, Response

from modelpack.httpbody import BodyError, json_content_type, read_capped, strict_json
from ranker_server.deltas import MAX_SEQ
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
    """Handshake: every shard replica must report the version READY with our fingerprint
    (`?min_replicas=N`: N per shard is enough, as in a blue/green rollout)."""
    st = _state(request)
    raw = request.query_params.get("min_replicas")
    if raw is not None and not (raw.isdigit() and len(raw) <= 4):
        raise AdminError(422, f"min_replicas: must be an integer >= 0, got {raw[:40]!r}")
    return _json(st.registry.info(await st.lifecycle.prepare(
        version, None if raw is None else int(raw))))


@router.post("/versions/{version}/activate")
async def activate_version(version: str, request: Request) -> Response:
    """Make a prepared version the only one taking traffic; answers the new listing."""
    st = _state(request)
    await st.lifecycle.activate(version)
    return _json(st.registry.listing())


@router.put("/versions/{version}/seq")
async def set_version_seq(version: str, request: Request) -> Response:
    """Body `{"seq": S, "fingerprint"?: F}`: read the version at delta seq S from the next
    batch on (see the module docstring); answers its entry plus `previous_seq`."""
    st = _state(request)
    lv = st.registry.get(version)  # 404 before the body is read
    body = await _body(request)
    seq = body.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
        raise AdminError(422, f"seq: must be an integer in [0, {MAX_SEQ}] (0: the version's "
                         f"own rows), got {seq!r}")
    fingerprint = body.get("fingerprint", "")
    if not isinstance(fingerprint, str):
        raise AdminError(422, f"fingerprint: must be a string (delta {seq}'s manifest "
                         f"fingerprint), got {fingerprint!r}")
    old = await st.lifecycle.set_seq(version, seq, fingerprint)
    return _json({**st.registry.info(lv), "previous_seq": old})


@router.get("/cache")
async def cache_stats(request: Request) -> Response:
    """The hot-row cache (--cache-bytes): size, policy, device, occupancy, and per version
    its hits and misses (requested and unique), wire bytes saved, lookups skipped, entries,
    bytes, evictions and invalidations; `{"enabled": false}` when off."""
    cache = _state(request).cache
    return _json({"enabled": False} if cache is None else {"enabled": True, **cache.stats()})


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
