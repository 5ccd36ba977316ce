"""What the first GPU run found in the ranker's device path, each caught here on the CPU.

On an H200 (loadtest/results/gpu_p5_*): 8 host syncs and 81 kernel launches per batch (a
pageable offsets copy and a dequantize per feature), a cold first batch of ~0.3 s after
the ranker said ready, and unchecked answer shapes feeding a device gather. See also
tests/gpu, which run the same paths on CUDA.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch

from modelpack.requests import decode_request
from modelpack.scorer import OfflineScorer, TableReader
from modelpack.torch_ops import dequantize_rows_torch, plan_bags, pool_bags
from ranker_server.device import Device
from ranker_server.pipeline import forward, merge_requests, plan_lookups, stage_inputs, stage_rows
from ranker_server.versions import LoadedVersion
from tests.helpers_store import TINY_SCHEMA, loaded_tiny_version, tiny_request, tiny_version

T = TypeVar("T")


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> LoadedVersion:
    return loaded_tiny_version(tmp_path_factory.mktemp("store"))


class CountingDevice(Device):
    """Counts host -> device copies and records which thread ran device work."""

    def __init__(self) -> None:
        super().__init__("cpu")
        self.copies = 0
        self.compute_threads: list[str] = []

    def to_device(self, array: Any) -> torch.Tensor:
        self.copies += 1
        return super().to_device(array)

    async def compute(self, fn: Callable[..., T], *args: object) -> T:
        def record() -> T:
            self.compute_threads.append(threading.current_thread().name)
            return fn(*args)

        return await super().compute(record)


def _batch(version: LoadedVersion, sizes: list[int]) -> tuple[Any, Any, Any]:
    reqs = [decode_request(TINY_SCHEMA, tiny_request(n, seed=i)) for i, n in enumerate(sizes)]
    merged = merge_requests(version.schema, reqs)
    plan = plan_lookups(version, merged)
    readers = {t.name: TableReader(version.path, t) for t in version.manifest.tables}
    return reqs, plan, [readers[q.table].gather(q.rows) for q in plan.queries]


def test_a_batch_is_three_row_copies_whatever_the_number_of_features(version: LoadedVersion
                                                                       ) -> None:
    # Was: one copy per table query plus a pageable offsets copy (a sync) per feature.
    dev = CountingDevice()
    try:
        for sizes in ([1], [3, 5, 2], [7] * 9):
            reqs, plan, packed = _batch(version, sizes)
            dev.copies = 0
            staged = stage_inputs(dev, reqs, merge_requests(version.schema, reqs))
            rows = stage_rows(dev, version, plan, packed)
            assert dev.copies == 2 + 3, sizes  # dense + user_of, then rows + offsets + scale
            scores = forward(version, staged, rows)
            scorer = OfflineScorer(version.path)
            want = np.concatenate([scorer.score_decoded(r) for r in reqs])
            np.testing.assert_allclose(scores, want, atol=2e-6, rtol=0)
    finally:
        dev.close()


def test_fused_pooling_equals_pooling_feature_by_feature() -> None:
    rng = np.random.default_rng(0)
    dim, feats = 8, []
    for mode, lengths in (("sum", [1, 1, 1]), ("mean", [0, 3, 1, 2]), ("mean", [2]),
                          ("sum", [0, 0])):
        n = int(sum(lengths))
        packed = rng.integers(0, 256, size=(n, 4 + dim // 2), dtype=np.uint8)
        packed[:, :4] = np.frombuffer(np.array([0.01, -0.5] * n, np.float16).tobytes(),
                                      np.uint8).reshape(n, 4)
        feats.append((mode, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), packed))
    bags = plan_bags([f[0] for f in feats], [f[1] for f in feats], [f[2] for f in feats])
    pooled = pool_bags(torch.from_numpy(bags.rows), torch.from_numpy(bags.offsets),
                       torch.from_numpy(bags.scale), dim)
    for (mode, offs, packed), (a, b) in zip(feats, bags.spans, strict=True):
        vals = dequantize_rows_torch(torch.from_numpy(packed), dim) if packed.size else \
            torch.zeros((0, dim))
        want = torch.stack([vals[s:e].sum(0) / (max(e - s, 1) if mode == "mean" else 1)
                            for s, e in itertools.pairwise(offs)])
        torch.testing.assert_close(pooled[a:b], want, atol=1e-6, rtol=1e-6)


def test_short_or_misshaped_answers_are_refused_on_the_host(version: LoadedVersion) -> None:
    # A device gather does not bounds-check: a short answer there is an illegal memory access.
    dev = Device("cpu")
    try:
        _, plan, packed = _batch(version, [4, 2])
        short = [p[:-1] if i == 0 else p for i, p in enumerate(packed)]
        with pytest.raises(ValueError, match=f"table {plan.queries[0].table}: answer shaped"):
            stage_rows(dev, version, plan, short)
        with pytest.raises(ValueError, match="answers for"):
            stage_rows(dev, version, plan, packed[:-1])
        with pytest.raises(ValueError, match="offsets must rise"):
            plan_bags(["sum"], [np.array([0, 3], np.int64)], [packed[0][:2]])
    finally:
        dev.close()


def test_a_device_error_marks_the_device_broken_and_refuses_later_batches() -> None:
    dev = Device("cpu")
    try:
        def illegal() -> None:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

        with pytest.raises(RuntimeError):
            dev.guard(illegal)
        assert dev.broken == "CUDA error: an illegal memory access was encountered"
        with pytest.raises(RuntimeError, match="device unusable since an earlier error"):
            dev.guard(lambda: 1)
        other = Device("cpu")
        with pytest.raises(ZeroDivisionError):  # an ordinary bug does not condemn the device
            other.guard(lambda: 1 // 0)
        assert other.broken is None
        other.close()
    finally:
        dev.close()


def test_prepare_warms_the_device_up_and_unload_frees_memory_off_the_loop(tmp_path: Path
                                                                          ) -> None:
    from ranker_server.config import RankerConfig
    from ranker_server.lifecycle import Lifecycle
    from ranker_server.local_tables import LocalTables
    from ranker_server.metrics import Metrics
    from ranker_server.versions import VersionRegistry

    tiny_version(tmp_path, "v1")
    cfg = RankerConfig(store=tmp_path, model="tiny", version="v1", local_tables=True)

    async def main() -> None:
        dev = CountingDevice()
        registry = VersionRegistry("tiny", Metrics())
        life = Lifecycle(cfg, registry, LocalTables(tmp_path), dev)
        lv = await life.load("v1")
        assert dev.compute_threads == []
        await life.prepare("v1")
        # One batch ran through every device step on the compute thread before "prepared".
        assert lv.prepared and dev.compute_threads == ["ranker-compute_0"] and dev.copies == 5
        await life.unload("v1", timeout_s=1)
        assert dev.compute_threads == ["ranker-compute_0"] * 2  # empty_cache off the loop
        dev.broken = "CUDA error: test"
        assert await life.unservable() == "device failed: CUDA error: test"
        dev.close()

    asyncio.run(main())


def test_local_tables_fall_back_when_fbgemm_is_there_but_does_not_load(
        version: LoadedVersion, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from ranker_server import local_tables

    real_import = builtins.__import__

    def failing(name: str, *args: Any, **kw: Any) -> Any:
        if name == "embedding_server" and args and args[2] and "table_store" in args[2]:
            raise OSError("libfbgemm.so: undefined symbol (built for another torch)")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", failing)
    tables = local_tables.open_tables(version.path.parent.parent, version.manifest)
    assert {type(t).__name__ for t in tables.values()} == {"TableReader"}
