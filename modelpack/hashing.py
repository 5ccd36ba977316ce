"""ID hashing (raw entity ID + feature seed -> table row) and row sharding.

One deterministic, vectorized function used identically by export, embedding server,
ranker and tests. It is splitmix64's finalizer over (id XOR seed * golden ratio), taken
modulo the table's rows: cheap in numpy (wrapping uint64 arithmetic), well mixed for
sequential IDs, and different per seed so one table can serve several features (Unified
Embedding). TEST_VECTORS pins the function: changing it would silently remap every
trained model, so a test fails first.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)

# (raw id, seed, num_rows) -> row. Published so other implementations can check themselves.
TEST_VECTORS: tuple[tuple[int, int, int, int], ...] = (
    (0, 0, 1000, 535),
    (1, 0, 1000, 465),
    (1, 101, 1000, 229),
    (123456789, 101, 1000, 971),
    (-1, 7, 450_000_000, 97043436),
    (2**62 + 3, 203, 200_000, 48251),
)


def _mix(ids: npt.NDArray[np.int64], seed: int) -> npt.NDArray[np.uint64]:
    with np.errstate(over="ignore"):
        z = ids.astype(np.int64, copy=False).view(np.uint64) ^ (
            np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _GOLDEN
        )
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def rows_for(ids: npt.NDArray[np.int64], seed: int, num_rows: int) -> npt.NDArray[np.int64]:
    """Map raw 64-bit entity IDs (any shape, int64) to rows in [0, num_rows) for a feature seed."""
    if num_rows <= 0:
        raise ValueError(f"num_rows must be > 0, got {num_rows}")
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"entity IDs must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    return (_mix(arr, seed) % np.uint64(num_rows)).astype(np.int64)


def shard_bounds(num_rows: int, num_shards: int) -> npt.NDArray[np.int64]:
    """Row boundaries: shard k holds rows [b[k], b[k+1]) with b[k] = k * R // S."""
    if num_shards <= 0 or num_rows < num_shards:
        raise ValueError(f"need 1 <= num_shards <= num_rows, got {num_shards} shards, {num_rows} rows")
    k = np.arange(num_shards + 1, dtype=np.int64)
    # Python ints avoid int64 overflow of k * R for huge tables.
    return np.array([int(i) * num_rows // num_shards for i in k], dtype=np.int64)


def shard_range(shard: int, num_rows: int, num_shards: int) -> tuple[int, int]:
    """The [start, stop) global row range owned by `shard`."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
    return shard * num_rows // num_shards, (shard + 1) * num_rows // num_shards


def shard_of(rows: npt.NDArray[np.int64], num_rows: int, num_shards: int
             ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Global rows -> (shard index, row local to that shard) for contiguous row ranges."""
    r = np.asarray(rows, dtype=np.int64)
    if r.size and (int(r.min()) < 0 or int(r.max()) >= num_rows):
        bad = r[(r < 0) | (r >= num_rows)][0]
        raise ValueError(f"row {int(bad)} outside table of {num_rows} rows")
    bounds = shard_bounds(num_rows, num_shards)
    shard = shard_index(r, bounds)
    return shard, r - bounds[shard]


def shard_index(rows: npt.NDArray[np.int64], bounds: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The shard (index into `bounds` from shard_bounds) holding each global row; no range check."""
    return np.searchsorted(bounds, rows, side="right").astype(np.int64) - 1
