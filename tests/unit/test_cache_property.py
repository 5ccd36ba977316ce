"""The row cache is exact: against random delta streams, advances, reverts, reads at old
seqs and retired versions, every cached read equals the uncached read bit for bit."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ranker_server.cache_policy import POLICIES, Policy
from tests.unit.cache_helpers import TABLES, Store, cached, query

# Fixed seed, and no local example database that could make CI's run differ from the last.
PROPERTY = settings(deadline=None, database=None, derandomize=True, max_examples=200,
                    suppress_health_check=[HealthCheck.too_slow])

rows_of = {t: st.lists(st.integers(0, n - 1), max_size=12) for t, n in TABLES.items()}
ops = st.lists(st.one_of(
    st.tuples(st.just("delta"), rows_of["a"], rows_of["b"]),
    st.tuples(st.just("open"), st.integers(0, 8)),  # the ranker moves to a seq (or reverts)
    st.tuples(st.just("read"), st.integers(0, 8), rows_of["a"], rows_of["b"]),
    st.tuples(st.just("retire")),  # the version unloaded and loaded again
), max_size=40)


@PROPERTY
@given(ops, st.sampled_from(POLICIES), st.integers(1, 30), st.integers(0, 2**16))
# A revert below an entry's seq, then a read at the old seq (an entry read at seq 2 of a
# row delta 2 touched must not answer seq 1).
@example([("delta", [], []), ("delta", [3], []), ("open", 2), ("read", 2, [3], []),
          ("read", 1, [3], []), ("open", 1), ("read", 1, [3], [])], "lru", 5, 0)
# An entry read at an old seq after an advance (its interval ends before the newer delta).
@example([("delta", [1], []), ("open", 1), ("delta", [1], []), ("open", 2),
          ("read", 1, [1], []), ("read", 2, [1], []), ("read", 1, [1], [])], "tinylfu", 4, 1)
# A read at a seq not learned yet bypasses the cache, even after a retire.
@example([("delta", [0], [0]), ("read", 1, [0], [0]), ("retire",), ("read", 1, [0], [0]),
          ("open", 1), ("read", 1, [0, 0], [0]), ("read", 0, [0], [0])], "lru", 2, 2)
def test_cached_reads_equal_uncached_reads(steps: list[tuple[Any, ...]], policy: Policy,
                                           capacity: int, seed: int) -> None:
    store = Store(seed)
    src, ref = cached(store, capacity, policy)
    opened = 0  # the highest seq the ranker moved to (the cache learned 1..opened)
    for op in steps:
        if op[0] == "delta":
            store.add_delta({"a": op[1], "b": op[2]})
        elif op[0] == "open":
            seq = min(op[1], len(store.deltas))
            src.open_seq(store.manifest, seq)  # type: ignore[arg-type]
            opened = max(opened, seq)
        elif op[0] == "retire":
            src.close_version("v1")
            src.open_version(store.manifest)  # type: ignore[arg-type]
            opened = 0
        else:
            seq = min(op[1], len(store.deltas))  # any written seq, opened or not
            queries = [query("a", op[2]), query("b", op[3])]
            before = ref.lookups
            got = asyncio.run(src.lookup(store.version(seq), queries, 1.0))
            for q, g in zip(queries, got, strict=True):
                want = store.read(q.table, q.rows, seq)
                assert isinstance(g, np.ndarray) and g.dtype == np.uint8
                assert np.array_equal(g, want), (q.table, q.rows, seq)
            stats = src.cache.stats()
            assert stats["entries"] * stats["row_bytes"] <= capacity * 6
            if ref.lookups == before:  # no RPC: every row was a valid hit
                assert seq <= opened
    assert src.cache.stats()["entries"] <= capacity
