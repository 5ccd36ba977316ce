"""The offline scorer over on-disk INT4 files agrees with an independent numpy computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from modelpack.dense import load_dense
from modelpack.hashing import rows_for
from modelpack.int4 import dequantize_rows
from modelpack.scorer import OfflineScorer
from tests.helpers_store import TINY_SCHEMA, tiny_request, tiny_version


def _numpy_reference(vdir: Path, req: dict) -> np.ndarray:  # type: ignore[type-arg]
    """Dequantize whole shard files with numpy and pool by hand: no shared code with scorer."""
    m = OfflineScorer(vdir).manifest
    full = {}
    for t in m.tables:
        raw = b"".join((vdir / t.shard_path(k)).read_bytes() for k in range(t.num_shards))
        full[t.name] = dequantize_rows(np.frombuffer(raw, np.uint8).reshape(t.rows, -1), t.dim)
    n = len(req["candidates"])
    cols = []
    for f in TINY_SCHEMA.sparse:
        table = full[f.table]
        ents = [req["user"]] if f.side == "user" else req["candidates"]
        vecs = []
        for e in ents:
            ids = np.array(e[f.name] if f.multi_valued else [e[f.name]], dtype=np.int64)
            v = table[rows_for(ids, f.hash_seed, table.shape[0])].sum(axis=0)
            vecs.append(v / max(len(ids), 1) if f.pooling == "mean" else v)
        col = np.stack(vecs)
        cols.append(np.repeat(col, n, axis=0) if f.side == "user" else col)
    sparse = torch.from_numpy(np.stack(cols, axis=1))
    dense_x = np.array([[req["user"]["user_activity"], c["ad_bid"]] for c in req["candidates"]],
                       dtype=np.float32)
    model = load_dense(vdir / m.dense.path, m.dense.architecture, m.dense.config).eval()
    with torch.no_grad():
        return torch.sigmoid(model(sparse, torch.from_numpy(dense_x))).numpy()


def test_scores_match_numpy_reference(tmp_path: Path) -> None:
    tiny_version(tmp_path)
    vdir = tmp_path / "tiny" / "v1"
    scorer = OfflineScorer(vdir)
    for seed in range(3):
        req = tiny_request(5, seed)
        np.testing.assert_allclose(scorer.score(req), _numpy_reference(vdir, req), atol=1e-5)


def test_mismatched_tables_give_different_scores(tmp_path: Path) -> None:
    tiny_version(tmp_path, "v1", seed=1)
    tiny_version(tmp_path, "v2", seed=2)
    req = tiny_request(8)
    own = OfflineScorer(tmp_path / "tiny" / "v2").score(req)
    mixed = OfflineScorer(tmp_path / "tiny" / "v2", tables_dir=tmp_path / "tiny" / "v1").score(req)
    assert np.abs(own - mixed).max() > 1e-3
