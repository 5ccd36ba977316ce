"""ID hashing test vectors and the sharding math."""

from __future__ import annotations

import numpy as np
import pytest

from modelpack.hashing import TEST_VECTORS, rows_for, shard_bounds, shard_of, shard_range


@pytest.mark.parametrize(("raw", "seed", "num_rows", "row"), TEST_VECTORS)
def test_published_vectors(raw: int, seed: int, num_rows: int, row: int) -> None:
    assert int(rows_for(np.array([raw], dtype=np.int64), seed, num_rows)[0]) == row


def test_vectorized_equals_scalar_and_in_range() -> None:
    ids = np.random.default_rng(0).integers(-(2**62), 2**62, size=10_000)
    rows = rows_for(ids, 101, 450_000_000)
    assert rows.dtype == np.int64 and rows.min() >= 0 and rows.max() < 450_000_000
    one_by_one = [int(rows_for(np.array([i]), 101, 450_000_000)[0]) for i in ids[:50]]
    assert one_by_one == rows[:50].tolist()
    assert rows_for(ids.reshape(100, 100), 101, 450_000_000).shape == (100, 100)


def test_seeds_decorrelate_features_and_rows_spread() -> None:
    ids = np.arange(200_000, dtype=np.int64)
    a, b = rows_for(ids, 1, 1000), rows_for(ids, 2, 1000)
    assert (a == b).mean() < 0.01  # about 1/1000 by chance
    counts = np.bincount(a, minlength=1000)
    assert counts.min() > 120 and counts.max() < 290  # mean 200: sequential IDs spread evenly


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="num_rows"):
        rows_for(np.array([1]), 0, 0)
    with pytest.raises(ValueError, match="integers"):
        rows_for(np.array([1.5]), 0, 10)  # type: ignore[arg-type]


@pytest.mark.parametrize(("rows", "shards"), [(10, 3), (450_000_000, 7), (5, 5), (1, 1)])
def test_shards_partition_rows(rows: int, shards: int) -> None:
    b = shard_bounds(rows, shards)
    assert b[0] == 0 and b[-1] == rows and np.all(np.diff(b) >= 0)
    for k in range(shards):
        assert shard_range(k, rows, shards) == (int(b[k]), int(b[k + 1]))
    probe = np.unique(np.concatenate([b[:-1], b[1:] - 1, [0, rows - 1]]))
    shard, local = shard_of(probe, rows, shards)
    starts = b[shard]
    assert np.all(starts + local == probe)
    assert np.all((local >= 0) & (probe < b[shard + 1]))


def test_shard_of_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="row 10 outside"):
        shard_of(np.array([3, 10]), 10, 2)
    with pytest.raises(ValueError, match="num_shards"):
        shard_bounds(3, 4)
