"""The row cache on CUDA: answers stay on the device and equal the uncached bytes across
deltas and reverts; a cached ranker scores exactly as an uncached one. Skipped without a GPU."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ranker_server.config import RankerConfig
from ranker_server.inprocess import serve_in_process
from tests.helpers_store import tiny_request, tiny_version
from tests.unit.cache_helpers import TABLES, Store, cached, query

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_answers_equal_the_uncached_bytes_across_deltas() -> None:
    rng = np.random.default_rng(0)
    store = Store(9)
    src, ref = cached(store, 25, "tinylfu", device="cuda")
    opened = 0
    for step in range(300):
        if step % 40 == 39:
            store.add_delta({t: rng.choice(n, 5, replace=False).tolist() for t, n in TABLES.items()})
        if step % 25 == 24:
            opened = int(rng.integers(0, len(store.deltas) + 1))  # advances and reverts
            src.open_seq(store.manifest, opened)  # type: ignore[arg-type]
        seq = int(rng.integers(0, opened + 1))
        queries = [query(t, rng.integers(0, n, 12).tolist()) for t, n in TABLES.items()]
        got = asyncio.run(src.lookup(store.version(seq), queries, 1.0))
        for q, g in zip(queries, got, strict=True):
            assert isinstance(g, torch.Tensor) and g.is_cuda
            assert np.array_equal(g.cpu().numpy(), store.read(q.table, q.rows, seq))
    st = src.cache.stats()["versions"][0]
    assert st["unique_hits"] > 0 and st["lookups_skipped"] > 0 and ref.lookups < 300


def _scores(store: Path, cache_bytes: int, reqs: list[dict[str, Any]]) -> list[list[float]]:
    async def main() -> list[list[float]]:
        cfg = RankerConfig(store=store, model="tiny", version="v1", local_tables=True,
                           device="cuda", cache_bytes=cache_bytes)
        async with serve_in_process(cfg) as (client, state):
            out = []
            for _ in range(2):  # the second pass hits
                answers = [await client.post("/v1/rank", json=r) for r in reqs]
                assert all(a.status_code == 200 for a in answers)
                out += [a.json()["scores"] for a in answers]
            if cache_bytes:
                assert state.cache is not None and state.cache.device.type == "cuda"
                assert state.cache.stats()["versions"][0]["lookups_skipped"] >= len(reqs)
            return out
    return asyncio.run(main())


def test_a_cached_ranker_on_cuda_scores_exactly_as_an_uncached_one(tmp_path: Path) -> None:
    tiny_version(tmp_path, "v1")
    reqs = [tiny_request(3 + i % 5, seed=i) for i in range(12)]
    assert _scores(tmp_path, 1 << 20, reqs) == _scores(tmp_path, 0, reqs)
