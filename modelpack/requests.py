"""Decode and validate ranking requests into columnar arrays, and plan their table rows.

The JSON request format (also the format of each version's eval.jsonl):
`{"request_id": str, "model": str, "timeout_ms": int, "user": {feature: value},
  "candidates": [{feature: value}, ...], "labels": [...] (ignored)}`.
Single-valued sparse features take one integer ID, multi-valued ones a list of IDs
(longer lists keep their first `max_length` IDs), dense features a finite number.
Every fault raises RequestError naming the field, so the ranker can answer 4xx.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from modelpack.hashing import rows_for
from modelpack.schema import FeatureSchema, Side, TableSpec

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_TOP_LEVEL = {"request_id", "model", "timeout_ms", "user", "candidates", "labels", "version"}


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


@dataclass
class DecodedRequest:
    """A validated request: sparse columns per feature and the normalized dense matrix."""

    request_id: str
    model: str
    timeout_ms: int | None
    num_candidates: int
    sparse: dict[str, SparseColumn]  # user features: 1 entity; candidate features: N
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


def decode_request(schema: FeatureSchema, req: Any, *, max_candidates: int = 1000) -> DecodedRequest:
    """Validate a JSON-shaped request against `schema` and convert it to arrays."""
    if not isinstance(req, dict):
        raise RequestError("body", "must be a JSON object")
    for key in req:
        if key not in _TOP_LEVEL:
            raise RequestError(key, f"unknown field (expected {sorted(_TOP_LEVEL)})")
    rid = req.get("request_id", "")
    if not isinstance(rid, str) or len(rid) > 256:
        raise RequestError("request_id", "must be a string of at most 256 characters")
    model = req.get("model", "")
    if not isinstance(model, str):
        raise RequestError("model", "must be a string")
    timeout = req.get("timeout_ms")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0):
        raise RequestError("timeout_ms", "must be a positive integer (milliseconds)")
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
        with np.errstate(over="ignore", invalid="ignore"):
            col = df.normalize_array(raw).astype(np.float32)
        if not np.isfinite(col).all():
            i = int(np.flatnonzero(~np.isfinite(col))[0])
            where = "user" if df.side == "user" else f"candidates[{i}]"
            raise RequestError(f"{where}.{df.name}", "value overflows float32 after normalization")
        dense[:, j] = col
    return DecodedRequest(request_id=rid, model=model, timeout_ms=timeout, num_candidates=n,
                          sparse=sparse, dense=dense)


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
