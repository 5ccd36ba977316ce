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
    f = float(v)
    if not math.isfinite(f):
        raise RequestError(field, "must be finite (NaN and Inf are refused)")
    return f


def _check_entity(obj: Any, side: Side, schema: FeatureSchema, field: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise RequestError(field, f"must be an object of {side} features")
    known = {f.name for f in schema.sparse_by_side(side)} | {f.name for f in schema.dense_by_side(side)}
    for key in obj:
        if key not in known:
            raise RequestError(f"{field}.{key}", f"unknown {side} feature (expected {sorted(known)})")
    for name in known:
        if name not in obj:
            raise RequestError(f"{field}.{name}", f"missing {side} feature")
    return obj


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
    for i, c in enumerate(cands):
        _check_entity(c, "candidate", schema, f"candidates[{i}]")
    sparse: dict[str, SparseColumn] = {}
    for f in schema.sparse:
        ents = [user] if f.side == "user" else cands
        prefix = "user" if f.side == "user" else "candidates[{i}]"
        ids: list[int] = []
        lengths: list[int] = []
        for i, e in enumerate(ents):
            field = f"{prefix.format(i=i)}.{f.name}"
            v = e[f.name]
            if f.multi_valued:
                if not isinstance(v, list):
                    raise RequestError(field, "must be a list of integer IDs")
                vals = [_int_id(x, f"{field}[{j}]") for j, x in enumerate(v[: f.max_length])]
                ids.extend(vals)
                lengths.append(len(vals))
            else:
                ids.append(_int_id(v, field))
                lengths.append(1)
        sparse[f.name] = SparseColumn(np.array(ids, dtype=np.int64), np.array(lengths, dtype=np.int64))
    n = len(cands)
    dense = np.empty((n, len(schema.dense)), dtype=np.float32)
    for j, df in enumerate(schema.dense):
        if df.side == "user":
            dense[:, j] = df.normalize(_number(user[df.name], f"user.{df.name}"))
        else:
            dense[:, j] = [df.normalize(_number(c[df.name], f"candidates[{i}].{df.name}"))
                           for i, c in enumerate(cands)]
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
