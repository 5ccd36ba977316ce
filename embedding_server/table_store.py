"""One version's tables for one shard: planned, checksum-verified, memory-mapped read-only.

A server shard k of S serves global rows [k*R/S, (k+1)*R/S) of each table (the same
math as modelpack.hashing.shard_range). The table's files may be split differently
(`num_shards` in the manifest): each file holding some of this shard's rows is mapped
from the page that holds the first of them, one slice per file (see served_table.py for
how a range over several files is served). Mappings are PROT_READ + MAP_SHARED:
the page cache is shared with every process mapping the file, nothing is copied into
anonymous memory, and a stray write faults instead of silently forking a page.
Nothing is ever unmapped explicitly: a mapping lives as long as a tensor references
it, so a lookup still running on an unloaded version cannot touch freed memory.
"""

from __future__ import annotations

import logging
import mmap
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embedding_server.fbgemm_tbe import Int4Kernel
from embedding_server.served_table import Segment, ServedTable
from modelpack.hashing import shard_range
from modelpack.manifest import Manifest, read_manifest, verify
from modelpack.schema import TableSpec, check_name

log = logging.getLogger(__name__)


class StoreError(Exception):
    """A version that cannot be served by this shard; `kind` picks the status code."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "not_found" | "invalid" | "corrupt"


@dataclass(frozen=True)
class TableSlice:
    """Where some of this shard's rows of one table live: file, byte offset, global row range."""

    spec: TableSpec
    file: int  # file shard index
    path: str  # relative to the version directory
    start: int  # first global row served
    stop: int  # one past the last
    file_row: int  # global row of the file's first row

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def nbytes(self) -> int:
        return self.rows * self.spec.row_bytes


@dataclass(frozen=True)
class VersionPlan:
    """What loading a version on this shard would map, before anything is read."""

    model: str
    version: str
    directory: Path
    manifest: Manifest
    slices: tuple[TableSlice, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slices)


@dataclass
class LoadedVersion:
    """A verified, mapped version: what lookups read."""

    model: str
    version: str
    fingerprint: str
    tables: dict[str, ServedTable]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tables.values())


def plan_version(store: Path, model: str, version: str, shard: int, num_shards: int) -> VersionPlan:
    """Read the manifest (no hashing) and work out this shard's slice of every table."""
    try:
        check_name("model", model)
        check_name("version", version)
    except ValueError as e:
        raise StoreError("invalid", str(e)) from None
    vdir = store / model / version
    if not vdir.is_dir():
        raise StoreError("not_found", f"{model}/{version}: no such version in store {store}")
    try:
        manifest = read_manifest(vdir)
    except ValueError as e:  # SchemaError and VerifyError (fingerprint) both
        raise StoreError("corrupt", f"{model}/{version}: bad manifest: {e}") from None
    if (manifest.model, manifest.version) != (model, version):
        raise StoreError("invalid", f"{vdir}: manifest names {manifest.model}/{manifest.version}")
    slices = []
    for spec in manifest.tables:
        if spec.rows < num_shards:
            raise StoreError("invalid", f"{model}/{version}: table {spec.name!r} has {spec.rows} "
                             f"rows, fewer than the {num_shards} server shards")
        start, stop = shard_range(shard, spec.rows, num_shards)
        for k in range(spec.num_shards):
            f_start, f_stop = shard_range(k, spec.rows, spec.num_shards)
            if max(start, f_start) < min(stop, f_stop):
                slices.append(TableSlice(spec, k, spec.shard_path(k), max(start, f_start),
                                         min(stop, f_stop), f_start))
    return VersionPlan(model, version, vdir, manifest, tuple(slices))


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _map_slice(fd: int, sl: TableSlice) -> torch.Tensor:
    """A read-only uint8 (rows, row_bytes) tensor over the slice's bytes of an open file."""
    offset = (sl.start - sl.file_row) * sl.spec.row_bytes
    aligned = offset - offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets must be page-aligned
    # Default advice on purpose: MADV_RANDOM would also turn off fault-around, so every
    # first touch of a (cached, just verified) page would cost its own fault.
    mm = mmap.mmap(fd, offset - aligned + sl.nbytes, prot=mmap.PROT_READ, offset=aligned)
    arr = np.frombuffer(mm, dtype=np.uint8, count=sl.nbytes, offset=offset - aligned)
    with warnings.catch_warnings():
        # torch warns that a tensor over read-only memory is not writable: that is the point.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr).view(sl.rows, sl.spec.row_bytes)


def open_version(plan: VersionPlan, *, verify_threads: int = 4) -> LoadedVersion:
    """Verify the checksums of this shard's files and the manifest, then map them.

    Files are opened before hashing and checked afterwards to be the very files hashed
    (same inode, size and mtime), so a version directory swapped during the load cannot
    slip unverified bytes under a verified fingerprint.
    """
    paths = sorted({s.path for s in plan.slices})
    fds: dict[str, int] = {}
    try:
        for rel in paths:
            try:
                fds[rel] = os.open(plan.directory / rel, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise StoreError("corrupt", f"{plan.model}/{plan.version}: cannot open {rel}: {e}") from None
        try:
            manifest = verify(plan.directory, only=set(paths), threads=verify_threads)
        except ValueError as e:
            raise StoreError("corrupt", str(e)) from None
        if manifest.fingerprint != plan.manifest.fingerprint:
            raise StoreError("corrupt", f"{plan.model}/{plan.version}: manifest changed during the load")
        for rel, fd in fds.items():
            if _identity(os.fstat(fd)) != _identity(os.stat(plan.directory / rel)):
                raise StoreError("corrupt",
                                 f"{plan.model}/{plan.version}: {rel} was replaced during the load")
        segments: dict[str, list[Segment]] = {}
        for sl in plan.slices:  # in table order, then file order
            w = _map_slice(fds[sl.path], sl)
            segments.setdefault(sl.spec.name, []).append(
                Segment(sl.file, sl.start, w, Int4Kernel(sl.spec.name, sl.rows, sl.spec.dim, w)))
        tables = {name: ServedTable(plan.manifest.table(name), segs[0].start, segs[-1].stop,
                                    tuple(segs)) for name, segs in segments.items()}
    finally:
        for fd in fds.values():
            os.close(fd)  # the mappings keep the files referenced
    log.info("mapped %s/%s: %d tables, %d bytes", plan.model, plan.version, len(tables), plan.nbytes)
    return LoadedVersion(plan.model, plan.version, manifest.fingerprint, tables)
