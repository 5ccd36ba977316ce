"""Versioned delta updates: the on-disk format of one delta and its manifest.

A delta belongs to exactly one build of one version V and lives in `V/deltas/<seq>/`
(seq = 1, 2, ...). It replaces some rows of V's tables with rows trained further against
V's own, frozen dense weights, so (V's dense, V's rows + deltas 1..s) is a pair that was
trained together. Its manifest names V's fingerprint, the previous link of the hash chain
(delta seq - 1's fingerprint, or V's own for seq 1), the dense file it was trained against,
and per table the sorted unique global rows it replaces (int64 little-endian) and their new
INT4 rows in the FBGEMM TBE layout of V's tables, with every file's size and sha256. The
delta's fingerprint is sha256 over its manifest's canonical JSON, like a version's.

This module only describes, parses and validates; delta_write, delta_read and
delta_compact write, verify/read and fold deltas.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modelpack.manifest import FileEntry, Manifest
from modelpack.schema import SchemaError, check_name

DELTA_FORMAT = "modelpack-delta"
DELTA_FORMAT_VERSION = 1
DELTAS_DIR = "deltas"
DELTA_MANIFEST = "manifest.json"
DENSE_FROZEN = "frozen"
TMP_PREFIX = ".tmp-"  # in-progress writes beside the final directories; never a delta
ROW_ID_BYTES = 8  # int64 little-endian per replaced row
_MAX_SEQ = 10**12  # far beyond any stream; keeps a seq a short, plain path component


class DeltaError(ValueError):
    """A delta that must not be applied: the message names the delta and what is wrong."""


def check_seq(seq: object, what: str = "delta seq") -> int:
    """A sequence number from outside: a positive int (not a bool, not a string)."""
    if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= _MAX_SEQ:
        raise DeltaError(f"{what} must be an integer in [1, {_MAX_SEQ}], got {seq!r}")
    return seq


def deltas_dir(version_dir: Path) -> Path:
    return Path(version_dir) / DELTAS_DIR


def delta_dir(version_dir: Path, seq: int) -> Path:
    """`V/deltas/<seq>`: built only from a checked seq, never from a raw string."""
    return deltas_dir(version_dir) / str(check_seq(seq))


def rows_path(table: str) -> str:
    """The rows file of `table`, relative to the delta directory."""
    return f"tables/{check_name('table', table)}/rows.i64"


def data_path(table: str) -> str:
    """The packed INT4 rows file of `table`, relative to the delta directory."""
    return f"tables/{check_name('table', table)}/rows.int4"


@dataclass(frozen=True)
class DeltaTableEntry:
    """One table's part of a delta: how many rows it replaces, at what byte width."""

    name: str
    rows: int
    row_bytes: int


@dataclass(frozen=True)
class DenseFrozen:
    """The dense weights the delta was trained against: V's own, byte for byte."""

    state: str
    path: str
    sha256: str


@dataclass(frozen=True)
class DeltaManifest:
    """The parsed manifest of one delta (fields in their canonical JSON order)."""

    model: str
    version: str
    base_fingerprint: str
    seq: int
    prev_fingerprint: str
    dense: DenseFrozen
    tables: tuple[DeltaTableEntry, ...]
    files: tuple[FileEntry, ...]
    written_at: float = 0.0
    provenance: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def name(self) -> str:
        """How messages name this delta: `model/version delta seq`."""
        return f"{self.model}/{self.version} delta {self.seq}"

    @property
    def num_rows(self) -> int:
        return sum(t.rows for t in self.tables)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise DeltaError(f"{self.name}: manifest lists no file {path!r}")

    def body(self) -> dict[str, Any]:
        return {
            "format": DELTA_FORMAT,
            "format_version": DELTA_FORMAT_VERSION,
            "model": self.model,
            "version": self.version,
            "base_fingerprint": self.base_fingerprint,
            "seq": self.seq,
            "prev_fingerprint": self.prev_fingerprint,
            "dense": asdict(self.dense),
            "tables": [asdict(t) for t in self.tables],
            "files": [asdict(f) for f in self.files],
            "written_at": self.written_at,
            "provenance": self.provenance,
        }

    def compute_fingerprint(self) -> str:
        canon = json.dumps(self.body(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()

    def to_json(self) -> str:
        """The manifest file's text: body order, then the fingerprint."""
        return json.dumps({**self.body(), "fingerprint": self.fingerprint}, indent=2,
                          allow_nan=False) + "\n"


def dense_frozen(base: Manifest) -> DenseFrozen:
    """What a delta of `base` must declare about the dense weights."""
    return DenseFrozen(DENSE_FROZEN, base.dense.path, base.file(base.dense.path).sha256)


def _field(raw: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in raw:
        raise DeltaError(f"{where}: manifest is missing field {key!r}")
    v = raw[key]
    if not isinstance(v, typ) or (isinstance(v, bool) and typ is not bool):
        raise DeltaError(f"{where}: manifest field {key!r} has wrong type {type(v).__name__}")
    return v


def _sha_hex(v: str, where: str) -> str:
    if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise DeltaError(f"{where} is not a lowercase hex sha256")
    return v


def parse_delta_manifest(raw: object, where: str) -> DeltaManifest:
    """Validate a delta manifest's JSON on its own (no base, no files); DeltaError on faults.

    `where` names the delta in messages (e.g. `ads_ctr/v1 delta 3`).
    """
    if not isinstance(raw, dict):
        raise DeltaError(f"{where}: manifest must be a JSON object")
    fmt = _field(raw, "format", str, where)
    fv = _field(raw, "format_version", int, where)
    if fmt != DELTA_FORMAT or fv != DELTA_FORMAT_VERSION:
        raise DeltaError(f"{where}: format {fmt!r} v{fv} is not {DELTA_FORMAT!r} "
                         f"v{DELTA_FORMAT_VERSION}")
    try:
        model = check_name("model", _field(raw, "model", str, where))
        version = check_name("version", _field(raw, "version", str, where))
    except SchemaError as e:
        raise DeltaError(f"{where}: {e}") from None
    d = _field(raw, "dense", dict, where)
    dense = DenseFrozen(_field(d, "state", str, f"{where} dense"), _field(d, "path", str, f"{where} dense"),
                        _sha_hex(_field(d, "sha256", str, f"{where} dense"), f"{where}: dense.sha256"))
    tables = []
    for i, t in enumerate(_field(raw, "tables", list, where)):
        w = f"{where} tables[{i}]"
        if not isinstance(t, dict):
            raise DeltaError(f"{w}: must be an object")
        try:
            name = check_name("table", _field(t, "name", str, w))
        except SchemaError as e:
            raise DeltaError(f"{w}: {e}") from None
        tables.append(DeltaTableEntry(name, _field(t, "rows", int, w), _field(t, "row_bytes", int, w)))
    files = []
    for i, f in enumerate(_field(raw, "files", list, where)):
        w = f"{where} files[{i}]"
        if not isinstance(f, dict):
            raise DeltaError(f"{w}: must be an object")
        files.append(FileEntry(_field(f, "path", str, w), _field(f, "bytes", int, w),
                               _sha_hex(_field(f, "sha256", str, w), f"{w}.sha256")))
    prov = _field(raw, "provenance", dict, where)
    m = DeltaManifest(
        model=model, version=version, base_fingerprint=_field(raw, "base_fingerprint", str, where),
        seq=_field(raw, "seq", int, where), prev_fingerprint=_field(raw, "prev_fingerprint", str, where),
        dense=dense, tables=tuple(tables), files=tuple(files),
        written_at=float(_field(raw, "written_at", (int, float), where)), provenance=prov,
    )
    fp = _field(raw, "fingerprint", str, where)
    try:
        want = m.compute_fingerprint()
    except ValueError:  # json.loads takes NaN/Infinity; canonical JSON does not
        raise DeltaError(f"{where}: manifest holds a NaN or Infinity number") from None
    if fp != want:
        raise DeltaError(f"{where}: fingerprint {fp} does not match its manifest ({want}): "
                         "the manifest was edited")
    check_seq(m.seq, f"{where}: seq")
    _check_layout(m, where)
    return DeltaManifest(**{**m.__dict__, "fingerprint": fp})


def _check_layout(m: DeltaManifest, where: str) -> None:
    """Tables unique, each listing exactly its two files at the sizes its row count implies."""
    names = [t.name for t in m.tables]
    if len(set(names)) != len(names):
        raise DeltaError(f"{where}: a table is listed twice: {names}")
    want: dict[str, int] = {}
    for t in m.tables:
        if t.rows < 1 or t.row_bytes < 1:
            raise DeltaError(f"{where}: table {t.name!r} must replace >= 1 row of >= 1 byte, "
                             f"lists {t.rows} rows of {t.row_bytes} bytes")
        want[rows_path(t.name)] = t.rows * ROW_ID_BYTES
        want[data_path(t.name)] = t.rows * t.row_bytes
    listed = {f.path: f.bytes for f in m.files}
    if len(listed) != len(m.files) or set(listed) != set(want):
        raise DeltaError(f"{where}: files {sorted(listed)} are not the tables' files {sorted(want)}")
    for path, size in want.items():
        if listed[path] != size:
            raise DeltaError(f"{where}: file {path} should hold {size} bytes for its rows, "
                             f"manifest lists {listed[path]}")
