"""Property: de-duplicating a batch's rows before the wire changes nothing but the wire.

Any batch, any duplicates, any shard count: RemoteTables sends each row once per table,
ascending, every shard's part one contiguous slice, and hands back exactly the rows it
would have without de-duplication (read here straight from an in-memory packed table).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedding_server.client import split_query
from modelpack.hashing import shard_bounds
from modelpack.lookup import Packed, TableQuery, split_rows, unique_rows
from ranker_server.metrics import Metrics
from ranker_server.remote_tables import RemoteTables
from ranker_server.versions import LoadedVersion

# Fixed seed, and no local example database that could make CI's run differ from the last.
PROPERTY = settings(deadline=None, database=None, derandomize=True, max_examples=300,
                    suppress_health_check=[HealthCheck.too_slow])
T = TypeVar("T")
WIDTH = 12
NUM_ROWS = 97  # small, so batches repeat rows often

batches = st.lists(st.lists(st.integers(0, NUM_ROWS - 1), max_size=300), min_size=1, max_size=3)


def table() -> Packed:
    return np.random.default_rng(7).integers(0, 256, (NUM_ROWS, WIDTH), dtype=np.uint8)


@PROPERTY
@given(st.lists(st.integers(-(2**62), 2**62), max_size=400), st.integers(1, 9))
def test_unique_rows_is_each_row_once_ascending_and_expands_back(rows_list: list[int],
                                                                 parts: int) -> None:
    rows = np.asarray(rows_list, dtype=np.int64)
    unique, inverse = unique_rows(rows)
    assert unique.dtype == np.int64 and inverse.shape == rows.shape
    assert np.array_equal(unique[inverse], rows)
    assert np.all(np.diff(unique) > 0) and set(unique.tolist()) == set(rows_list)


class TableClient:
    """Stands in for EmbeddingClient: answers from `table`, records what was asked."""

    def __init__(self, table: Packed) -> None:
        self.table = table
        self.asked: list[npt.NDArray[np.int64]] = []

    async def lookup(self, model: str, version: str, fingerprint: str,
                     queries: list[TableQuery], **kw: Any) -> list[Packed]:
        self.asked = [q.rows for q in queries]
        return [self.table[q.rows] for q in queries]


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.Runner]:
    """One event loop for every example (grpc.aio channels want one at construction)."""
    with asyncio.Runner() as runner:
        yield runner


def test_remote_tables_return_the_same_rows_as_without_dedup(loop: asyncio.Runner) -> None:
    t = table()
    fake = TableClient(t)
    version = cast(LoadedVersion, SimpleNamespace(
        manifest=SimpleNamespace(model="tiny", version="v1", fingerprint=""), seq=0))
    metrics = Metrics()
    remote = loop.run(_closed(lambda: RemoteTables([["127.0.0.1:9"]], 1.0, metrics=metrics)))
    remote.client = fake  # type: ignore[assignment]
    sample = metrics.registry.get_sample_value

    @PROPERTY
    @given(batches)
    def check(rows_lists: list[list[int]]) -> None:
        queries = [TableQuery("unified", NUM_ROWS, 16, np.asarray(r, dtype=np.int64))
                   for r in rows_lists]
        before = [sample(f"ranker_lookup_rows_{k}_total") for k in ("requested", "unique")]
        got = loop.run(remote.lookup(version, queries, 1.0))
        for q, g, sent in zip(queries, got, fake.asked, strict=True):
            assert g.dtype == np.uint8 and np.array_equal(g, t[q.rows])
            assert np.array_equal(sent, np.unique(q.rows))  # each row once, ascending
        after = [sample(f"ranker_lookup_rows_{k}_total") for k in ("requested", "unique")]
        assert after[0] - before[0] == sum(len(r) for r in rows_lists)  # type: ignore[operator]
        assert after[1] - before[1] == sum(len(set(r)) for r in rows_lists)  # type: ignore[operator]

    check()


@PROPERTY
@given(st.lists(st.integers(0, NUM_ROWS - 1), max_size=300), st.integers(1, 5))
def test_ascending_rows_split_into_the_same_parts_as_the_scan(rows_list: list[int],
                                                              shards: int) -> None:
    """The client's slice path for de-duplicated rows agrees with split_rows' positions."""
    unique, _ = unique_rows(np.asarray(rows_list, dtype=np.int64))
    parts = split_query(TableQuery("unified", NUM_ROWS, 16, unique), shards)
    want = split_rows(unique, shard_bounds(NUM_ROWS, shards))
    for part, pos in zip(parts, want, strict=True):
        assert isinstance(part.positions, slice)
        assert np.array_equal(np.arange(unique.size)[part.positions], pos)
        assert np.array_equal(np.frombuffer(part.request.rows, "<i8"), unique[pos])


async def _closed(make: Callable[[], T]) -> T:
    """`make()` inside the loop (grpc.aio channels want one), its channels closed at once:
    these tests only use the code in front of the wire."""
    obj = make()
    await obj.close()  # type: ignore[attr-defined]
    return obj
