"""Request bodies in (JSON or protobuf) and responses out, with field-named errors.

`parse_body` reads a body once into a ParsedBody: the envelope (request id, model,
version pin, timeout), checked by modelpack's one Envelope check before any expensive
work, so the ranker can pick the version; `decode` then validates the features against
that version's schema. JSON features go through modelpack's own decoder (the
eval.jsonl format); protobuf columns (protos/ranker.proto) are decoded with numpy, never
per element in Python, into the same DecodedRequest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from modelpack.requests import (
    DecodedRequest,
    Envelope,
    RequestError,
    SparseColumn,
    decode_features,
    normalized,
    parse_envelope,
)
from modelpack.schema import FeatureSchema, Side
from protos import ranker_pb2
from ranker_server.errors import RankError

BodyKind = Literal["json", "protobuf"]
PROTOBUF_TYPES = ("application/x-protobuf", "application/protobuf")
MAX_JSON_BODY_BYTES = 1 << 20
"""Largest JSON body parsed. json.loads holds the GIL for its whole run, so a thread frees
no event loop, at ~20 ms per MB on an idle core (16 MB: 0.3 s): 1 MiB bounds the stall it
causes every other request to ~20 ms, and is 6x the largest demo request (1000
candidates, ~175 KB). Bigger requests go as protobuf (15 MiB parse in ~3 ms), up to
max_body_bytes."""


@dataclass(frozen=True)
class ParsedBody:
    """A rank request body, read once: its checked envelope and its still-raw features."""

    kind: BodyKind
    envelope: Envelope
    features: Any  # the JSON object, or the RankRequest message


def body_kind(content_type: str) -> BodyKind:
    """Protobuf for the protobuf media types; JSON otherwise (curl's form default included)."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    return "protobuf" if ctype in PROTOBUF_TYPES else "json"


def parse_body(body: bytes, kind: BodyKind, max_json_bytes: int = MAX_JSON_BODY_BYTES
               ) -> ParsedBody:
    """Read the body and check its envelope: 400 if unreadable, 413 if JSON past
    `max_json_bytes`, 422 naming a bad field."""
    try:
        if kind == "protobuf":
            msg = _protobuf(body)
            timeout = msg.timeout_ms if msg.timeout_ms > 0 else None  # <= 0: server default
            return ParsedBody(kind, Envelope.checked(msg.request_id, msg.model, None, timeout),
                              msg)
        obj = _json(body, max_json_bytes)
        return ParsedBody(kind, parse_envelope(obj), obj)
    except RequestError as e:
        raise _invalid(e) from None


def _json(body: bytes, limit: int) -> Any:
    if len(body) > limit:  # refused unparsed: see MAX_JSON_BODY_BYTES
        raise RankError(413, "body_too_large", f"body: {len(body)} bytes of JSON, at most "
                        f"{limit}; send bigger requests as protobuf "
                        f"(content-type: {PROTOBUF_TYPES[0]})", field="body")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # ValueError: bad UTF-8, JSON, huge ints
        raise RankError(400, "malformed_body", f"body: not valid JSON: {e}", field="body") from None


def _protobuf(body: bytes) -> Any:
    try:
        return ranker_pb2.RankRequest.FromString(body)
    except (DecodeError, RecursionError) as e:
        raise RankError(400, "malformed_body", f"body: not a valid RankRequest protobuf: {e}",
                        field="body") from None


def decode(parsed: ParsedBody, schema: FeatureSchema, max_candidates: int) -> DecodedRequest:
    """Validate the features against `schema`; RankError 422 naming the field otherwise."""
    try:
        if parsed.kind == "json":
            return decode_features(schema, parsed.features, max_candidates=max_candidates)
        return _decode_protobuf(parsed.features, schema, max_candidates)
    except RequestError as e:
        raise _invalid(e) from None


def _invalid(e: RequestError) -> RankError:
    return RankError(422, "invalid_request", str(e), field=e.field)


def _decode_protobuf(msg: Any, schema: FeatureSchema, max_candidates: int) -> DecodedRequest:
    n = int(msg.num_candidates)
    if n <= 0:
        raise RequestError("num_candidates", f"must be > 0, got {n}")
    if n > max_candidates:
        raise RequestError("candidates", f"{n} candidates, at most {max_candidates} allowed")
    cols = {**_columns(msg.user, "user", schema), **_columns(msg.candidates, "candidate", schema)}
    sparse: dict[str, SparseColumn] = {}
    for f in schema.sparse:
        entities = 1 if f.side == "user" else n
        where = f"{'user' if f.side == 'user' else 'candidates'}.{f.name}"
        feat = cols[f.name]
        if feat.values:
            raise RequestError(f"{where}.values", "must be empty for a sparse feature (use ids)")
        ids = _array(feat.ids, "<i8", f"{where}.ids")
        if not f.multi_valued:
            if feat.lengths:
                raise RequestError(f"{where}.lengths", "must be empty for a single-valued feature")
            if ids.size != entities:
                raise RequestError(f"{where}.ids", f"holds {ids.size} ids, expected {entities}")
            sparse[f.name] = SparseColumn(ids.astype(np.int64), np.ones(entities, dtype=np.int64))
            continue
        lengths = _array(feat.lengths, "<i4", f"{where}.lengths").astype(np.int64)
        if lengths.size != entities:
            raise RequestError(f"{where}.lengths", f"holds {lengths.size} lengths, "
                               f"expected one per entity ({entities})")
        if lengths.size and int(lengths.min()) < 0:
            raise RequestError(f"{where}.lengths", "must be >= 0")
        if int(lengths.sum()) != ids.size:
            raise RequestError(f"{where}.ids", f"holds {ids.size} ids but lengths sum "
                               f"to {int(lengths.sum())}")
        sparse[f.name] = _truncate(ids.astype(np.int64), lengths, f.max_length)
    dense = np.empty((n, len(schema.dense)), dtype=np.float32)
    for j, df in enumerate(schema.dense):
        entities = 1 if df.side == "user" else n
        where = f"{'user' if df.side == 'user' else 'candidates'}.{df.name}"
        feat = cols[df.name]
        if feat.ids or feat.lengths:
            raise RequestError(f"{where}.ids", "must be empty for a dense feature (use values)")
        values = _array(feat.values, "<f4", f"{where}.values")
        if values.size != entities:
            raise RequestError(f"{where}.values",
                               f"holds {values.size} values, expected {entities}")
        if not np.isfinite(values).all():
            raise RequestError(f"{where}.values", "must be finite (NaN and Inf are refused)")
        dense[:, j] = normalized(df, values)
    return DecodedRequest(num_candidates=n, sparse=sparse, dense=dense)


def _columns(features: Any, side: Side, schema: FeatureSchema) -> dict[str, Any]:
    known = ({f.name for f in schema.sparse_by_side(side)}
             | {f.name for f in schema.dense_by_side(side)})
    where = "user" if side == "user" else "candidates"
    out: dict[str, Any] = {}
    for i, feat in enumerate(features):
        if feat.name not in known:
            raise RequestError(f"{where}[{i}].name",
                               f"unknown {side} feature {feat.name!r} (expected {sorted(known)})")
        if feat.name in out:
            raise RequestError(f"{where}.{feat.name}", "feature given twice")
        out[feat.name] = feat
    for name in sorted(known - set(out)):
        raise RequestError(f"{where}.{name}", f"missing {side} feature")
    return out


def _array(raw: bytes, dtype: str, field: str) -> npt.NDArray[Any]:
    width = np.dtype(dtype).itemsize
    if len(raw) % width:
        raise RequestError(field, f"{len(raw)} bytes is not a whole number of {width}-byte values")
    return np.frombuffer(raw, dtype=dtype)


def _truncate(ids: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64], max_length: int
              ) -> SparseColumn:
    """Keep each entity's first `max_length` ids, as the JSON decoder does."""
    if lengths.size == 0 or int(lengths.max()) <= max_length:
        return SparseColumn(ids.copy(), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    keep = (np.arange(ids.size) - starts) < max_length
    return SparseColumn(ids[keep], np.minimum(lengths, max_length))


def encode_response(kind: BodyKind, request_id: str, model: str, version: str,
                    scores: npt.NDArray[np.float32], seq: int = 0) -> tuple[bytes, str]:
    """(body, media type) of a successful answer, in the request's own format; `seq`: the
    delta seq of `version` the scores were read at."""
    if kind == "protobuf":
        msg = ranker_pb2.RankResponse(request_id=request_id, model=model, version=version,
                                      scores=scores.astype("<f4").tobytes(), seq=seq)
        return msg.SerializeToString(), PROTOBUF_TYPES[0]
    body = {"request_id": request_id, "model": model, "version": version, "seq": seq,
            "scores": scores.astype(np.float32).tolist()}
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode(), "application/json"


def encode_request(request: dict[str, Any], schema: FeatureSchema) -> bytes:
    """A JSON rank request (eval.jsonl format) as a protobuf body: for tests and load tools."""
    cands = request["candidates"]
    msg = ranker_pb2.RankRequest(request_id=request.get("request_id", ""),
                                 model=request.get("model", ""),
                                 timeout_ms=request.get("timeout_ms", 0),
                                 num_candidates=len(cands))
    sides: tuple[tuple[Side, list[dict[str, Any]], Any], ...] = (
        ("user", [request["user"]], msg.user), ("candidate", cands, msg.candidates))
    for side, ents, out in sides:
        for f in schema.sparse_by_side(side):
            if f.multi_valued:
                vals = [list(e[f.name]) for e in ents]
                out.add(name=f.name, ids=np.array([i for v in vals for i in v], "<i8").tobytes(),
                        lengths=np.array([len(v) for v in vals], "<i4").tobytes())
            else:
                out.add(name=f.name, ids=np.array([e[f.name] for e in ents], "<i8").tobytes())
        for d in schema.dense_by_side(side):
            out.add(name=d.name, values=np.array([e[d.name] for e in ents], "<f4").tobytes())
    body: bytes = msg.SerializeToString()
    return body
