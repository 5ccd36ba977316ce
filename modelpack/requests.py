"""Decode and validate ranking requests into columnar arrays, and plan their table rows.

The JSON request format (also the format of each version's eval.jsonl):
`{"request_id": str, "model": str, "timeout_ms": int, "user": {feature: value},
  "candidates": [{feature: value}, ...], "labels": [...] (ignored)}`.
Single-valued sparse features take one integer ID, multi-valued ones a list of IDs
(longer lists keep their first `max_length` IDs), dense features a finite number.
Every fault raises RequestError naming the field, so the ranker can answer 4xx.

A request is read in two parts: its Envelope (`parse_envelope`: request id, model,
version pin, timeout), checked once and cheaply before any feature is looked at, and
its features (`decode_features`), validated against the version's schema into a
DecodedRequest, which carries features only, so a merged batch is one too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from modelpack.hashing import rows_for
from modelpack.schema import DenseFeature, FeatureSchema, Side, TableSpec

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_TOP_LEVEL = {"request_id", "model", "timeout_ms", "user", "candidates", "labels", "version"}
MAX_REQUEST_ID = 256


class RequestError(ValueError):
    """A ranking request that does not fit the model's schema; `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class SparseColumn:
    """IDs of one sparse feature: `lengths[i]` IDs for entity i, concatenated in `ids`."""

    ids: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int64]


@dataclass(frozen=True)
class Envelope:
    """What a request says about itself besides its features; build it with `checked`."""

    request_id: str = ""
    model: str = ""  # "" = whatever model the ranker serves
    version: str | None = None  # pin to a loaded version instead of the traffic split
    timeout_ms: int | None = None  # None = the server's default

    @classmethod
    def checked(cls, request_id: Any, model: Any, version: Any, timeout_ms: Any) -> Envelope:
        """The one validation of an envelope, whatever the body format it came in."""
        if not isinstance(request_id, str) or len(request_id) > MAX_REQUEST_ID:
            raise RequestError("request_id",
                               f"must be a string of at most {MAX_REQUEST_ID} characters")
        if not isinstance(model, str):
            raise RequestError("model", "must be a string")
        if version is not None and not isinstance(version, str):
            raise RequestError("version", "must be a string naming a loaded version")
        if timeout_ms is not None and (isinstance(timeout_ms, bool)
                                       or not isinstance(timeout_ms, int) or timeout_ms <= 0):
            raise RequestError("timeout_ms", "must be a positive integer (milliseconds)")
        return cls(request_id, model, version, timeout_ms)


@dataclass
class DecodedRequest:
    """Validated features of one request or of a merged batch (no envelope): sparse columns
    per feature and the normalized dense matrix."""

    num_candidates: int
    sparse: dict[str, SparseColumn]  # user features: one entity per request; candidates: N
    dense: npt.NDArray[np.float32]  # (N, num_dense) normalized, schema.dense order


def _int_id(v: Any, field: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(field, f"must be an integer ID, got {type(v).__name__}")
    if not _I64_MIN <= v <= _I64_MAX:
        raise RequestError(field, "ID does not fit in 64 bits")
    return v


def _number(v: Any, field: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise RequestError(field, f"must be a number, got {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:
        raise RequestError(field, "number too large") from None
    if not math.isfinite(f):
        raise RequestError(field, "must be finite (NaN and Inf are refused)")
    return f


def _check_entity(obj: Any, side: Side, schema: FeatureSchema, field: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise RequestError(field, f"must be an object of {side} features")
    known = _side_names(schema, side)
    for key in obj:
        if key not in known:
            raise RequestError(f"{field}.{key}", f"unknown {side} feature (expected {sorted(known)})")
    for name in known:
        if name not in obj:
            raise RequestError(f"{field}.{name}", f"missing {side} feature")
    return obj


def _side_names(schema: FeatureSchema, side: Side) -> set[str]:
    return {f.name for f in schema.sparse_by_side(side)} | {f.name for f in schema.dense_by_side(side)}


def _int_column(name: str, vals: list[Any]) -> npt.NDArray[np.int64]:
    """Candidate IDs of one feature as int64; a bad one is named by its candidate index."""
    if set(map(type, vals)) == {int}:
        try:
            return np.array(vals, dtype=np.int64)
        except OverflowError:
            pass
    for i, v in enumerate(vals):
        _int_id(v, f"candidates[{i}].{name}")
    raise AssertionError("unreachable: some ID must have failed validation")


def _float_column(name: str, vals: list[Any]) -> npt.NDArray[np.float64]:
    if set(map(type, vals)) <= {int, float}:
        try:
            arr = np.array(vals, dtype=np.float64)
        except OverflowError:  # an int beyond float64
            arr = np.array([math.nan])
        if np.isfinite(arr).all():
            return arr
    for i, v in enumerate(vals):
        _number(v, f"candidates[{i}].{name}")
    raise AssertionError("unreachable: some value must have failed validation")


def _multi_column(name: str, max_length: int, ents: list[Any], user: bool) -> SparseColumn:
    ids: list[int] = []
    lengths: list[int] = []
    for i, e in enumerate(ents):
        field = f"user.{name}" if user else f"candidates[{i}].{name}"
        v = e[name]
        if not isinstance(v, list):
            raise RequestError(field, "must be a list of integer IDs")
        vals = [_int_id(x, f"{field}[{j}]") for j, x in enumerate(v[:max_length])]
        ids.extend(vals)
        lengths.append(len(vals))
    return SparseColumn(np.array(ids, dtype=np.int64), np.array(lengths, dtype=np.int64))


def parse_envelope(req: Any) -> Envelope:
    """The envelope of a JSON-shaped request; also refuses unknown top-level fields."""
    if not isinstance(req, dict):
        raise RequestError("body", "must be a JSON object")
    for key in req:
        if key not in _TOP_LEVEL:
            raise RequestError(key, f"unknown field (expected {sorted(_TOP_LEVEL)})")
    return Envelope.checked(req.get("request_id", ""), req.get("model", ""), req.get("version"),
                            req.get("timeout_ms"))


def decode_request(schema: FeatureSchema, req: Any, *, max_candidates: int = 1000
                   ) -> DecodedRequest:
    """A whole JSON-shaped request checked and decoded (offline: eval.jsonl, training)."""
    parse_envelope(req)
    return decode_features(schema, req, max_candidates=max_candidates)


def decode_features(schema: FeatureSchema, req: dict[str, Any], *, max_candidates: int = 1000
                    ) -> DecodedRequest:
    """Validate the features of a request whose envelope `parse_envelope` has read."""
    user = _check_entity(req.get("user"), "user", schema, "user")
    cands = req.get("candidates")
    if not isinstance(cands, list) or not cands:
        raise RequestError("candidates", "must be a non-empty list")
    if len(cands) > max_candidates:
        raise RequestError("candidates", f"{len(cands)} candidates, at most {max_candidates} allowed")
    cand_keys = _side_names(schema, "candidate")
    for i, c in enumerate(cands):
        # Fast path: one C-level comparison per candidate; the slow path names the field.
        if not isinstance(c, dict) or c.keys() != cand_keys:
            _check_entity(c, "candidate", schema, f"candidates[{i}]")
    sparse: dict[str, SparseColumn] = {}
    for f in schema.sparse:
        if f.multi_valued:
            ents = [user] if f.side == "user" else cands
            sparse[f.name] = _multi_column(f.name, f.max_length, ents, f.side == "user")
        elif f.side == "user":
            ids = np.array([_int_id(user[f.name], f"user.{f.name}")], dtype=np.int64)
            sparse[f.name] = SparseColumn(ids, np.ones(1, dtype=np.int64))
        else:
            vals = [c[f.name] for c in cands]
            sparse[f.name] = SparseColumn(_int_column(f.name, vals), np.ones(len(vals), dtype=np.int64))
    n = len(cands)
    dense = np.empty((n, len(schema.dense)), dtype=np.float32)
    for j, df in enumerate(schema.dense):
        if df.side == "user":
            raw = np.array([_number(user[df.name], f"user.{df.name}")])
        else:
            raw = _float_column(df.name, [c[df.name] for c in cands])
        dense[:, j] = normalized(df, raw)
    return DecodedRequest(num_candidates=n, sparse=sparse, dense=dense)


def normalized(df: DenseFeature, raw: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """`df.normalize_array(raw)` for finite `raw`; a value it overflows is refused by name."""
    col = df.normalize_array(raw)
    if not np.isfinite(col).all():
        i = int(np.flatnonzero(~np.isfinite(col))[0])
        where = f"user.{df.name}" if df.side == "user" else f"candidates[{i}].{df.name}"
        raise RequestError(where, "value overflows float32 once normalized")
    return col


@dataclass
class FeatureRows:
    """Table rows of one sparse feature and the bag offsets that pool them per entity."""

    feature: str
    table: str
    rows: npt.NDArray[np.int64]
    offsets: npt.NDArray[np.int64]  # entities + 1


def plan_rows(schema: FeatureSchema, tables: dict[str, TableSpec], req: DecodedRequest
              ) -> list[FeatureRows]:
    """Hash every sparse ID to its table row (schema.sparse order)."""
    out = []
    for f in schema.sparse:
        col = req.sparse[f.name]
        rows = rows_for(col.ids, f.hash_seed, tables[f.table].rows)
        offsets = np.zeros(col.lengths.size + 1, dtype=np.int64)
        np.cumsum(col.lengths, out=offsets[1:])
        out.append(FeatureRows(f.name, f.table, rows, offsets))
    return out
