"""Helpers of the delta tests: a tiny version per test, random updates, a forger of deltas."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from modelpack.delta import DELTA_MANIFEST, delta_dir, parse_delta_manifest
from modelpack.int4 import quantize_rows
from modelpack.manifest import Manifest
from tests.helpers_store import tiny_version

DIM = 16
ROW_BYTES = 4 + DIM // 2
TABLE_ROWS = {"unified": 1000, "cats": 37}
_CACHE: dict[str, Path] = {}


def version_copy(root: Path, cache_root: Path, seed: int = 0) -> Path:
    """A fresh copy of tiny/v1 (built once per cache root and seed) at root/tiny/v1."""
    key = f"{cache_root}/{seed}"
    if key not in _CACHE:
        src_store = cache_root / f"src-{seed}"
        tiny_version(src_store, "v1", seed=seed)
        _CACHE[key] = src_store / "tiny" / "v1"
    dst = root / "tiny" / "v1"
    shutil.copytree(_CACHE[key], dst)
    return dst


def packed_rows(rng: np.random.Generator, n: int) -> npt.NDArray[np.uint8]:
    """n valid packed INT4 rows (from random floats through the real quantizer)."""
    return quantize_rows(rng.standard_normal((n, DIM)).astype(np.float32))


def update(rng: np.random.Generator, table: str = "unified", n: int = 20
           ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    rows = rng.choice(TABLE_ROWS[table], n, replace=False).astype(np.int64)
    return rows, rng.standard_normal((n, DIM)).astype(np.float32)


Arrays = dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]]


def forge(vdir: Path, seq: int, *, arrays: Callable[[Arrays], Arrays] | None = None,
          manifest: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Rewrite delta `seq` as a buggy or hostile writer would, hashes and fingerprint *valid*.

    `arrays` maps {table: (rows, packed)} to new ones (files and sizes follow); `manifest`
    edits the raw manifest dict before it is re-fingerprinted. So only the content checks
    can catch what it did.
    """
    ddir = delta_dir(vdir, seq)
    raw = json.loads((ddir / DELTA_MANIFEST).read_text())
    if arrays is not None:
        cur: Arrays = {}
        for t in raw["tables"]:
            rows = np.fromfile(ddir / f"tables/{t['name']}/rows.i64", dtype="<i8")
            packed = np.fromfile(ddir / f"tables/{t['name']}/rows.int4", dtype=np.uint8)
            cur[t["name"]] = (rows, packed.reshape(t["rows"], -1))
        files = []
        for t in raw["tables"]:
            rows, packed = arrays(cur)[t["name"]]
            t["rows"], t["row_bytes"] = int(rows.size), int(packed.shape[1])
            for rel, data in ((f"tables/{t['name']}/rows.i64", rows.astype("<i8").tobytes()),
                              (f"tables/{t['name']}/rows.int4", packed.tobytes())):
                (ddir / rel).write_bytes(data)
                files.append({"path": rel, "bytes": len(data),
                              "sha256": hashlib.sha256(data).hexdigest()})
        raw["files"] = files
    if manifest is not None:
        manifest(raw)
    raw.pop("fingerprint")
    canon = json.dumps(raw, sort_keys=True, separators=(",", ":"))
    raw["fingerprint"] = "sha256:" + hashlib.sha256(canon.encode()).hexdigest()
    (ddir / DELTA_MANIFEST).write_text(json.dumps(raw, indent=2))
    if manifest is None:  # a forged manifest may be meant to fail parsing: check only the rest
        parse_delta_manifest(raw, "forged")


def base_rows(vdir: Path, m: Manifest, table: str) -> npt.NDArray[np.uint8]:
    """Every packed row of `table` in V, in row order."""
    spec = m.table(table)
    return np.concatenate([np.fromfile(vdir / spec.shard_path(k), dtype=np.uint8)
                           for k in range(spec.num_shards)]).reshape(spec.rows, spec.row_bytes)
