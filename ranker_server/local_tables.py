"""`--local-tables`: a version's tables read in-process from the store, no gRPC at all.

Used for the hybrid-tax comparison (same pipeline, lookups without the network hop) and
by users whose tables fit one machine. The tables are opened with the embedding
server's own table store as its one server shard over every file (checksum-verified,
read-only memory maps, torch row gathers), imported lazily so a ranker image without
FBGEMM still starts; there modelpack's TableReader (numpy over the same memory-mapped
files) takes its place.

Reads at delta seq s > 0 are exact, by the reference semantics: deltas 1..s are read and
verified completely (modelpack.delta_read.read_chain), folded per table once per seq, and
laid over the gathered rows with modelpack.delta_read.overlay_rows. A seq is readied
(`open_seq`) before the ranker switches to it, so a bad delta is refused by the admin
call; the last few seqs stay ready for batches still in flight at an older one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from modelpack.delta import DeltaError
from modelpack.delta_read import TableDelta, fold, overlay_rows, read_chain
from modelpack.lookup import Packed, TableQuery
from modelpack.manifest import Manifest, verify
from ranker_server.errors import RankError
from ranker_server.sources import PrepareError
from ranker_server.versions import LoadedVersion

log = logging.getLogger(__name__)
_READY_SEQS = 3  # per version: the newest seq, and older ones batches may still read at


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
        # version -> seq -> table -> its deltas 1..seq folded (oldest readied first)
        self._overlays: dict[str, dict[int, dict[str, TableDelta]]] = {}

    def open_version(self, manifest: Manifest) -> None:
        self._tables[manifest.version] = open_tables(self.store, manifest)

    def close_version(self, version: str) -> None:
        self._tables.pop(version, None)
        self._overlays.pop(version, None)

    def open_seq(self, manifest: Manifest, seq: int) -> None:
        self._overlay(manifest, seq)

    def _overlay(self, manifest: Manifest, seq: int) -> dict[str, TableDelta]:
        """Each table's deltas 1..seq folded ({} at seq 0); DeltaError if one does not verify."""
        if seq == 0:
            return {}
        ready = self._overlays.setdefault(manifest.version, {})
        folded = ready.get(seq)
        if folded is None:
            chain = read_chain(self.store / manifest.model / manifest.version, seq)
            folded = {t.name: fold([d.tables[t.name] for d in chain if t.name in d.tables])
                      for t in manifest.tables}
            ready[seq] = folded
            while len(ready) > _READY_SEQS:
                ready.pop(next(iter(ready)))
        return folded

    async def lookup(self, version: LoadedVersion, queries: Sequence[TableQuery],
                     timeout_s: float, *, seq: int | None = None) -> list[Packed]:
        tables = self._tables[version.version]
        at = version.seq if seq is None else seq

        def read() -> list[Packed]:
            overlay = self._overlay(version.manifest, at)
            return [overlay_rows(rows, q.rows, [overlay[q.table]]) if overlay else rows
                    for q in queries for rows in (tables[q.table].gather(q.rows),)]

        try:  # a worker thread, so the event loop stays free exactly as with remote lookups
            return await asyncio.to_thread(read)
        except DeltaError as e:  # readied before the switch; only a store changed since
            raise RankError(503, "seq_not_applied", f"seq_not_applied: cannot read "
                            f"{version.manifest.model}/{version.version} at delta seq {at}: "
                            f"{e}", retry_after_s=1) from None

    async def prepare(self, manifest: Manifest, *, min_replicas: int | None = None) -> None:
        if manifest.version not in self._tables:
            raise PrepareError(f"{manifest.model}/{manifest.version}: local tables not open")

    async def close(self) -> None:
        self._tables.clear()
