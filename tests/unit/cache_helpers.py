"""Helpers of the row cache tests: an in-memory versioned table and its reference reads."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch

from modelpack.delta_read import TableDelta, overlay_rows
from modelpack.lookup import Packed, TableQuery
from ranker_server.cache_policy import Policy
from ranker_server.cached_tables import CachedTables
from ranker_server.row_cache import RowCache
from ranker_server.versions import LoadedVersion

WIDTH = 6
TABLES = {"a": 40, "b": 13}


class Store:
    """One version's tables and deltas in memory; `read` is the reference (uncached) read."""

    def __init__(self, seed: int, fingerprint: str = "fp1") -> None:
        self.rng = np.random.default_rng(seed)
        self.base = {t: self.rng.integers(0, 256, (n, WIDTH), dtype=np.uint8)
                     for t, n in TABLES.items()}
        self.deltas: list[dict[str, TableDelta]] = []
        self.manifest = SimpleNamespace(model="m", version="v1", fingerprint=fingerprint)

    def add_delta(self, touched: dict[str, Sequence[int]]) -> None:
        d = {}
        for t, rows in touched.items():
            r = np.unique(np.asarray(rows, np.int64))
            if r.size:
                d[t] = TableDelta(r, self.rng.integers(0, 256, (r.size, WIDTH), dtype=np.uint8))
        self.deltas.append(d)

    def read(self, table: str, rows: npt.NDArray[np.int64], seq: int) -> Packed:
        return overlay_rows(self.base[table][rows], rows,
                            [d[table] for d in self.deltas[:seq] if table in d])

    def delta_rows(self, manifest: Any, seq: int) -> dict[str, tuple[int, npt.NDArray[np.int64]]]:
        return {t: (TABLES[t], td.rows) for t, td in self.deltas[seq - 1].items()}

    def version(self, seq: int) -> LoadedVersion:
        tables = {t: SimpleNamespace(row_bytes=WIDTH, rows=n) for t, n in TABLES.items()}
        return cast(LoadedVersion, SimpleNamespace(manifest=self.manifest, seq=seq, tables=tables,
                                                   fingerprint=self.manifest.fingerprint))


class Reference:
    """The uncached source: reads `store` at the seq asked; counts its lookups."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.lookups = 0
        self.rows_asked = 0

    async def lookup(self, version: LoadedVersion, queries: Sequence[TableQuery],
                     timeout_s: float, *, seq: int | None = None) -> list[Packed]:
        self.lookups += 1
        self.rows_asked += sum(q.rows.size for q in queries)
        at = version.seq if seq is None else seq
        return [self.store.read(q.table, q.rows, at) for q in queries]

    async def prepare(self, manifest: Any) -> None:
        return None

    def open_version(self, manifest: Any) -> None:
        return None

    def open_seq(self, manifest: Any, seq: int) -> None:
        return None

    def close_version(self, version: str) -> None:
        return None

    async def close(self) -> None:
        return None


def cached(store: Store, capacity_rows: int, policy: Policy = "tinylfu", device: str = "cpu"
           ) -> tuple[CachedTables, Reference]:
    ref = Reference(store)
    cache = RowCache(capacity_rows * WIDTH, policy, torch.device(device))
    src = CachedTables(ref, cache, store.delta_rows)
    src.open_version(store.manifest)  # type: ignore[arg-type]
    return src, ref


def query(table: str, rows: Sequence[int]) -> TableQuery:
    return TableQuery(table, TABLES[table], 2 * (WIDTH - 4), np.asarray(rows, np.int64))
