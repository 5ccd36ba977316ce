"""Verify and read a version's deltas, and what a read at (V, s) returns.

Every check names the delta (`model/version delta seq`) and what is wrong: another
version's or another build's delta, a broken or out-of-order chain, a gap, a flipped byte,
rows outside the table or not sorted and unique, a non-finite fp16 scale or bias, a wrong
row width, a missing file. Nothing is returned from a delta that failed any of them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from modelpack.delta import (
    DELTA_MANIFEST,
    DeltaError,
    DeltaManifest,
    check_seq,
    data_path,
    delta_dir,
    deltas_dir,
    dense_frozen,
    parse_delta_manifest,
    rows_path,
)
from modelpack.int4 import QPARAM_BYTES
from modelpack.lookup import Packed
from modelpack.manifest import Manifest, read_manifest

Rows = npt.NDArray[np.int64]


@dataclass(frozen=True)
class TableDelta:
    """One table's replaced rows: sorted unique global rows and their packed INT4 rows."""

    rows: Rows
    packed: Packed

    @property
    def nbytes(self) -> int:
        """Memory of the rows and their bytes (what an overlay of it costs, before indexing)."""
        return int(self.rows.nbytes + self.packed.nbytes)

    def within(self, lo: int, hi: int) -> TableDelta:
        """The part replacing global rows [lo, hi): what the shard owning that range applies."""
        a, b = np.searchsorted(self.rows, [lo, hi])
        return TableDelta(self.rows[a:b], self.packed[a:b])


@dataclass(frozen=True)
class Delta:
    """A verified delta: its manifest and its rows per table."""

    manifest: DeltaManifest
    tables: dict[str, TableDelta]


def list_seqs(version_dir: Path) -> list[int]:
    """The seqs present under `V/deltas/`, ascending (temp dirs and other names ignored)."""
    d = deltas_dir(version_dir)
    if not d.is_dir():
        return []
    seqs = [int(p.name) for p in d.iterdir()
            if p.name.isdigit() and p.name == str(int(p.name)) and int(p.name) >= 1]
    return sorted(seqs)


def _where(base: Manifest, seq: int) -> str:
    return f"{base.model}/{base.version} delta {seq}"


def load_delta_manifest(version_dir: Path, seq: int, base: Manifest | None = None) -> DeltaManifest:
    """Parse delta `seq`'s manifest and check it belongs to this build of V at this seq.

    Checks everything the manifest alone can say (not the chain link, not the files).
    """
    check_seq(seq)
    base = base if base is not None else read_manifest(Path(version_dir))
    where = _where(base, seq)
    path = delta_dir(version_dir, seq) / DELTA_MANIFEST
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        missing = "directory" if not path.parent.is_dir() else "manifest.json"
        raise DeltaError(f"{where}: {missing} is missing ({path})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DeltaError(f"{where}: manifest is not valid JSON: {e}") from None
    except OSError as e:  # e.g. `deltas/<seq>` is a file, or unreadable
        raise DeltaError(f"{where}: cannot read its manifest: {e}") from None
    m = parse_delta_manifest(raw, where)
    if (m.model, m.version) != (base.model, base.version):
        raise DeltaError(f"{where}: belongs to {m.model}/{m.version}, not {base.model}/{base.version}")
    if m.base_fingerprint != base.fingerprint:
        raise DeltaError(f"{where}: was written for build {m.base_fingerprint} of {m.model}/"
                         f"{m.version}, this directory holds build {base.fingerprint}")
    if m.seq != seq:
        raise DeltaError(f"{where}: its manifest says seq {m.seq} (out of order: moved or copied)")
    if m.dense != dense_frozen(base):
        raise DeltaError(f"{where}: does not declare the dense weights frozen at {base.version} "
                         f"({m.dense} != {dense_frozen(base)}); a dense change is a new version")
    for t in m.tables:
        try:
            spec = base.table(t.name)
        except KeyError:
            raise DeltaError(f"{where}: {base.version} has no table {t.name!r}") from None
        if t.row_bytes != spec.row_bytes:
            raise DeltaError(f"{where}: table {t.name!r} rows are {t.row_bytes} bytes wide, "
                             f"{base.version}'s are {spec.row_bytes} (INT4 dim {spec.dim})")
        if t.rows > spec.rows:
            raise DeltaError(f"{where}: table {t.name!r} replaces {t.rows} rows, "
                             f"the table has {spec.rows}")
    return m


def _prev_link(version_dir: Path, base: Manifest, seq: int) -> str:
    """The fingerprint delta `seq` must name as its predecessor."""
    if seq == 1:
        return base.fingerprint
    if not delta_dir(version_dir, seq - 1).exists():
        raise DeltaError(f"{_where(base, seq)}: delta {seq - 1} is missing (a gap in the chain)")
    return load_delta_manifest(version_dir, seq - 1, base).fingerprint


def read_checked_file(ddir: Path, m: DeltaManifest, rel: str) -> bytes:
    """A file of delta `m` (in `ddir`), its size and sha256 checked against the manifest."""
    entry = m.file(rel)
    path = ddir / rel
    try:
        size = path.stat().st_size  # before reading: a huge stray file is refused unread
        if size == entry.bytes:
            data = path.read_bytes()
    except FileNotFoundError:
        raise DeltaError(f"{m.name}: file {rel} is missing") from None
    except OSError as e:
        raise DeltaError(f"{m.name}: file {rel} cannot be read: {e}") from None
    if size != entry.bytes or len(data) != entry.bytes:
        raise DeltaError(f"{m.name}: file {rel} has {size} bytes, manifest says {entry.bytes}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise DeltaError(f"{m.name}: file {rel} sha256 {digest} != manifest {entry.sha256} (corrupt)")
    return data


def check_table_rows(where: str, table: str, num_rows: int, rows: Rows, packed: Packed) -> None:
    """Rows inside [0, num_rows), strictly ascending; every scale and bias a finite fp16."""
    if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= num_rows):
        bad = int(rows[(rows < 0) | (rows >= num_rows)][0])
        raise DeltaError(f"{where}: table {table!r} row {bad} is outside the table's "
                         f"{num_rows} rows")
    steps = np.diff(rows)
    if (steps <= 0).any():
        i = int(np.flatnonzero(steps <= 0)[0])
        what = "duplicated" if steps[i] == 0 else "not sorted"
        raise DeltaError(f"{where}: table {table!r} rows are {what} (row {int(rows[i + 1])} "
                         f"after {int(rows[i])}); a delta lists each row once, ascending")
    qparams = np.ascontiguousarray(packed[:, :QPARAM_BYTES]).view(np.float16)
    finite = np.isfinite(qparams).all(axis=1)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise DeltaError(f"{where}: table {table!r} row {int(rows[i])} has a NaN or Inf "
                         "fp16 scale/bias")


def read_delta(version_dir: Path | str, seq: int, *, base: Manifest | None = None,
               prev_fingerprint: str | None = None) -> Delta:
    """Verify delta `seq` of V completely and return its rows.

    `prev_fingerprint`, when the caller already verified delta seq - 1, saves re-reading
    its manifest; otherwise the link is checked against delta seq - 1's manifest on disk.
    """
    vdir = Path(version_dir)
    base = base if base is not None else read_manifest(vdir)
    m = load_delta_manifest(vdir, seq, base)
    want_prev = prev_fingerprint if prev_fingerprint is not None else _prev_link(vdir, base, seq)
    if m.prev_fingerprint != want_prev:
        raise DeltaError(f"{m.name}: follows {m.prev_fingerprint}, but delta {seq - 1}'s "
                         f"fingerprint is {want_prev} (out of order or another chain)"
                         if seq > 1 else
                         f"{m.name}: follows {m.prev_fingerprint}, but the chain starts at "
                         f"{base.version}'s fingerprint {want_prev}")
    ddir = delta_dir(vdir, seq)
    tables: dict[str, TableDelta] = {}
    for t in m.tables:
        rows = np.frombuffer(read_checked_file(ddir, m, rows_path(t.name)), dtype="<i8").astype(np.int64)
        packed = np.frombuffer(read_checked_file(ddir, m, data_path(t.name)), dtype=np.uint8)
        packed = packed.reshape(t.rows, t.row_bytes)
        check_table_rows(m.name, t.name, base.table(t.name).rows, rows, packed)
        tables[t.name] = TableDelta(rows, packed)
    return Delta(m, tables)


def verify_delta(version_dir: Path | str, seq: int) -> DeltaManifest:
    """Verify delta `seq` (manifest, chain link, every byte, every row); DeltaError if not."""
    return read_delta(version_dir, seq).manifest


def _walk(vdir: Path, base: Manifest, last: int) -> Iterator[Delta]:
    """Deltas 1..last verified in order, each against the one before."""
    prev = base.fingerprint
    for seq in range(1, last + 1):
        if not delta_dir(vdir, seq).exists():
            gap = f"a gap in the chain before delta {seq + 1}" if seq < last else "not written"
            raise DeltaError(f"{_where(base, seq)}: is missing ({gap})")
        d = read_delta(vdir, seq, base=base, prev_fingerprint=prev)
        prev = d.manifest.fingerprint
        yield d


def read_chain(version_dir: Path | str, upto: int | None = None) -> list[Delta]:
    """Verify and read deltas 1..upto in order (upto None: every delta present)."""
    vdir = Path(version_dir)
    base = read_manifest(vdir)
    if upto is not None and upto != 0:
        check_seq(upto, "upto")  # 0 is V itself: an empty chain
    last = (list_seqs(vdir) or [0])[-1] if upto is None else upto
    return list(_walk(vdir, base, last))


def verify_chain(version_dir: Path | str, upto: int | None = None) -> list[DeltaManifest]:
    """Verify deltas 1..upto in order; returns their manifests."""
    return [d.manifest for d in read_chain(version_dir, upto)]


def good_prefix(version_dir: Path | str) -> tuple[list[DeltaManifest], DeltaError | None]:
    """The longest chain 1..k that verifies, and why delta k + 1 does not (None: all do).

    Where a stream pauses: at the last good seq, with the refusal to show for the next.
    """
    vdir = Path(version_dir)
    good: list[DeltaManifest] = []
    try:
        for d in _walk(vdir, read_manifest(vdir), (list_seqs(vdir) or [0])[-1]):
            good.append(d.manifest)
    except DeltaError as e:
        return good, e
    return good, None


def fold(deltas: Sequence[TableDelta]) -> TableDelta:
    """One table's deltas applied in order as a single delta: each row's latest bytes."""
    if not deltas:
        return TableDelta(np.empty(0, np.int64), np.empty((0, 0), np.uint8))
    if len(deltas) == 1:
        return deltas[0]
    rows = np.concatenate([d.rows for d in deltas])[::-1]
    packed = np.concatenate([d.packed for d in deltas])[::-1]
    # np.unique keeps the first occurrence: on the reversed stream, the latest delta's bytes.
    uniq, first = np.unique(rows, return_index=True)
    return TableDelta(uniq.astype(np.int64), np.ascontiguousarray(packed[first]))


def overlay_rows(base_packed: Packed, global_rows: Rows, deltas: Sequence[TableDelta]) -> Packed:
    """What a read of `global_rows` at (V, s) returns, given V's rows for them.

    `base_packed[i]` is V's row `global_rows[i]`; `deltas` are one table's parts of deltas
    1..s in order. Rows may repeat and come in any order; the input is not modified.
    """
    out = np.array(base_packed, dtype=np.uint8, copy=True)
    merged = fold(deltas)
    if merged.rows.size == 0 or out.shape[0] == 0:
        return out
    if merged.packed.shape[1] != out.shape[1]:
        raise ValueError(f"delta rows are {merged.packed.shape[1]} bytes, base rows {out.shape[1]}")
    rows = np.asarray(global_rows, dtype=np.int64)
    idx = np.searchsorted(merged.rows, rows)
    idx_c = np.minimum(idx, merged.rows.size - 1)
    hit = merged.rows[idx_c] == rows
    out[hit] = merged.packed[idx_c[hit]]
    return out
