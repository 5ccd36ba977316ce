"""`--local-tables`: a version's tables read in-process from the store, no gRPC at all.

Used for the hybrid-tax comparison (same pipeline, lookups without the network hop) and
by users whose tables fit one machine. The tables are opened with the embedding
server's own table store as its one server shard over every file (checksum-verified,
read-only memory maps, torch row gathers), imported lazily so a ranker image without
FBGEMM still starts; there modelpack's TableReader (numpy over the same memory-mapped
files) takes its place.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from modelpack.lookup import Packed, TableQuery
from modelpack.manifest import Manifest, verify
from ranker_server.sources import PrepareError
from ranker_server.versions import LoadedVersion

log = logging.getLogger(__name__)


class _Gather(Protocol):
    def gather(self, rows: npt.NDArray[np.int64]) -> Packed: ...


def open_tables(store: Path, manifest: Manifest) -> dict[str, _Gather]:
    """Every table of a version, verified against its manifest and mapped read-only."""
    try:
        from embedding_server import table_store
    except (ImportError, OSError, RuntimeError) as e:  # FBGEMM absent or not loadable here
        # (a wheel built for another torch fails with OSError/RuntimeError, not ImportError)
        log.info("embedding_server.table_store unavailable (%s): using modelpack TableReader", e)
        from modelpack.scorer import TableReader

        vdir = store / manifest.model / manifest.version
        verify(vdir, only={t.shard_path(k) for t in manifest.tables for k in range(t.num_shards)})
        return {t.name: TableReader(vdir, t) for t in manifest.tables}
    # The whole version as one server shard: it maps every file of every table.
    try:
        loaded = table_store.open_version(
            table_store.plan_version(store, manifest.model, manifest.version, 0, 1))
    except table_store.StoreError as e:
        raise ValueError(str(e)) from None
    if loaded.fingerprint != manifest.fingerprint:
        raise ValueError(f"{manifest.model}/{manifest.version}: tables changed while loading")
    return dict(loaded.tables)


class LocalTables:
    """TableSource over in-process tables; see the module docstring."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self._tables: dict[str, dict[str, _Gather]] = {}

    def open_version(self, manifest: Manifest) -> None:
        self._tables[manifest.version] = open_tables(self.store, manifest)

    def close_version(self, version: str) -> None:
        self._tables.pop(version, None)

    async def lookup(self, version: LoadedVersion, queries: Sequence[TableQuery],
                     timeout_s: float) -> list[Packed]:
        tables = self._tables[version.version]
        # A worker thread, so the event loop stays free exactly as with remote lookups.
        return await asyncio.to_thread(lambda: [tables[q.table].gather(q.rows) for q in queries])

    async def prepare(self, manifest: Manifest) -> None:
        if manifest.version not in self._tables:
            raise PrepareError(f"{manifest.model}/{manifest.version}: local tables not open")

    async def close(self) -> None:
        self._tables.clear()
