"""Lookup semantics (protos/embedding.proto): check one request, then gather into its answer.

Three passes over the request's groups, the first two cheap: `measure` reads each group's
bytes once (every later step uses those arrays: no field is read, nor copied, twice) and
applies the cost limits before the version is even looked at; `resolve` checks
everything else against the held version (table, output, pooling, offsets, one bounds
check per group, answer size) before any gather runs; `execute` gathers or pools each
group and joins the outputs into the answer's wire bytes (embedding_server.wire). Every malformed
input raises ServiceError INVALID_ARGUMENT naming the table and the first bad value;
cost limits raise it with reason over_limit.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import grpc
import numpy as np
import numpy.typing as npt
import torch

from embedding_server.config import ServerConfig
from embedding_server.errors import OVER_LIMIT, ServiceError
from embedding_server.fbgemm_tbe import Output, Pooling
from embedding_server.overlay import Hits, OverlayState, TableOverlay
from embedding_server.served_table import Segment, ServedTable
from embedding_server.table_store import LoadedVersion
from embedding_server.wire import id_field, response_head, result_head, seq_field
from protos import embedding_pb2 as pb

# Request arrays are read-only views of the protobuf bytes, and only ever read.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_I64 = np.dtype("<i8")
OUTPUT_NAMES: dict[int, str] = {pb.OUTPUT_INT4_PACKED: "int4_packed", pb.OUTPUT_FP16: "fp16",
                               pb.OUTPUT_FP32: "fp32"}
_KERNEL_OUTPUT: dict[int, Output] = {pb.OUTPUT_FP16: "fp16", pb.OUTPUT_FP32: "fp32"}
_POOLING_NAMES: dict[int, str] = {pb.POOLING_NONE: "POOLING_NONE", pb.POOLING_SUM: "POOLING_SUM",
                  pb.POOLING_MEAN: "POOLING_MEAN"}
_KERNEL_POOLING: dict[int, Pooling] = {pb.POOLING_NONE: "sum", pb.POOLING_SUM: "sum",
                                       pb.POOLING_MEAN: "mean"}
_max = np.maximum.reduce  # ndarray.max() without its Python wrapper (_amax)
_arange = torch.arange(1 << 16, dtype=torch.int64)  # offsets of one row per bag, sliced per call


def _bad(table: str, message: str) -> ServiceError:
    return ServiceError(_INVALID, f"table {table!r}: {message}")


def _too_much(asks: str, flag: str, limit: int) -> ServiceError:
    return ServiceError(_INVALID, f"request {asks}, more than this server's {flag}={limit}; split it",
                        OVER_LIMIT)


def _one_per_bag(n: int) -> torch.Tensor:
    global _arange
    if n + 1 > _arange.numel():  # grown (rarely) by replacing the reference: thread-safe
        _arange = torch.arange(max(n + 1, 2 * _arange.numel()), dtype=torch.int64)
    return _arange[:n + 1]


@dataclass
class Group:
    """One TableLookup: its fields read once, then resolved against the held version."""

    name: str
    output: int
    pooling: int
    rows_raw: bytes
    offsets_raw: bytes
    count: int  # output vectors: bags when pooled with offsets, else one per row
    table: ServedTable | None = None
    segment: Segment | None = None  # the one segment holding every row (None: route by file)
    index: npt.NDArray[np.int64] | None = None  # rows local to `segment` (or global when routed)
    offsets: torch.Tensor | None = None
    overlay: TableOverlay | None = None  # the delta rows replacing some of the table's, if any
    width: int = 0  # answer bytes per output vector

    @property
    def num_rows(self) -> int:
        return len(self.rows_raw) // 8


def measure(req: pb.LookupRequest, cfg: ServerConfig) -> list[Group]:
    """Read every group once and refuse (over_limit) too many groups, rows or bags."""
    tables = req.tables
    if len(tables) > cfg.max_tables_per_request:  # first: the rest walks every group
        raise _too_much(f"carries {len(tables)} table groups", "--max-tables-per-request",
                        cfg.max_tables_per_request)
    groups, rows, bags = [], 0, 0
    for g in tables:
        raw, off, pooling = g.rows, g.offsets, g.pooling
        n = len(raw) // 8
        k = len(off) // 8 if pooling != pb.POOLING_NONE else 0
        count = max(k - 1, 0) if k else n
        groups.append(Group(g.table, g.output, pooling, raw, off, count))
        rows += n
        bags += count
    if rows > cfg.max_rows_per_request:
        raise _too_much(f"asks for {rows} rows", "--max-rows-per-request", cfg.max_rows_per_request)
    if bags > cfg.max_bags_per_request:
        raise _too_much(f"asks for {bags} bags", "--max-bags-per-request", cfg.max_bags_per_request)
    return groups


def _int64s(table: str, field: str, raw: bytes) -> npt.NDArray[np.int64]:
    if len(raw) % 8:
        raise _bad(table, f"{field} has {len(raw)} bytes, not a whole number of int64 LE values "
                          "(8 bytes each)")
    return np.frombuffer(raw, dtype=_I64)


def _range_error(t: ServedTable, name: str, rows: npt.NDArray[np.int64], shard: int,
                 num_shards: int) -> ServiceError:
    i = int(np.flatnonzero((rows < t.start) | (rows >= t.stop))[0])
    return _bad(name, f"row {int(rows[i])} (rows[{i}]) is outside shard {shard} of {num_shards}'s "
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


def _resolve(g: Group, version: LoadedVersion, state: OverlayState, shard: int, num_shards: int
             ) -> None:
    t = version.tables.get(g.name)
    if t is None:
        raise _bad(g.name, f"no such table in {version.model}/{version.version} "
                           f"(tables: {', '.join(sorted(version.tables))})")
    if g.output not in OUTPUT_NAMES:
        raise _bad(g.name, f"unknown output {g.output}")
    if g.pooling not in _POOLING_NAMES:
        raise _bad(g.name, f"unknown pooling {g.pooling}")
    rows = _int64s(g.name, "rows", g.rows_raw)
    pooled = g.pooling != pb.POOLING_NONE
    if g.output == pb.OUTPUT_INT4_PACKED and pooled:
        raise _bad(g.name, f"OUTPUT_INT4_PACKED returns stored rows and needs POOLING_NONE, "
                           f"got {_POOLING_NAMES[g.pooling]}")
    if g.offsets_raw and not pooled:
        raise _bad(g.name, f"offsets must be empty with POOLING_NONE, got {len(g.offsets_raw) // 8} values")
    if g.offsets_raw:
        offsets = _int64s(g.name, "offsets", g.offsets_raw)
        _check_offsets(g.name, offsets, rows.size)
        g.offsets = torch.from_numpy(offsets)
    # The one bounds check: rows - start as uint64 is below the range's length iff
    # start <= row < stop (a row below start wraps around to a huge value). The subtraction
    # also runs for start 0: np.take copies a read-only index (the request's bytes) through
    # its slow casting path, +15 µs at 4096 rows, more than this one vectorized pass.
    local = rows - t.start
    if rows.size and int(_max(local.view(np.uint64))) >= t.stop - t.start:
        raise _range_error(t, g.name, rows, shard, num_shards)
    g.table = t
    g.overlay = state.tables.get(g.name)
    if len(t.segments) == 1:  # the usual case: the shard's range lies inside one file
        g.segment, g.index = t.segments[0], local
    else:
        g.index = rows
    g.width = t.spec.row_bytes if g.output == pb.OUTPUT_INT4_PACKED else t.spec.dim * (
        2 if g.output == pb.OUTPUT_FP16 else 4)


def resolve(groups: list[Group], version: LoadedVersion, state: OverlayState, cfg: ServerConfig
            ) -> None:
    """Check every group against the held version (at the held delta state), and the
    answer's size, before any work."""
    for g in groups:
        _resolve(g, version, state, cfg.shard, cfg.num_shards)
    size = sum(g.count * g.width for g in groups)
    if size > cfg.max_response_bytes:
        raise _too_much(f"needs an answer of {size} bytes", "--max-response-bytes",
                        cfg.max_response_bytes)


def _gather(g: Group) -> npt.NDArray[np.generic]:
    """The group's answer rows: the gather's (or kernel's) own output, not copied here."""
    t, s, idx = g.table, g.segment, g.index
    assert t is not None and idx is not None  # resolved
    if g.overlay is not None:
        # idx is local to the one segment, which starts at the shard's first row, or global.
        hits = g.overlay.hits(idx if s is not None else idx - t.start)
        if hits is not None:
            return _overlaid(g, g.overlay, hits)
    if g.output == pb.OUTPUT_INT4_PACKED:
        return s.take(idx) if s is not None else t.gather(idx)
    kind, output = _KERNEL_POOLING[g.pooling], _KERNEL_OUTPUT[g.output]
    if s is not None:
        off = g.offsets if g.offsets is not None else _one_per_bag(idx.size)
        return s.kernel.lookup(torch.from_numpy(idx), off, kind, output).numpy()
    return t.lookup(idx, g.offsets, kind, output).numpy()


def _overlaid(g: Group, ov: TableOverlay, hits: Hits) -> npt.NDArray[np.generic]:
    """_gather for a group some of whose rows the delta overlay replaces."""
    t, s, idx = g.table, g.segment, g.index
    assert t is not None and idx is not None  # resolved
    if g.output == pb.OUTPUT_INT4_PACKED:
        return ov.patch(s.take(idx) if s is not None else t.gather(idx), hits)
    rows = idx + t.start if s is not None else idx  # global
    return ov.lookup(t, rows, hits, g.offsets, _KERNEL_POOLING[g.pooling],
                     _KERNEL_OUTPUT[g.output]).numpy()


def execute(groups: list[Group], version: LoadedVersion, seq: int, rid: int, cfg: ServerConfig,
            deadline: float | None) -> bytes:
    """The LookupResponse wire bytes; `deadline` (time.monotonic(), None = none) is checked
    before each group. The join is the answer's one copy between the gathers and gRPC."""
    pieces: list[bytes | memoryview] = [response_head(
        version.model, version.version, version.fingerprint, cfg.shard, cfg.num_shards)]
    for g in groups:
        if deadline is not None and time.monotonic() > deadline:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"deadline passed before table {g.name!r} was looked up")
        data = _gather(g)
        assert g.table is not None  # resolved
        pieces.append(result_head(g.name.encode(), g.table.spec.dim, g.count, data.nbytes))
        pieces.append(data.data)  # the array's memory, not a copy
    pieces.append(id_field(rid))
    pieces.append(seq_field(seq))
    return b"".join(pieces)
