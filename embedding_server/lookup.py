"""Lookup semantics (protos/embedding.proto): validate one request, gather, pool, pack.

Arrays are parsed with np.frombuffer and answered with tobytes(): the only per-element
work is numpy's and the kernels'. Every malformed input raises ServiceError with
INVALID_ARGUMENT, naming the table and the first bad value.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import grpc
import numpy as np
import numpy.typing as npt
import torch

from embedding_server.errors import ServiceError
from embedding_server.fbgemm_tbe import Pooling
from embedding_server.served_table import ServedTable
from embedding_server.table_store import LoadedVersion
from protos import embedding_pb2 as pb

# Request arrays are read-only views of the protobuf bytes, and only ever read.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_I64 = np.dtype("<i8")
OUTPUT_NAMES = {pb.OUTPUT_INT4_PACKED: "int4_packed", pb.OUTPUT_FP16: "fp16", pb.OUTPUT_FP32: "fp32"}
_POOLING_NAMES = {pb.POOLING_NONE: "POOLING_NONE", pb.POOLING_SUM: "POOLING_SUM",
                  pb.POOLING_MEAN: "POOLING_MEAN"}
_KERNEL_POOLING: dict[int, Pooling] = {pb.POOLING_NONE: "sum", pb.POOLING_SUM: "sum",
                                       pb.POOLING_MEAN: "mean"}


def _bad(table: str, message: str) -> ServiceError:
    return ServiceError(_INVALID, f"table {table!r}: {message}")


def _int64s(table: str, field: str, raw: bytes) -> npt.NDArray[np.int64]:
    if len(raw) % 8:
        raise _bad(table, f"{field} has {len(raw)} bytes, not a whole number of int64 LE values "
                          "(8 bytes each)")
    return np.frombuffer(raw, dtype=_I64)


def _check_rows(t: ServedTable, name: str, rows: npt.NDArray[np.int64], shard: int,
                num_shards: int) -> None:
    if rows.size and (int(rows.min()) < t.start or int(rows.max()) >= t.stop):
        i = int(np.flatnonzero((rows < t.start) | (rows >= t.stop))[0])
        raise _bad(name, f"row {int(rows[i])} (rows[{i}]) is outside shard {shard} of {num_shards}'s "
                         f"range [{t.start}, {t.stop}) of the table's {t.spec.rows} rows")


def _check_offsets(name: str, offsets: npt.NDArray[np.int64], num_rows: int) -> None:
    if offsets.size == 0:
        raise _bad(name, "offsets must hold at least one value (offsets[0] = 0)")
    if offsets[0] != 0:
        raise _bad(name, f"offsets[0] must be 0, got {int(offsets[0])}")
    if offsets[-1] != num_rows:
        raise _bad(name, f"offsets[-1] must equal the number of rows {num_rows}, "
                         f"got {int(offsets[-1])}")
    steps = np.diff(offsets)
    if steps.size and int(steps.min()) < 0:
        i = int(np.flatnonzero(steps < 0)[0]) + 1
        raise _bad(name, f"offsets must be non-decreasing, offsets[{i}] = {int(offsets[i])} "
                         f"< offsets[{i - 1}] = {int(offsets[i - 1])}")


def lookup_group(version: LoadedVersion, g: pb.TableLookup, shard: int, num_shards: int
                 ) -> tuple[pb.TableResult, int]:
    """Answer one TableLookup; returns (result, rows served)."""
    t = version.tables.get(g.table)
    if t is None:
        raise _bad(g.table, f"no such table in {version.model}/{version.version} "
                            f"(tables: {', '.join(sorted(version.tables))})")
    if g.output not in OUTPUT_NAMES:
        raise _bad(g.table, f"unknown output {g.output}")
    if g.pooling not in _POOLING_NAMES:
        raise _bad(g.table, f"unknown pooling {g.pooling}")
    rows = _int64s(g.table, "rows", g.rows)
    _check_rows(t, g.table, rows, shard, num_shards)
    pooled = g.pooling != pb.POOLING_NONE
    if g.output == pb.OUTPUT_INT4_PACKED and pooled:
        raise _bad(g.table, f"OUTPUT_INT4_PACKED returns stored rows and needs POOLING_NONE, "
                            f"got {_POOLING_NAMES[g.pooling]}")
    if g.offsets and not pooled:
        raise _bad(g.table, f"offsets must be empty with POOLING_NONE, got {len(g.offsets) // 8} values")
    if g.output == pb.OUTPUT_INT4_PACKED:
        data = t.gather(rows).tobytes()
        return pb.TableResult(table=g.table, dim=t.spec.dim, count=rows.size, data=data), rows.size
    off = None  # one row per bag
    if g.offsets:
        offsets = _int64s(g.table, "offsets", g.offsets)
        _check_offsets(g.table, offsets, rows.size)
        off = torch.from_numpy(offsets)
    out = t.lookup(rows, off, _KERNEL_POOLING[g.pooling], "fp16" if g.output == pb.OUTPUT_FP16 else "fp32")
    return (pb.TableResult(table=g.table, dim=t.spec.dim, count=int(out.shape[0]),
                           data=out.numpy().tobytes()), rows.size)


def run_lookup(version: LoadedVersion, req: pb.LookupRequest, *, shard: int, num_shards: int,
               deadline: float | None, on_rows: Callable[[str, str, int], None] | None = None
               ) -> pb.LookupResponse:
    """Answer a whole LookupRequest for an acquired version.

    `deadline` is a time.monotonic() value (None = no deadline), checked before each
    group. `on_rows(table, output, rows)` is called per group served (metrics).
    """
    resp = pb.LookupResponse(model=version.model, version=version.version,
                             fingerprint=version.fingerprint, shard=shard, num_shards=num_shards)
    results, served = [], []
    for g in req.tables:
        if deadline is not None and time.monotonic() > deadline:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"deadline passed before table {g.table!r} was looked up")
        result, n = lookup_group(version, g, shard, num_shards)
        results.append(result)
        served.append((g.table, OUTPUT_NAMES[g.output], n))
    resp.results.extend(results)
    if on_rows is not None:  # only once the whole request has succeeded
        for table, output, n in served:
            on_rows(table, output, n)
    return resp
