"""Write a model version directory: streaming INT4 tables, dense weights, extra files.

Everything is written under a hidden temp directory beside the final one and renamed
into place only after every file is complete, hashed and listed in a fingerprinted
manifest, so a crash or a bad input never leaves a half-written version behind.
Tables are written in row blocks (quantized block by block, hashed as they go), so a
450M-row table never has to exist in memory as float.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import torch

from modelpack.int4 import quantize_rows
from modelpack.manifest import FileEntry, Manifest, check_relpath, sha256_file, write_manifest
from modelpack.schema import DenseSpec, FeatureSchema, TableSpec, check_name, validate_schema


class _TableStream:
    """Sequential writer of one table's shard files; tracks the next expected row."""

    def __init__(self, root: Path, spec: TableSpec, progress: bool) -> None:
        self.root = root
        self.spec = spec
        self.next_row = 0
        self.shard = -1
        self.fh: IO[bytes] | None = None
        self.hash = hashlib.sha256()
        self.size = 0
        self.entries: list[FileEntry] = []
        self.bar: Any = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=spec.rows, unit="row", unit_scale=True, desc=f"table {spec.name}")

    def _bound(self, k: int) -> int:
        return k * self.spec.rows // self.spec.num_shards

    def _open_next(self) -> None:
        self._close_current()
        self.shard += 1
        path = self.root / self.spec.shard_path(self.shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "wb")  # noqa: SIM115 (closed in _close_current/abort)
        self.hash = hashlib.sha256()
        self.size = 0

    def _close_current(self) -> None:
        if self.fh is None:
            return
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        self.fh = None
        self.entries.append(FileEntry(self.spec.shard_path(self.shard), self.size, self.hash.hexdigest()))

    def write(self, block: npt.NDArray[np.floating]) -> None:
        """Quantize a float block of the next rows and append it."""
        spec = self.spec
        if block.ndim != 2 or block.shape[1] != spec.dim:
            raise ValueError(
                f"table {spec.name!r}: block must be (rows, {spec.dim}), got shape {block.shape}"
            )
        self._check_room(block.shape[0])
        self.write_packed(quantize_rows(block, name=f"table {spec.name!r}", row_offset=self.next_row))

    def _check_room(self, n: int) -> None:
        if self.next_row + n > self.spec.rows:
            raise ValueError(
                f"table {self.spec.name!r}: {self.next_row + n} rows written, "
                f"the table has {self.spec.rows}"
            )

    def write_packed(self, packed: npt.NDArray[np.uint8]) -> None:
        """Append already-packed INT4 rows (the TBE layout), split over the shard files."""
        if packed.ndim != 2 or packed.shape[1] != self.spec.row_bytes or packed.dtype != np.uint8:
            raise ValueError(f"table {self.spec.name!r}: packed rows must be uint8 "
                             f"(rows, {self.spec.row_bytes}), got {packed.dtype} {packed.shape}")
        self._check_room(packed.shape[0])
        pos = 0
        while pos < packed.shape[0]:
            if self.fh is None or self.next_row >= self._bound(self.shard + 1):
                self._open_next()
            take = min(packed.shape[0] - pos, self._bound(self.shard + 1) - self.next_row)
            chunk = np.ascontiguousarray(packed[pos:pos + take]).tobytes()
            assert self.fh is not None
            self.fh.write(chunk)
            self.hash.update(chunk)
            self.size += len(chunk)
            pos += take
            self.next_row += take
        if self.bar is not None:
            self.bar.update(packed.shape[0])

    def finish(self) -> list[FileEntry]:
        if self.next_row != self.spec.rows:
            raise ValueError(
                f"table {self.spec.name!r}: only {self.next_row} of {self.spec.rows} rows were written"
            )
        self._close_current()
        if self.bar is not None:
            self.bar.close()
        return self.entries

    def abort(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        if self.bar is not None:
            self.bar.close()


class VersionWriter:
    """Context manager that builds `STORE/<model>/<version>/` atomically.

    Usage: `with VersionWriter(...) as w: w.write_table(...); w.write_dense(...)`. On a
    clean exit the manifest is written and the temp dir renamed into place; on any
    exception the temp dir is removed and the exception propagates.
    """

    def __init__(self, store: Path | str, model: str, version: str, schema: FeatureSchema,
                 tables: list[TableSpec], dense: DenseSpec, *,
                 provenance: dict[str, Any] | None = None, progress: bool = True,
                 overwrite: bool = False) -> None:
        self.model = check_name("model", model)
        self.version = check_name("version", version)
        validate_schema(schema, tables)
        check_relpath(dense.path, "dense")
        self.schema, self.tables, self.dense = schema, list(tables), dense
        self.provenance = dict(provenance or {})
        self.progress = progress
        self.final = Path(store) / model / version
        if self.final.exists() and not overwrite:
            raise FileExistsError(f"{self.final} already exists; pass overwrite=True to replace it")
        self.overwrite = overwrite
        self.tmp = Path(store) / model / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
        self.streams: dict[str, _TableStream] = {}
        self.extra: list[str] = []
        self.manifest: Manifest | None = None

    @property
    def path(self) -> Path:
        """The temp directory being written (valid inside the `with` block)."""
        return self.tmp

    def __enter__(self) -> VersionWriter:
        self.tmp.mkdir(parents=True)
        return self

    def _stream(self, name: str) -> _TableStream:
        if name not in self.streams:
            spec = next((t for t in self.tables if t.name == name), None)
            if spec is None:
                raise ValueError(f"unknown table {name!r}; declared: {[t.name for t in self.tables]}")
            self.streams[name] = _TableStream(self.tmp, spec, self.progress)
        return self.streams[name]

    def write_table(self, name: str, block: npt.NDArray[np.floating]) -> None:
        """Append a float block of rows to table `name` (blocks must arrive in row order)."""
        self._stream(name).write(block)

    def write_table_packed(self, name: str, packed: npt.NDArray[np.uint8]) -> None:
        """Append already-packed INT4 rows to table `name` (in row order; compaction)."""
        self._stream(name).write_packed(packed)

    def write_table_blocks(self, name: str, blocks: Iterable[npt.NDArray[np.floating]]) -> None:
        for b in blocks:
            self.write_table(name, b)

    def write_dense(self, module: torch.nn.Module) -> None:
        """Save the dense module's weights as safetensors (refusing non-finite weights)."""
        from modelpack.dense import save_dense

        for key, t in module.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"dense model: weight {key!r} holds NaN or Inf; refusing to export")
        save_dense(module, self.tmp / self.dense.path)

    def add_file(self, relpath: str, data: bytes) -> None:
        """Add an extra file (e.g. eval.jsonl, metrics.json); it is hashed into the manifest."""
        check_relpath(relpath, "extra file")
        p = self.tmp / relpath
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        self.extra.append(relpath)

    def commit(self) -> Manifest:
        entries: list[FileEntry] = []
        for t in self.tables:
            if t.name not in self.streams:
                raise ValueError(f"table {t.name!r} was declared but never written")
            entries.extend(self.streams[t.name].finish())
        for rel in [self.dense.path, *self.extra]:
            p = self.tmp / rel
            if not p.is_file():
                raise FileNotFoundError(f"version file {rel!r} was never written")
            size, digest = sha256_file(p)
            entries.append(FileEntry(rel, size, digest))
        m = Manifest(model=self.model, version=self.version, schema=self.schema,
                     tables=tuple(self.tables), dense=self.dense, files=tuple(entries),
                     provenance=self.provenance)
        m = write_manifest(self.tmp, m)
        if self.final.exists():
            # Replace: move the old one aside first so the swap leaves no mixed directory.
            old = self.final.with_name(f".old-{self.version}-{uuid.uuid4().hex[:8]}")
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)
        self.manifest = m
        return m

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if et is None:
                self.commit()
        except BaseException:
            self._cleanup()
            raise
        if et is not None:
            self._cleanup()

    def _cleanup(self) -> None:
        for s in self.streams.values():
            s.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)
