"""CachedTables: a TableSource in front of any other, serving hot rows from the RowCache.

A batch's rows are de-duplicated per table; the cache answers what it holds valid at the
batch's (version, seq) and only the misses go to the wrapped source, in one lookup (none
when every row hit: no RPC at all). Hits and misses are assembled, and expanded back to
the batch's order, with torch ops on the cache's device: on CUDA the answers stay there
(the pipeline stages them without another copy), on the CPU they are returned as numpy
views. Misses are then offered to the cache, tagged with the seq they were read at.

Exactness across deltas: `open_seq` (run before the ranker switches a version's seq)
reads the row lists of the deltas the cache has not learned yet, in order, verified
(store_delta_rows: the rows files only), and the cache frees the entries they touch;
reads at a seq not learned bypass the cache. `close_version` drops a retired version's entries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from modelpack.delta import DeltaError, delta_dir, rows_path
from modelpack.delta_read import check_table_rows, load_delta_manifest, read_checked_file
from modelpack.lookup import TableQuery, unique_rows
from modelpack.manifest import Manifest
from ranker_server.cache_touches import Rows
from ranker_server.row_cache import RowCache
from ranker_server.sources import Answer, TableSource
from ranker_server.versions import LoadedVersion

log = logging.getLogger(__name__)


DeltaRows = Callable[[Manifest, int], dict[str, tuple[int, Rows]]]


def store_delta_rows(store: Path) -> DeltaRows:
    """Delta seq's touched rows per table, {table: (table rows, sorted rows)}, from
    STORE/model/version/deltas/<seq>/: its manifest checked against this build and seq,
    each rows file against the manifest's size and sha256, the rows inside the table,
    ascending and unique. Only the rows files are read (8 bytes a row), never the packed
    data: the shards apply that. The chain link was checked by the caller (deltas.py)."""
    def read(manifest: Manifest, seq: int) -> dict[str, tuple[int, Rows]]:
        vdir = store / manifest.model / manifest.version
        m = load_delta_manifest(vdir, seq, manifest)
        out = {}
        for t in m.tables:
            raw = read_checked_file(delta_dir(vdir, seq), m, rows_path(t.name))
            rows = np.frombuffer(raw, dtype="<i8").astype(np.int64)
            num_rows = manifest.table(t.name).rows
            if rows.size != t.rows:
                raise DeltaError(f"{m.name}: table {t.name!r} lists {rows.size} rows, its "
                                 f"manifest says {t.rows}")
            # No packed rows read: an empty (0, 4) block passes the scale/bias check.
            check_table_rows(m.name, t.name, num_rows, rows, np.empty((0, 4), np.uint8))
            out[t.name] = (num_rows, rows)
        return out
    return read


class CachedTables:
    """TableSource: `inner` behind a RowCache; see the module docstring."""

    def __init__(self, inner: TableSource, cache: RowCache, delta_rows: DeltaRows) -> None:
        self.inner = inner
        self.cache = cache
        self.delta_rows = delta_rows
        self._fingerprints: dict[str, str] = {}  # open version -> its fingerprint

    async def lookup(self, version: LoadedVersion, queries: Sequence[TableQuery],
                     timeout_s: float, *, seq: int | None = None) -> Sequence[Answer]:
        at = version.seq if seq is None else seq
        if any(q.pooling != "none" or q.output != "int4" for q in queries):
            return await self.inner.lookup(version, queries, timeout_s, seq=at)
        fp, cache, dev = version.fingerprint, self.cache, self.cache.device
        parts = []
        misses: list[TableQuery] = []
        asked: list[int] = []  # the query each miss query stands for
        for i, q in enumerate(queries):
            unique, inverse = unique_rows(q.rows)
            width = version.tables[q.table].row_bytes
            counts = np.bincount(inverse, minlength=unique.size).astype(np.int64)
            hit, hits = cache.read(fp, q.table, q.num_rows, unique, at, counts, width)
            missing = unique[~hit]
            if missing.size:
                misses.append(TableQuery(q.table, q.num_rows, q.dim, missing, None, "none",
                                         "int4"))
                asked.append(i)
            parts.append((q, unique, inverse, hit, hits, width))
        answers: dict[int, torch.Tensor] = {}
        if misses:
            got = await self.inner.lookup(version, misses, timeout_s, seq=at)
            for i, a in zip(asked, got, strict=True):
                answers[i] = torch.as_tensor(a, device=dev)
        else:
            cache.skipped_lookup(fp)
        out: list[Answer] = []
        for i, (q, unique, inverse, hit, hits, width) in enumerate(parts):
            missed = answers.get(i)
            if missed is not None and missed.shape != (int((~hit).sum()), width):
                raise ValueError(f"table {q.table}: answer shaped {tuple(missed.shape)} for "
                                 f"{int((~hit).sum())} rows of {width} bytes")
            rows = _assemble(unique.size, width, hit, hits, missed, dev)
            if missed is not None:
                cache.admit(fp, q.table, q.num_rows, unique[~hit], missed, at)
            full = rows.index_select(0, torch.from_numpy(inverse.astype(np.int64)).to(dev))
            out.append(full.numpy() if dev.type == "cpu" else full)
        return out

    async def prepare(self, manifest: Manifest, *, min_replicas: int | None = None) -> None:
        await self.inner.prepare(manifest, min_replicas=min_replicas)

    def open_version(self, manifest: Manifest) -> None:
        self.inner.open_version(manifest)
        self._fingerprints[manifest.version] = manifest.fingerprint
        self.cache.open(manifest.fingerprint, manifest.version)

    def open_seq(self, manifest: Manifest, seq: int) -> None:
        """The wrapped source's readiness first, then the deltas the cache lacks, in order."""
        self.inner.open_seq(manifest, seq)
        fp = manifest.fingerprint
        learned = self.cache.learned(fp)  # -1: not open in the cache, nothing to learn
        for k in range(learned + 1, seq + 1 if learned >= 0 else 0):
            freed = self.cache.learn(fp, k, self.delta_rows(manifest, k))
            log.info("row cache: %s/%s delta %d learned, %d entries invalidated",
                     manifest.model, manifest.version, k, freed)

    def close_version(self, version: str) -> None:
        self.inner.close_version(version)
        fp = self._fingerprints.pop(version, None)
        if fp is not None:
            log.info("row cache: %s retired, %d entries dropped", version, self.cache.drop(fp))

    async def close(self) -> None:
        await self.inner.close()


def _assemble(n: int, width: int, hit: npt.NDArray[np.bool_], hits: torch.Tensor | None,
              missed: torch.Tensor | None, dev: torch.device) -> torch.Tensor:
    """The unique rows in order: hits from the cache, misses from the wire."""
    rows = torch.empty((n, width), dtype=torch.uint8, device=dev)
    # index_copy_, not `rows[idx] = ...`: index_put_ on uint8 is ~50x slower on the CPU.
    if hits is not None:
        rows.index_copy_(0, torch.from_numpy(np.flatnonzero(hit)).to(dev), hits)
    if missed is not None:
        rows.index_copy_(0, torch.from_numpy(np.flatnonzero(~hit)).to(dev), missed)
    return rows

