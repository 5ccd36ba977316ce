"""Write the next delta of a version: from a training step's float rows, or from packed rows.

The delta is written under `V/deltas/.tmp-<seq>-<random>/`, every file fsynced, the
manifest last, then renamed to `V/deltas/<seq>/` in one step: a reader sees a whole delta
or none, a crash leaves only a temp directory that no reader looks at, and two writers
racing for one seq cannot both win (renaming onto a non-empty directory fails).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from modelpack.delta import (
    DELTA_MANIFEST,
    TMP_PREFIX,
    DeltaError,
    DeltaManifest,
    DeltaTableEntry,
    check_seq,
    data_path,
    delta_dir,
    deltas_dir,
    dense_frozen,
    rows_path,
)
from modelpack.delta_read import check_table_rows, list_seqs, load_delta_manifest
from modelpack.int4 import quantize_rows
from modelpack.manifest import FileEntry, Manifest, read_manifest
from modelpack.schema import SchemaError, check_name

log = logging.getLogger(__name__)

RowsIn = npt.ArrayLike
FloatUpdate = tuple[RowsIn, npt.NDArray[np.floating]]
PackedUpdate = tuple[RowsIn, npt.NDArray[np.uint8]]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(root: Path, rel: str, data: bytes) -> FileEntry:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return FileEntry(rel, len(data), hashlib.sha256(data).hexdigest())


def next_seq(version_dir: Path) -> int:
    """The seq the next delta of V gets: one past the last present."""
    seqs = list_seqs(version_dir)
    return seqs[-1] + 1 if seqs else 1


def _rows_1d(where: str, name: str, rows: RowsIn) -> npt.NDArray[np.int64]:
    r = np.asarray(rows)
    if r.ndim != 1 or (r.size and r.dtype.kind not in "iu"):
        raise DeltaError(f"{where}: table {name!r} rows must be a 1-D integer array, "
                         f"got {r.dtype} of shape {r.shape}")
    if r.dtype.kind == "u" and r.size and int(r.max()) > np.iinfo(np.int64).max:
        raise DeltaError(f"{where}: table {name!r} row {int(r.max())} is outside int64")
    return r.astype(np.int64)


def _prepare(where: str, base: Manifest, name: str, rows: RowsIn, packed: npt.NDArray[np.uint8]
             ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    """One table's update checked against V and sorted by row."""
    try:
        spec = base.table(check_name("table", name))
    except (KeyError, SchemaError) as e:
        raise DeltaError(f"{where}: {e}") from None
    r = _rows_1d(where, name, rows)
    p = np.asarray(packed)
    if p.dtype != np.uint8 or p.ndim != 2 or p.shape != (r.size, spec.row_bytes):
        raise DeltaError(f"{where}: table {name!r} needs packed uint8 rows of shape "
                         f"({r.size}, {spec.row_bytes}), got {p.dtype} {p.shape}")
    order = np.argsort(r, kind="stable")
    r, p = r[order], np.ascontiguousarray(p[order])
    check_table_rows(where, name, spec.rows, r, p)
    return r, p


def write_delta_packed(version_dir: Path | str, updates: Mapping[str, PackedUpdate], *,
                       seq: int | None = None, provenance: dict[str, Any] | None = None
                       ) -> DeltaManifest:
    """Write delta `seq` (default: the next) of V from packed INT4 rows per table.

    Rows may come in any order (they are sorted with their bytes) but each only once;
    tables with no rows are left out. Refuses a seq that exists or is not the next one.
    """
    vdir = Path(version_dir)
    base = read_manifest(vdir)
    want = next_seq(vdir)
    if seq is not None:
        check_seq(seq)
        if seq != want:
            state = "already exists" if seq < want else f"is not the next one (that is {want})"
            raise DeltaError(f"{base.model}/{base.version} delta {seq}: {state}")
    seq = want
    where = f"{base.model}/{base.version} delta {seq}"
    prev = base.fingerprint if seq == 1 else load_delta_manifest(vdir, seq - 1, base).fingerprint
    prepared = {name: _prepare(where, base, name, r, p) for name, (r, p) in sorted(updates.items())}
    prepared = {n: rp for n, rp in prepared.items() if rp[0].size}
    root = deltas_dir(vdir)
    root.mkdir(exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{seq}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files, tables = [], []
        for name, (r, p) in prepared.items():
            files.append(_write_file(tmp, rows_path(name), r.astype("<i8").tobytes()))
            files.append(_write_file(tmp, data_path(name), p.tobytes()))
            tables.append(DeltaTableEntry(name, int(r.size), int(p.shape[1])))
        m = DeltaManifest(model=base.model, version=base.version,
                          base_fingerprint=base.fingerprint, seq=seq, prev_fingerprint=prev,
                          dense=dense_frozen(base), tables=tuple(tables), files=tuple(files),
                          written_at=round(time.time(), 6), provenance=dict(provenance or {}))
        m = DeltaManifest(**{**m.__dict__, "fingerprint": m.compute_fingerprint()})
        _write_file(tmp, DELTA_MANIFEST, m.to_json().encode())
        for d in {(tmp / f.path).parent for f in files}:
            _fsync_dir(d)
        _fsync_dir(tmp)
        try:
            os.rename(tmp, delta_dir(vdir, seq))
        except OSError:
            raise DeltaError(f"{where}: already exists (another writer got there first)") from None
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s: %d rows in %d tables, %s", where, m.num_rows, len(tables), m.fingerprint)
    return m


def write_delta(version_dir: Path | str, updates: Mapping[str, FloatUpdate], *,
                seq: int | None = None, provenance: dict[str, Any] | None = None) -> DeltaManifest:
    """Write the next delta of V from float rows (rows, values (n, dim)) per table.

    Values are quantized with V's own INT4 quantizer (byte-identical to FBGEMM's);
    NaN/Inf values are refused naming the table and row.
    """
    base = read_manifest(Path(version_dir))
    where = f"{base.model}/{base.version} next delta"
    packed: dict[str, PackedUpdate] = {}
    for name, (rows, values) in updates.items():
        r = _rows_1d(where, name, rows)
        v = np.asarray(values)
        try:
            dim = base.table(check_name("table", name)).dim
        except (KeyError, SchemaError) as e:
            raise DeltaError(f"{where}: {e}") from None
        if v.shape != (r.size, dim) or v.dtype.kind != "f":
            raise DeltaError(f"{where}: table {name!r} needs float values of shape "
                             f"({r.size}, {dim}), got {v.dtype} {v.shape}")
        finite = np.isfinite(v).all(axis=1)
        if not finite.all():
            bad = int(r[np.flatnonzero(~finite)[0]])
            raise DeltaError(f"{where}: table {name!r} row {bad} holds NaN or Inf")
        try:
            packed[name] = (r, quantize_rows(v.astype(np.float32, copy=False),
                                             name=f"{where} table {name!r}"))
        except ValueError as e:  # beyond fp16's range: INT4 keeps scale and bias in fp16
            raise DeltaError(str(e)) from None
    return write_delta_packed(version_dir, packed, seq=seq, provenance=provenance)
