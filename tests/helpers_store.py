"""Tiny model stores for tests: random tables + a small DCN-v2, written in well under a second."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from modelpack.dense import build_dense
from modelpack.export import export_version
from modelpack.manifest import Manifest
from modelpack.schema import DenseFeature, FeatureSchema, SparseFeature

if TYPE_CHECKING:
    from ranker_server.versions import LoadedVersion

TINY_SCHEMA = FeatureSchema(
    sparse=(
        SparseFeature("user_id", "user", "unified", 101),
        SparseFeature("user_recent", "user", "unified", 103, multi_valued=True, max_length=5,
                      pooling="mean"),
        SparseFeature("ad_id", "candidate", "unified", 201),
        SparseFeature("ad_cat", "candidate", "cats", 203),
    ),
    dense=(DenseFeature("user_activity", "user"), DenseFeature("ad_bid", "candidate")),
)


def dense_config(dim: int) -> dict[str, object]:
    return {"num_sparse": 4, "embedding_dim": dim, "num_dense": 2, "cross_layers": 1,
            "cross_rank": 4, "mlp_dims": [16]}


def tiny_version(store: Path, version: str = "v1", *, rows: int = 1000, dim: int = 16,
                 shards: int = 2, seed: int = 0, model: str = "tiny") -> Manifest:
    """Write `store/model/version` with random weights; returns its manifest."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    cfg = dense_config(dim)
    return export_version(
        store, model, version, schema=TINY_SCHEMA,
        tables={"unified": rng.standard_normal((rows, dim)).astype(np.float32),
                "cats": rng.standard_normal((37, dim)).astype(np.float32)},
        num_shards={"unified": shards, "cats": 1},
        dense=build_dense("dcn_v2", cfg), architecture="dcn_v2", config=cfg,
        extra_files={"eval.jsonl": b"{}\n"}, provenance={"seed": seed}, progress=False,
    )


def tiny_request(n: int = 3, seed: int = 0) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    return {
        "request_id": f"r{seed}", "model": "tiny",
        "user": {"user_id": int(rng.integers(1 << 40)), "user_recent": [1, 2, 3],
                 "user_activity": 0.5},
        "candidates": [{"ad_id": int(rng.integers(1 << 40)), "ad_cat": int(i), "ad_bid": 1.0 + i}
                       for i in range(n)],
    }


DELETE = object()
"""As `mutated_request`'s value: remove the field instead of replacing it."""


def mutated_request(path: list[Any], value: Any, n: int = 3) -> dict[str, Any]:
    """tiny_request(n) with the field at `path` (keys and list indices) set to `value`."""
    req: dict[str, Any] = copy.deepcopy(tiny_request(n))
    target: Any = req
    for p in path[:-1]:
        target = target[p]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return req


def loaded_tiny_version(store: Path, version: str = "v1") -> LoadedVersion:
    """tiny_version written to `store` and loaded as a ranker holds it (dense in eval mode)."""
    from modelpack.dense import load_dense
    from ranker_server.versions import LoadedVersion

    m = tiny_version(store, version)
    vdir = store / "tiny" / version
    dense = load_dense(vdir / m.dense.path, m.dense.architecture, m.dense.config).eval()
    return LoadedVersion(manifest=m, path=vdir, dense=dense, prepared=True)
