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
