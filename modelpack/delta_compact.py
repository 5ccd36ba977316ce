"""Compaction: fold V and its deltas 1..s into a new full version that rolls out normally.

The new version is written by modelpack's VersionWriter (temp dir, fingerprinted
manifest, rename), with V's schema, table specs and dense spec, V's dense file copied
byte for byte (the deltas were trained against it), and provenance naming V, its
fingerprint and the last folded delta's. Afterwards every row of the new version is
compared with V's rows overlaid by deltas 1..s (delta_read.overlay_rows, the serving
reference), so what rolls out is exactly what a read at (V, s) returned.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from modelpack.delta import DeltaError, check_seq
from modelpack.delta_read import Delta, TableDelta, fold, overlay_rows, read_chain
from modelpack.hashing import shard_range
from modelpack.manifest import Manifest, read_manifest, verify
from modelpack.schema import TableSpec, check_name
from modelpack.scorer import TableReader
from modelpack.writer import VersionWriter

log = logging.getLogger(__name__)

BLOCK_ROWS = 1 << 16
# V's files that describe V's own tables and must not be claimed by the compacted version.
DEFAULT_DROP = ("metrics.json",)


def _blocks(vdir: Path, spec: TableSpec) -> list[tuple[int, int, npt.NDArray[np.uint8]]]:
    """(start, stop, V's packed rows) per block of at most BLOCK_ROWS rows, in row order.

    The arrays are views of read-only maps: nothing is read until a block is used.
    """
    maps = TableReader(vdir, spec).maps
    out = []
    for k in range(spec.num_shards):
        lo, hi = shard_range(k, spec.rows, spec.num_shards)
        for b in range(lo, hi, BLOCK_ROWS):
            e = min(hi, b + BLOCK_ROWS)
            out.append((b, e, maps[k][b - lo:e - lo]))
    return out


def _table_deltas(chain: Sequence[Delta], name: str) -> list[TableDelta]:
    return [d.tables[name] for d in chain if name in d.tables]


def compact(version_dir: Path | str, upto: int, new_version: str, *,
            drop: Sequence[str] = DEFAULT_DROP, extra_files: Mapping[str, bytes] | None = None,
            progress: bool = False) -> Manifest:
    """Write `new_version` beside V = `version_dir`: V's rows with deltas 1..upto applied.

    V's files are verified first and the chain 1..upto too (DeltaError names what is
    wrong); V's extra files are carried over except those in `drop`; `extra_files` adds
    or replaces some. Returns the new version's manifest after checking every row.
    """
    vdir = Path(version_dir)
    check_seq(upto, "upto")
    base = verify(vdir)
    check_name("version", new_version)
    if new_version == base.version:
        raise DeltaError(f"compaction of {base.model}/{base.version} needs a new version name")
    if vdir.parent.name != base.model:
        raise DeltaError(f"{vdir} is not inside a directory named after its model {base.model!r}")
    chain = read_chain(vdir, upto)
    last = chain[-1].manifest
    provenance = {"compacted_from": {"version": base.version, "fingerprint": base.fingerprint,
                                     "upto_seq": upto, "delta_fingerprint": last.fingerprint},
                  "base_provenance": base.provenance}
    skip = {t.shard_path(k) for t in base.tables for k in range(t.num_shards)}
    skip |= {base.dense.path, *drop, *(extra_files or {})}
    w = VersionWriter(vdir.parent.parent, base.model, new_version, base.schema,
                             list(base.tables), base.dense, provenance=provenance,
                             progress=progress)
    with w:
        for spec in base.tables:
            merged = fold(_table_deltas(chain, spec.name))
            for b, e, view in _blocks(vdir, spec):
                block = np.array(view)
                lo, hi = np.searchsorted(merged.rows, [b, e])
                if hi > lo:
                    block[merged.rows[lo:hi] - b] = merged.packed[lo:hi]
                w.write_table_packed(spec.name, block)
        shutil.copyfile(vdir / base.dense.path, w.path / base.dense.path)
        for f in base.files:
            if f.path not in skip:
                w.add_file(f.path, (vdir / f.path).read_bytes())
        for rel, data in (extra_files or {}).items():
            w.add_file(rel, data)
    assert w.manifest is not None
    try:
        m = check_compaction(vdir.parent / new_version, vdir, upto, chain=chain)
    except DeltaError:  # never leave a version that is not what it claims to be
        shutil.rmtree(vdir.parent / new_version, ignore_errors=True)
        raise
    log.info("compacted %s/%s + deltas 1..%d into %s %s", base.model, base.version, upto,
             new_version, m.fingerprint)
    return m


def check_compaction(new_dir: Path | str, version_dir: Path | str, upto: int, *,
                     chain: Sequence[Delta] | None = None) -> Manifest:
    """Check `new_dir` is V + deltas 1..upto exactly: its own files, dense, every row."""
    vdir = Path(version_dir)
    base = read_manifest(vdir)
    new = verify(Path(new_dir))
    chain = read_chain(vdir, upto) if chain is None else chain
    name = f"compaction {new.model}/{new.version} of {base.model}/{base.version} + deltas 1..{upto}"
    if (new.schema, new.tables, new.dense) != (base.schema, base.tables, base.dense):
        raise DeltaError(f"{name}: schema, tables or dense spec differ from {base.version}'s")
    if new.file(new.dense.path).sha256 != base.file(base.dense.path).sha256:
        raise DeltaError(f"{name}: dense weights differ from {base.version}'s (they are frozen)")
    for spec in base.tables:
        merged = [fold(_table_deltas(chain, spec.name))]  # folded once, not once per block
        for (b, e, want), (_, _, got) in zip(_blocks(vdir, spec), _blocks(Path(new_dir), spec),
                                             strict=True):
            expect = overlay_rows(np.asarray(want), np.arange(b, e, dtype=np.int64), merged)
            if not np.array_equal(np.asarray(got), expect):
                bad = b + int(np.flatnonzero((np.asarray(got) != expect).any(axis=1))[0])
                raise DeltaError(f"{name}: table {spec.name!r} row {bad} differs from the overlay")
    return new
