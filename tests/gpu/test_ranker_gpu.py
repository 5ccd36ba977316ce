"""The ranker on CUDA gives the CPU's scores (within FP tolerance). Skipped without a GPU."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ranker_server.config import RankerConfig
from ranker_server.device import Device
from ranker_server.inprocess import serve_in_process
from tests.helpers_store import tiny_request, tiny_version

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_staging_lands_on_the_gpu_through_pinned_memory() -> None:
    dev = Device("cuda")
    try:
        host = np.arange(12, dtype=np.float32).reshape(3, 4)
        t = dev.to_device(host)
        assert t.is_cuda and t.dtype == torch.float32
        np.testing.assert_array_equal(t.cpu().numpy(), host)
    finally:
        dev.close()


def _scores(store: Path, device: str, reqs: list[dict[str, Any]]) -> list[list[float]]:
    async def main() -> list[list[float]]:
        cfg = RankerConfig(store=store, model="tiny", version="v1", local_tables=True,
                           device=device, max_batch_wait_ms=2.0)  # type: ignore[arg-type]
        async with serve_in_process(cfg) as (client, state):
            assert state.device.is_cuda == (device == "cuda")
            answers = await asyncio.gather(*(client.post("/v1/rank", json=r) for r in reqs))
            assert all(a.status_code == 200 for a in answers)
            return [a.json()["scores"] for a in answers]

    return asyncio.run(main())


def test_cuda_scores_equal_cpu_scores(tmp_path: Path) -> None:
    tiny_version(tmp_path, "v1")
    reqs = [tiny_request(1 + i % 9, seed=i) for i in range(32)]
    cpu, cuda = _scores(tmp_path, "cpu", reqs), _scores(tmp_path, "cuda", reqs)
    for a, b in zip(cpu, cuda, strict=True):
        np.testing.assert_allclose(b, a, atol=2e-3, rtol=0)


def test_one_batch_synchronizes_with_the_host_once(tmp_path: Path) -> None:
    """Only the scores come back to the host: no copy or kernel waits for the device (the
    first H200 run counted 8 syncs per batch, one pageable offsets copy per feature)."""
    import warnings

    from modelpack.dense import load_dense
    from modelpack.requests import decode_request
    from modelpack.scorer import TableReader
    from ranker_server.pipeline import forward, merge_requests, plan_lookups, stage_inputs, stage_rows
    from ranker_server.versions import LoadedVersion
    from tests.helpers_store import TINY_SCHEMA

    m = tiny_version(tmp_path, "v1")
    vdir = tmp_path / "tiny" / "v1"
    dev = Device("cuda")
    try:
        lv = LoadedVersion(m, vdir, dev.place_module(load_dense(vdir / m.dense.path,
                                                                m.dense.architecture,
                                                                m.dense.config)))
        reqs = [decode_request(TINY_SCHEMA, tiny_request(5 + i, seed=i)) for i in range(6)]
        merged = merge_requests(lv.schema, reqs)
        plan = plan_lookups(lv, merged)
        readers = {t.name: TableReader(vdir, t) for t in m.tables}
        packed = [readers[q.table].gather(q.rows) for q in plan.queries]
        forward(lv, stage_inputs(dev, reqs, merged), stage_rows(dev, lv, plan, packed))  # warm
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                forward(lv, stage_inputs(dev, reqs, merged), stage_rows(dev, lv, plan, packed))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # Only the sync reports: torch 2.11 also warns once that the mode is a prototype
        # ("... does not yet detect all synchronizing operations"), which is not a sync.
        syncs = [w for w in caught if "called a synchronizing" in str(w.message)]
        assert len(syncs) == 1, [str(w.message)[:200] for w in syncs]
    finally:
        dev.close()


def test_the_first_request_after_ready_is_not_cold(tmp_path: Path) -> None:
    """prepare warms the device up: the first request no longer pays CUDA's lazy start
    (~0.3 s on the first H200 run, against a 1 s default deadline)."""
    import time

    tiny_version(tmp_path, "v1")

    async def main() -> float:
        cfg = RankerConfig(store=tmp_path, model="tiny", version="v1", local_tables=True,
                           device="cuda", max_batch_wait_ms=1.0)
        async with serve_in_process(cfg) as (client, _):
            t0 = time.perf_counter()
            r = await client.post("/v1/rank", json=tiny_request(50, seed=1))
            assert r.status_code == 200
            return time.perf_counter() - t0

    assert asyncio.run(main()) < 0.1
