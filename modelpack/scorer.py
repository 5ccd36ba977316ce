"""Offline, in-process scorer over a version's own INT4 files: the reference answer.

It reads the shard files through read-only memory maps, dequantizes and pools with
modelpack.torch_ops (the ranker's device code), and runs the dense model on the CPU.
`metrics.json` is computed with it and the ranker's integration tests compare to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from modelpack.dense import load_dense
from modelpack.lookup import Packed, gather_rows
from modelpack.manifest import Manifest, read_manifest
from modelpack.requests import DecodedRequest, FeatureRows, decode_request, plan_rows
from modelpack.schema import FeatureSchema, TableSpec
from modelpack.torch_ops import plan_bags, pool_bags


class TableReader:
    """Gathers packed INT4 rows of one table from its memory-mapped shard files."""

    def __init__(self, version_dir: Path, spec: TableSpec) -> None:
        self.spec = spec
        self.maps = [
            np.memmap(version_dir / spec.shard_path(k), dtype=np.uint8, mode="r").reshape(
                -1, spec.row_bytes)
            for k in range(spec.num_shards)
        ]

    def gather(self, rows: npt.NDArray[np.int64]) -> Packed:
        return gather_rows(rows, self.spec.rows, len(self.maps), self.spec.row_bytes,
                           lambda k, local: np.asarray(self.maps[k][local]))


def assemble_sparse(schema: FeatureSchema, pooled: list[torch.Tensor], n: int) -> torch.Tensor:
    """Per-feature pooled embeddings (entities, D), schema.sparse order -> (n, F, D).

    User-side features have one entity and are broadcast to every candidate.
    """
    cols = [p.expand(n, -1) if f.side == "user" else p for f, p in zip(schema.sparse, pooled, strict=True)]
    return torch.stack(cols, dim=1)


def pool_features(schema: FeatureSchema, plan: list[FeatureRows], packed: list[Packed],
                  dim: int) -> list[torch.Tensor]:
    """Dequantize and pool every feature's packed rows on the CPU: one (entities, D) each."""
    bags = plan_bags([f.pooling for f in schema.sparse], [fr.offsets for fr in plan], packed)
    pooled = pool_bags(torch.from_numpy(bags.rows), torch.from_numpy(bags.offsets),
                       torch.from_numpy(bags.scale), dim)
    return [pooled[a:b] for a, b in bags.spans]


class OfflineScorer:
    """Scores requests with one version's dense model over (by default) its own tables.

    `tables_dir` points the lookups at another version's tables of the same shape: the
    silent-mismatch experiment of metrics.json.
    """

    def __init__(self, version_dir: Path | str, *, tables_dir: Path | str | None = None) -> None:
        self.dir = Path(version_dir)
        self.manifest: Manifest = read_manifest(self.dir)
        tdir = Path(tables_dir) if tables_dir is not None else self.dir
        tman = read_manifest(tdir) if tables_dir is not None else self.manifest
        for t in self.manifest.tables:
            other = tman.table(t.name)
            if (other.rows, other.dim) != (t.rows, t.dim):
                raise ValueError(f"table {t.name!r} shapes differ between {self.dir} and {tdir}")
        self.tables = {t.name: t for t in tman.tables}
        self.readers = {t.name: TableReader(tdir, t) for t in tman.tables}
        d = self.manifest.dense
        self.dense = load_dense(self.dir / d.path, d.architecture, d.config).eval()
        self.dim = next(iter(self.tables.values())).dim

    @property
    def schema(self) -> FeatureSchema:
        return self.manifest.schema

    @torch.inference_mode()
    def score_decoded(self, req: DecodedRequest) -> npt.NDArray[np.float32]:
        plan = plan_rows(self.schema, self.tables, req)
        packed = [self.readers[fr.table].gather(fr.rows) for fr in plan]
        pooled = pool_features(self.schema, plan, packed, self.dim)
        sparse = assemble_sparse(self.schema, pooled, req.num_candidates)
        logits = self.dense(sparse, torch.from_numpy(req.dense))
        return torch.sigmoid(logits).numpy().astype(np.float32)

    def score(self, request: dict[str, Any]) -> npt.NDArray[np.float32]:
        return self.score_decoded(decode_request(self.schema, request, max_candidates=1 << 20))

    def score_all(self, requests: Iterable[dict[str, Any]]) -> list[npt.NDArray[np.float32]]:
        return [self.score(r) for r in requests]
