"""embedding_server.table_store and .versions: planning, verified zero-copy maps, states."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from embedding_server.errors import ServiceError
from embedding_server.table_store import StoreError, open_version, plan_version
from embedding_server.versions import VersionRegistry
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


def test_open_maps_the_files_read_only_without_copying(store: Path) -> None:
    v = open_version(plan_version(store, "tiny", "v1", 1, 2))
    for name, file in (("unified", "unified/shard-1-of-2.bin"), ("cats", "cats/shard-0-of-1.bin")):
        t = v.tables[name]
        line = _mapping_of(t.weights.data_ptr())
        assert line.endswith(file) and line.split()[1].startswith("r--s"), line
        assert t.kernel.weights.data_ptr() == t.weights.data_ptr()
        raw = np.fromfile(store / "tiny" / "v1" / "tables" / file, np.uint8).reshape(-1, 12)
        first = t.start - (0 if name == "cats" else 500)
        assert np.array_equal(t.weights.numpy(), raw[first:first + t.stop - t.start])
    assert v.nbytes == 500 * 12 + 19 * 12


def test_refusals_name_the_problem(store: Path) -> None:
    with pytest.raises(StoreError, match="no such version"):
        plan_version(store, "tiny", "v9", 0, 2)
    with pytest.raises(StoreError, match="invalid version name"):
        plan_version(store, "tiny", "..", 0, 2)
    with pytest.raises(StoreError, match=r"stored in 4 files.*spans more than one"):
        plan_version(store, "tiny", "v4", 0, 3)
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
            assert v.tables["unified"].weights.sum() >= 0  # mapping still alive

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
        assert int(v.tables["cats"].weights.sum()) > 0
