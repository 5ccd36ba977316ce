"""embedding_server.table_store and .versions: planning, verified zero-copy maps, states."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from embedding_server.errors import ServiceError
from embedding_server.served_table import ServedTable
from embedding_server.table_store import StoreError, open_version, plan_version
from embedding_server.versions import VersionRegistry
from modelpack.int4 import dequantize_rows
from tests.helpers_store import tiny_version


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("es_store")
    tiny_version(root, "v1", seed=1)
    tiny_version(root, "v2", seed=2)
    tiny_version(root, "v4", seed=4, shards=4)
    return root


def _mapping_of(address: int) -> str:
    """The /proc/self/maps line of the mapping that holds `address`."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= address < hi:
            return line
    raise AssertionError(f"address {address:#x} is not mapped")


def test_plan_slices_follow_the_shard_math(store: Path) -> None:
    plan = plan_version(store, "tiny", "v1", 1, 2)
    by = {s.spec.name: s for s in plan.slices}
    u = by["unified"]
    assert (u.start, u.stop, u.path) == (500, 1000, "tables/unified/shard-1-of-2.bin")
    # "cats" is one 37-row file; shard 1 of 2 serves its rows [18, 37) from the middle.
    assert (by["cats"].start, by["cats"].stop, by["cats"].file_row) == (18, 37, 0)
    assert plan.nbytes == 500 * 12 + 19 * 12


def _file_rows(store: Path, version: str, table: str, files: int, rows: np.ndarray) -> np.ndarray:
    """Packed rows of global row ids, read with numpy from the files (not the server's code)."""
    tables = store / "tiny" / version / "tables" / table
    data = np.concatenate([np.fromfile(tables / f"shard-{k}-of-{files}.bin", np.uint8).reshape(-1, 12)
                           for k in range(files)])
    out: np.ndarray = data[rows]
    return out


def test_open_maps_the_files_read_only_without_copying(store: Path) -> None:
    v = open_version(plan_version(store, "tiny", "v1", 1, 2))
    for name, file in (("unified", "unified/shard-1-of-2.bin"), ("cats", "cats/shard-0-of-1.bin")):
        t = v.tables[name]
        (seg,) = t.segments
        line = _mapping_of(seg.weights.data_ptr())
        assert line.endswith(file) and line.split()[1].startswith("r--s"), line
        assert seg.kernel.weights.data_ptr() == seg.weights.data_ptr()
        raw = np.fromfile(store / "tiny" / "v1" / "tables" / file, np.uint8).reshape(-1, 12)
        first = t.start - (0 if name == "cats" else 500)
        assert np.array_equal(seg.weights.numpy(), raw[first:first + t.stop - t.start])
    assert v.nbytes == 500 * 12 + 19 * 12


@pytest.mark.parametrize(("shard", "num_shards", "files"), [(0, 1, [0, 1, 2, 3]), (0, 3, [0, 1]),
                                                            (1, 3, [1, 2]), (2, 3, [2, 3])])
def test_a_shard_spanning_files_maps_each_part_in_place(store: Path, shard: int, num_shards: int,
                                                         files: list[int]) -> None:
    """v4 stores "unified" in 4 files of 250 rows: 1 or 3 servers need no re-export."""
    plan = plan_version(store, "tiny", "v4", shard, num_shards)
    lo, hi = shard * 1000 // num_shards, (shard + 1) * 1000 // num_shards
    assert plan.nbytes == (hi - lo) * 12 + ((shard + 1) * 37 // num_shards - shard * 37 // num_shards) * 12
    t = open_version(plan).tables["unified"]
    assert (t.start, t.stop) == (lo, hi) and [s.file for s in t.segments] == files
    assert t.nbytes == (hi - lo) * 12
    for s in t.segments:
        line = _mapping_of(s.weights.data_ptr())
        assert line.endswith(f"unified/shard-{s.file}-of-4.bin") and line.split()[1].startswith("r--s"), line
        assert s.kernel.weights.data_ptr() == s.weights.data_ptr()
    rows = np.concatenate([np.arange(lo, hi), np.random.default_rng(shard).integers(lo, hi, 500)])
    _check_lookups(store, t, rows)
    for s in t.segments:  # a request whose rows all lie in one file
        _check_lookups(store, t, rows[(rows >= s.start) & (rows < s.stop)])


def _check_lookups(store: Path, t: ServedTable, rows: np.ndarray) -> None:
    """Packed, dequantized and pooled (sum and mean, empty bags) rows equal the v4 files'."""
    want = _file_rows(store, "v4", "unified", 4, rows)
    assert np.array_equal(t.gather(rows), want)
    vals = dequantize_rows(want, 16).astype(np.float64)
    lengths = np.array([0, 7, 1, 0, rows.size - 9, 1, 0])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    pooled = np.stack([vals[a:b].sum(0) if b > a else np.zeros(16) for a, b in itertools.pairwise(offsets)])
    for pooling, off, expect in (("sum", None, vals), ("sum", offsets, pooled),
                                 ("mean", offsets, pooled / np.maximum(lengths, 1)[:, None])):
        for output in ("fp16", "fp32"):
            got = t.lookup(rows, None if off is None else torch.from_numpy(off), pooling,  # type: ignore[arg-type]
                           output).double().numpy()
            rel = 2.0**-10 if output == "fp16" else 1e-6
            assert np.all(np.abs(got - expect) <= np.abs(expect) * rel + 1e-5), (pooling, output)
            if off is not None:
                assert not got[lengths == 0].any()


def test_refusals_name_the_problem(store: Path) -> None:
    with pytest.raises(StoreError, match="no such version"):
        plan_version(store, "tiny", "v9", 0, 2)
    with pytest.raises(StoreError, match="invalid version name"):
        plan_version(store, "tiny", "..", 0, 2)
    with pytest.raises(StoreError, match="'cats' has 37 rows, fewer than the 38 server shards"):
        plan_version(store, "tiny", "v4", 0, 38)
    assert len(plan_version(store, "tiny", "v4", 3, 8).slices) == 2  # 8 servers over 4 files is fine


def test_corrupt_byte_is_refused(tmp_path: Path) -> None:
    tiny_version(tmp_path, "v1")
    f = tmp_path / "tiny" / "v1" / "tables" / "unified" / "shard-0-of-2.bin"
    data = bytearray(f.read_bytes())
    data[7] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"shard-0-of-2.bin sha256 .* \(corrupt\)"):
        open_version(plan_version(tmp_path, "tiny", "v1", 0, 2))
    open_version(plan_version(tmp_path, "tiny", "v1", 1, 2))  # shard 1 only checks its own file
    with pytest.raises(StoreError, match="corrupt"):  # one server over both files checks both
        open_version(plan_version(tmp_path, "tiny", "v1", 0, 1))


def test_registry_budget_states_and_fingerprints(store: Path) -> None:
    one = plan_version(store, "tiny", "v1", 0, 2).nbytes
    reg = VersionRegistry(store, 0, 2, budget=one + 10)
    assert reg.load("tiny", "v1").state == "READY"
    assert reg.load("tiny", "v1").state == "READY"  # idempotent
    fit = reg.check_fit("tiny", "v2")
    assert not fit.fits and fit.required == one and fit.available == 10
    with pytest.raises(ServiceError, match=f"needs {one} bytes") as e:
        reg.load("tiny", "v2")
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [x.version for x in reg.snapshot()] == ["v1"]
    fp = reg.snapshot()[0].fingerprint
    with reg.acquire("tiny", "v1", fp) as v:
        assert v.fingerprint == fp
    for args, msg in ((("tiny", "v1", "sha256:x"), "expects sha256:x"),
                      (("tiny", "v2", ""), "not loaded on shard 0 of 2 \\(ready: tiny/v1\\)")):
        with pytest.raises(ServiceError, match=msg) as e, reg.acquire(*args):
            pass
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_unload_waits_for_in_flight_lookups(store: Path) -> None:
    reg = VersionRegistry(store, 0, 2, budget=1 << 30)
    reg.load("tiny", "v1")
    entered, release = threading.Event(), threading.Event()

    def lookup() -> None:
        with reg.acquire("tiny", "v1", "") as v:
            entered.set()
            release.wait(5)
            assert v.tables["unified"].segments[0].weights.sum() >= 0  # mapping still alive

    t = threading.Thread(target=lookup)
    t.start()
    entered.wait(5)
    result: list[object] = []
    u = threading.Thread(target=lambda: result.append(reg.unload("tiny", "v1", 5.0)))
    u.start()
    time.sleep(0.2)
    assert reg.snapshot()[0].state == "UNLOADING" and not result
    with pytest.raises(ServiceError, match="is UNLOADING"), reg.acquire("tiny", "v1", ""):
        pass
    release.set()
    t.join()
    u.join()
    assert result and reg.snapshot() == [] and reg.used_bytes() == 0
    assert reg.unload("tiny", "v1", 1.0).state == ""  # idempotent


def test_unload_drain_timeout_leaves_lookup_safe(store: Path) -> None:
    reg = VersionRegistry(store, 0, 2, budget=1 << 30)
    reg.load("tiny", "v2")
    with reg.acquire("tiny", "v2", "") as v:
        info = reg.unload("tiny", "v2", 0.05)
        assert info.in_flight == 1 and reg.snapshot() == []
        assert int(v.tables["cats"].segments[0].weights.sum()) > 0
