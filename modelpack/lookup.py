"""The lookup contract between the tiers: what a ranker asks for, what it gets back, where rows live.

Both tiers and every table source (remote shards, in-process tables, the offline scorer)
import these, so none of them needs grpc to speak about lookups. Rows are global table
rows; shard k of S holds the contiguous range [k*R//S, (k+1)*R//S) (modelpack.hashing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from modelpack.hashing import shard_bounds, shard_index

_SCAN_PARTS = 8
# Trailing metadata of a replica's UNAVAILABLE while it drains after SIGTERM: "I am going
# away, a sibling can answer". Clients keep retrying on it up to their deadline, whereas a
# replica that cannot be reached at all is given up on within milliseconds.
DRAINING_METADATA = ("x-embedding-draining", "1")
# Why a lookup failed, machine-readable (protos/embedding.proto lists them all): unary
# errors carry it in this trailing metadata key, LookupStream answers in LookupFailure.reason.
REASON_METADATA = "x-embedding-reason"
VERSION_NOT_LOADED = "version_not_loaded"  # the shard does not hold the version READY
FINGERPRINT_MISMATCH = "fingerprint_mismatch"  # it holds another build of it: the alarm
DRAINING = "draining"  # it is shutting down: another replica can answer
SEQ_NOT_APPLIED = "seq_not_applied"  # it cannot read the delta seq named: a sibling may
DELTA_REFUSED = "delta_refused"  # ApplyDeltas: a delta failed verification; nothing changed
# Packed INT4 rows, one per looked-up row: uint8 (rows, 4 + dim/2) in FBGEMM's TBE layout.
Packed = npt.NDArray[np.uint8]


@dataclass
class TableQuery:
    """One table's part of a logical lookup.

    rows: int64 global row ids; offsets: int64 (bags + 1) or None for one row per bag;
    pooling: none|sum|mean; output: int4 (pooling none only) | fp16 | fp32.
    """

    table: str
    num_rows: int
    dim: int
    rows: npt.NDArray[np.int64]
    offsets: npt.NDArray[np.int64] | None = None
    pooling: str = "none"
    output: str = "int4"


def split_rows(rows: npt.NDArray[np.int64], bounds: npt.NDArray[np.int64]
               ) -> list[npt.NDArray[np.int64]]:
    """Per shard (of `bounds`), the positions in `rows` it holds, ascending (bag order kept)."""
    shard = shard_index(rows, bounds)
    parts = bounds.size - 1
    if parts <= _SCAN_PARTS:  # a linear scan per part beats the sort (56 vs 221 µs, 8192 rows, 2 parts)
        return [np.flatnonzero(shard == k).astype(np.int64, copy=False) for k in range(parts)]
    order = np.argsort(shard, kind="stable")
    starts = np.zeros(bounds.size, dtype=np.int64)
    np.cumsum(np.bincount(shard, minlength=parts), out=starts[1:])
    return [order[starts[k]:starts[k + 1]].astype(np.int64) for k in range(parts)]


def unique_rows(rows: npt.NDArray[np.int64]
                ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.intp]]:
    """Each row once, ascending, and `inverse` with unique[inverse] == rows.

    Zipf traffic repeats rows within a batch (popular ads, one user per candidate): ask
    for each once, expand the answer with `inverse`. Ascending, so every row range (a
    shard's part) is one contiguous slice of `unique` (np.searchsorted on the bounds).
    """
    # A sort (not an argsort) and a searchsorted: half of np.unique(return_inverse)'s time.
    ordered = np.sort(np.asarray(rows, dtype=np.int64))
    first = np.empty(ordered.size, dtype=bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    unique = ordered[first]
    return unique, np.searchsorted(unique, rows)


def gather_rows(rows: npt.NDArray[np.int64], num_rows: int, num_parts: int, width: int,
                take: Callable[[int, npt.NDArray[np.int64]], Packed]) -> Packed:
    """Packed rows from a table split in `num_parts` row ranges; take(k, local rows) reads part k."""
    bounds = shard_bounds(num_rows, num_parts)
    out = np.empty((rows.size, width), dtype=np.uint8)
    for k, pos in enumerate(split_rows(rows, bounds)):
        if pos.size:
            out[pos] = take(k, rows[pos] - bounds[k])
    return out
