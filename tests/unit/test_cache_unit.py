"""Row cache units: admission and eviction, invalidation, retirement, metrics, the
device-tensor staging path (the CUDA path's torch ops, run on CPU tensors) and config."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from modelpack.delta import DeltaError, delta_dir, rows_path
from modelpack.delta_read import read_delta
from modelpack.delta_write import write_delta
from modelpack.requests import decode_request
from modelpack.scorer import TableReader
from ranker_server.cache_metrics import CacheCollector
from ranker_server.cache_touches import OPEN, Touches
from ranker_server.cached_tables import store_delta_rows
from ranker_server.config import ConfigError, RankerConfig
from ranker_server.device import Device
from ranker_server.metrics import Metrics
from ranker_server.pipeline import merge_requests, plan_lookups, stage_rows
from tests.helpers_store import loaded_tiny_version, tiny_request, tiny_version
from tests.unit.cache_helpers import Store, cached, query


def read(src: object, store: Store, rows: list[int], seq: int = 0) -> None:
    got = asyncio.run(src.lookup(store.version(seq), [query("a", rows)], 1.0))  # type: ignore[attr-defined]
    assert np.array_equal(got[0], store.read("a", np.asarray(rows, np.int64), seq))


def stats(src: object) -> dict[str, int]:
    v: dict[str, int] = src.cache.stats()["versions"][0]  # type: ignore[attr-defined]
    return v


@pytest.mark.parametrize("policy, hot_hits", [("lru", 0), ("tinylfu", 8)])
def test_one_off_rows_evict_hot_rows_under_lru_not_tinylfu(policy: str, hot_hits: int) -> None:
    store = Store(0)
    src, _ = cached(store, 10, policy)  # type: ignore[arg-type]
    hot = list(range(8))
    for _ in range(5):
        read(src, store, hot)
    for scan in range(3):  # a scan of one-off rows between two reads of the hot ones
        read(src, store, [*range(10 + 10 * scan, 20 + 10 * scan), 38, 39])
    before = stats(src)["unique_hits"]
    read(src, store, hot)
    assert stats(src)["unique_hits"] - before == hot_hits
    assert src.cache.stats()["entries"] <= 10


def test_capacity_evictions_and_skipped_lookups_are_counted() -> None:
    store = Store(1)
    src, ref = cached(store, 5, "lru")
    read(src, store, list(range(8)))  # 5 fit, 3 are not admitted (nothing to evict yet)
    s = stats(src)
    assert (s["entries"], s["evictions"], s["unique_misses"]) == (5, 0, 8)
    read(src, store, [20, 21, 22])  # 3 least recently used make room
    assert (stats(src)["entries"], stats(src)["evictions"]) == (5, 3)
    lookups = ref.lookups
    read(src, store, [20, 21, 20, 22])  # all hit: no lookup at all
    s = stats(src)
    assert ref.lookups == lookups and s["lookups_skipped"] == 1
    assert (s["requested_hits"], s["unique_hits"]) == (4, 3)
    assert s["wire_saved_bytes"] == 3 * (6 + 8) and s["bytes"] == 5 * 6


def test_a_delta_frees_only_the_rows_it_touched() -> None:
    store = Store(2)
    src, ref = cached(store, 20)
    read(src, store, [1, 2, 3, 4, 5])
    store.add_delta({"a": [2, 4, 30], "b": [1]})
    src.open_seq(store.manifest, 1)  # type: ignore[arg-type]
    s = stats(src)
    assert (s["invalidations"], s["entries"], s["learned_seq"]) == (2, 3, 1)
    asked = ref.rows_asked
    read(src, store, [1, 2, 3, 4, 5], seq=1)  # 1, 3, 5 still hit; 2 and 4 read at seq 1
    assert ref.rows_asked - asked == 2
    read(src, store, [1, 2, 3], seq=0)  # a revert: 2 was read at seq 1, delta 1 touched it
    assert ref.rows_asked - asked == 3


def test_a_retired_version_drops_its_entries_only() -> None:
    one, two = Store(3, "fp1"), Store(3, "fp2")  # same bytes: the one source answers both
    two.manifest.version = "v2"
    src, _ = cached(one, 20)
    src.open_version(two.manifest)  # type: ignore[arg-type]
    read(src, one, [1, 2, 3])
    read(src, two, [1, 2])
    src.close_version("v1")
    st = src.cache.stats()
    assert [v["version"] for v in st["versions"]] == ["v2"] and st["entries"] == 2
    asyncio.run(src.lookup(one.version(0), [query("a", [1])], 1.0))  # retired: read through
    assert src.cache.stats()["entries"] == 2


def test_delta_rows_come_from_the_rows_files_verified(tmp_path: Path) -> None:
    m = tiny_version(tmp_path, "v1")
    vdir = tmp_path / "tiny" / "v1"
    rng = np.random.default_rng(0)
    write_delta(vdir, {"unified": (np.array([7, 3, 500]), rng.standard_normal((3, 16)))})
    read = store_delta_rows(tmp_path)
    got = read(m, 1)
    assert list(got) == ["unified"] and got["unified"][0] == 1000
    assert got["unified"][1].tolist() == read_delta(vdir, 1).tables["unified"].rows.tolist()
    rows_file = delta_dir(vdir, 1) / rows_path("unified")
    raw = bytearray(rows_file.read_bytes())
    raw[0] ^= 1
    rows_file.write_bytes(bytes(raw))
    with pytest.raises(DeltaError, match="sha256"):
        read(m, 1)


def test_touch_intervals_around_a_read_seq() -> None:
    t = Touches(100)
    t.add(2, np.array([5, 7]))
    t.add(4, np.array([5]))
    lo, hi = t.interval(np.array([5, 5, 5, 7, 9]), 0)
    assert lo.tolist() == [0, 0, 0, 0, 0] and hi.tolist() == [1, 1, 1, 1, OPEN]
    lo, hi = t.interval(np.array([5, 5, 7]), 3)
    assert lo.tolist() == [2, 2, 2] and hi.tolist() == [3, 3, OPEN]
    assert not t.fits(1 << 60)


def test_metrics_expose_the_cache_per_version() -> None:
    store = Store(5)
    src, _ = cached(store, 5)
    metrics = Metrics()
    metrics.registry.register(CacheCollector(src.cache.stats))
    read(src, store, [1, 1, 2])
    read(src, store, [1, 2])
    sample = metrics.registry.get_sample_value
    assert sample("ranker_cache_rows_total", {"version": "v1", "rows": "requested",
                                              "result": "miss"}) == 3
    assert sample("ranker_cache_rows_total", {"version": "v1", "rows": "unique",
                                              "result": "hit"}) == 2
    assert sample("ranker_cache_lookups_skipped_total", {"version": "v1"}) == 1
    assert sample("ranker_cache_entries", {"version": "v1"}) == 2
    assert sample("ranker_cache_bytes", {"version": "v1"}) == 12
    assert sample("ranker_cache_capacity_bytes") == 30


def test_device_tensor_answers_stage_like_host_arrays(tmp_path: Path) -> None:
    """The CUDA path (answers already torch tensors) on CPU tensors: the same bags."""
    version = loaded_tiny_version(tmp_path)
    device = Device("cpu")
    try:
        reqs = [decode_request(version.schema, tiny_request(4, seed=s)) for s in range(2)]
        plan = plan_lookups(version, merge_requests(version.schema, reqs))
        readers = {t.name: TableReader(version.path, t) for t in version.manifest.tables}
        host = [readers[q.table].gather(q.rows) for q in plan.queries]
        a = stage_rows(device, version, plan, host)
        b = stage_rows(device, version, plan, [torch.from_numpy(h.copy()) for h in host])
        assert torch.equal(a.rows, b.rows) and torch.equal(a.offsets, b.offsets)
        assert torch.equal(a.scale, b.scale) and a.spans == b.spans
        with pytest.raises(ValueError, match="answer shaped"):
            stage_rows(device, version, plan, [torch.from_numpy(h[1:].copy()) for h in host])
    finally:
        device.close()


@pytest.mark.parametrize("field, value, message", [
    ("cache_bytes", -1, "cache_bytes must be >= 0"),
    ("cache_policy", "fifo", "cache_policy: must be one of lru, tinylfu"),
])
def test_config_refuses_bad_cache_settings(tmp_path: Path, field: str, value: object,
                                           message: str) -> None:
    cfg = RankerConfig(store=tmp_path, local_tables=True, **{field: value})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
