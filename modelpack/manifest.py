"""manifest.json: read, validate, fingerprint, write, and verify a version directory.

The fingerprint is sha256 over the canonical JSON of the manifest body (everything but
the fingerprint itself), and the body lists every file's sha256, so one short string
names the exact bytes of a version. Embedding servers echo it and rankers compare it.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from modelpack.schema import (
    DenseFeature,
    DenseSpec,
    FeatureSchema,
    SchemaError,
    SparseFeature,
    TableSpec,
    check_name,
    validate_schema,
)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_CHUNK = 8 << 20


class VerifyError(ValueError):
    """A version directory whose bytes do not match its manifest."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a version: path relative to the version dir, size and sha256."""

    path: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The parsed, validated manifest of one model version."""

    model: str
    version: str
    schema: FeatureSchema
    tables: tuple[TableSpec, ...]
    dense: DenseSpec
    files: tuple[FileEntry, ...]
    provenance: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    format_version: int = FORMAT_VERSION

    def table(self, name: str) -> TableSpec:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(f"model {self.model}/{self.version} has no table {name!r}")

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(f"model {self.model}/{self.version} lists no file {path!r}")

    def body(self) -> dict[str, Any]:
        """The JSON body without the fingerprint, in canonical field order."""
        return {
            "format_version": self.format_version,
            "model": self.model,
            "version": self.version,
            "features": {
                "sparse": [asdict(f) for f in self.schema.sparse],
                "dense": [asdict(f) for f in self.schema.dense],
            },
            "tables": [asdict(t) for t in self.tables],
            "dense": asdict(self.dense),
            "files": [asdict(f) for f in self.files],
            "provenance": self.provenance,
        }

    def compute_fingerprint(self) -> str:
        canon = json.dumps(self.body(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()


def _req(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise SchemaError(f"manifest: {where} is missing field {key!r}")
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise SchemaError(f"manifest: {where}.{key} has wrong type {type(v).__name__}")
    return v


def check_relpath(path: object, where: str) -> str:
    """A file path from a manifest: relative, normalized, inside the version directory."""
    if not isinstance(path, str) or not path:
        raise SchemaError(f"manifest: {where} path must be a non-empty string")
    p = PurePosixPath(path)
    if p.is_absolute() or path.startswith(("/", "\\")) or ":" in path or "\\" in path:
        raise SchemaError(f"manifest: {where} path {path!r} must be relative")
    if any(part in ("..", ".", "") for part in path.split("/")):
        raise SchemaError(f"manifest: {where} path {path!r} must not contain '..' or '.'")
    return path


def _sparse(d: dict[str, Any], i: int) -> SparseFeature:
    w = f"features.sparse[{i}]"
    return SparseFeature(
        name=_req(d, "name", str, w), side=_req(d, "side", str, w), table=_req(d, "table", str, w),
        hash_seed=_req(d, "hash_seed", int, w), multi_valued=_req(d, "multi_valued", bool, w),
        max_length=_req(d, "max_length", int, w), pooling=_req(d, "pooling", str, w),
    )


def _dense_feature(d: dict[str, Any], i: int) -> DenseFeature:
    w = f"features.dense[{i}]"
    return DenseFeature(
        name=_req(d, "name", str, w), side=_req(d, "side", str, w),
        normalization=_req(d, "normalization", str, w),
        mean=float(_req(d, "mean", (int, float), w)), std=float(_req(d, "std", (int, float), w)),
    )


def parse_manifest(raw: dict[str, Any]) -> Manifest:
    """Validate a manifest dict (from JSON) and build a Manifest; SchemaError on any fault."""
    if not isinstance(raw, dict):
        raise SchemaError("manifest: top level must be a JSON object")
    fv = _req(raw, "format_version", int, "manifest")
    if fv != FORMAT_VERSION:
        raise SchemaError(f"manifest: unsupported format_version {fv} (this build reads {FORMAT_VERSION})")
    model = check_name("model", _req(raw, "model", str, "manifest"))
    version = check_name("version", _req(raw, "version", str, "manifest"))
    feats = _req(raw, "features", dict, "manifest")
    sparse = tuple(_sparse(d, i) for i, d in enumerate(_req(feats, "sparse", list, "features")))
    dense_f = tuple(_dense_feature(d, i) for i, d in enumerate(_req(feats, "dense", list, "features")))
    tables = []
    for i, t in enumerate(_req(raw, "tables", list, "manifest")):
        w = f"tables[{i}]"
        tables.append(TableSpec(
            name=_req(t, "name", str, w), rows=_req(t, "rows", int, w), dim=_req(t, "dim", int, w),
            num_shards=_req(t, "num_shards", int, w), dtype=_req(t, "dtype", str, w),
        ))
    schema = FeatureSchema(sparse=sparse, dense=dense_f)
    validate_schema(schema, tables)
    d = _req(raw, "dense", dict, "manifest")
    dense = DenseSpec(
        architecture=_req(d, "architecture", str, "dense"), config=_req(d, "config", dict, "dense"),
        path=check_relpath(_req(d, "path", str, "dense"), "dense"),
    )
    files = []
    for i, f in enumerate(_req(raw, "files", list, "manifest")):
        w = f"files[{i}]"
        sha = _req(f, "sha256", str, w)
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise SchemaError(f"manifest: {w}.sha256 is not a lowercase hex sha256")
        size = _req(f, "bytes", int, w)
        if size < 0:
            raise SchemaError(f"manifest: {w}.bytes must be >= 0")
        files.append(FileEntry(path=check_relpath(_req(f, "path", str, w), w), bytes=size, sha256=sha))
    paths = [f.path for f in files]
    if len(set(paths)) != len(paths):
        raise SchemaError("manifest: duplicate file paths")
    needed = [t.shard_path(k) for t in tables for k in range(t.num_shards)] + [dense.path]
    for p in needed:
        if p not in paths:
            raise SchemaError(f"manifest: required file {p!r} is not listed in files")
    for t in tables:
        for k in range(t.num_shards):
            start, stop = k * t.rows // t.num_shards, (k + 1) * t.rows // t.num_shards
            size = next(f.bytes for f in files if f.path == t.shard_path(k))
            if size != (stop - start) * t.row_bytes:
                raise SchemaError(
                    f"manifest: table {t.name!r} shard {k} should hold {stop - start} rows "
                    f"x {t.row_bytes} bytes = {(stop - start) * t.row_bytes} bytes, lists {size}"
                )
    prov = raw.get("provenance", {})
    if not isinstance(prov, dict):
        raise SchemaError("manifest: provenance must be an object")
    m = Manifest(model=model, version=version, schema=schema, tables=tuple(tables), dense=dense,
                 files=tuple(files), provenance=prov, format_version=fv)
    fp = _req(raw, "fingerprint", str, "manifest")
    want = m.compute_fingerprint()
    if fp != want:
        raise VerifyError(f"manifest of {model}/{version}: fingerprint {fp} does not match its body ({want})")
    return Manifest(**{**m.__dict__, "fingerprint": fp})


def read_manifest(version_dir: Path) -> Manifest:
    """Parse and validate `version_dir/manifest.json` (no file hashing; see verify)."""
    path = Path(version_dir) / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SchemaError(f"{path}: no manifest.json (not a model version directory)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SchemaError(f"{path}: not valid JSON: {e}") from None
    m = parse_manifest(raw)
    if Path(version_dir).name != m.version:
        raise SchemaError(f"{path}: directory name {Path(version_dir).name!r} != version {m.version!r}")
    return m


def write_manifest(version_dir: Path, m: Manifest) -> Manifest:
    """Fingerprint `m` and write it atomically (temp file + fsync + rename)."""
    final = Manifest(**{**m.__dict__, "fingerprint": m.compute_fingerprint()})
    body = final.body()
    body["fingerprint"] = final.fingerprint
    tmp = Path(version_dir) / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(body, fh, indent=2, allow_nan=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, Path(version_dir) / MANIFEST_NAME)
    return final


def sha256_file(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in chunks (never whole into memory)."""
    h = hashlib.sha256()
    size = 0
    # One buffer, reused: a fresh 8 MiB bytes per read stays in the allocator's arenas and
    # shows up as private memory of the server that verified the files.
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(view):
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def verify(version_dir: Path | str, *, only: set[str] | None = None, threads: int = 4) -> Manifest:
    """Re-hash the version's files against its manifest; raise VerifyError on any difference.

    `only` restricts hashing to those relative paths (a shard server checks its own files).
    Files are hashed on a thread pool (hashlib releases the GIL), so large tables verify
    at several GB/s.
    """
    vdir = Path(version_dir)
    m = read_manifest(vdir)
    todo = [f for f in m.files if only is None or f.path in only]

    def check(f: FileEntry) -> str | None:
        p = vdir / f.path
        if not p.is_file():
            return f"{m.model}/{m.version}: file {f.path} is missing"
        if p.stat().st_size != f.bytes:
            size = p.stat().st_size
            return f"{m.model}/{m.version}: file {f.path} has {size} bytes, manifest says {f.bytes}"
        _, digest = sha256_file(p)
        if digest != f.sha256:
            return f"{m.model}/{m.version}: file {f.path} sha256 {digest} != manifest {f.sha256} (corrupt)"
        return None

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(todo) or 1))) as pool:
        for err in pool.map(check, todo):
            if err:
                raise VerifyError(err)
    return m
