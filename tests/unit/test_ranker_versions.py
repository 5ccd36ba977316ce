"""The ranker's version registry: states, split rules, pinning by share, in-flight counts."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from torch import nn

from modelpack.manifest import Manifest
from ranker_server.errors import AdminError, RankError
from ranker_server.metrics import Metrics
from ranker_server.versions import LoadedVersion, VersionRegistry
from tests.helpers_store import tiny_version


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Manifest]:
    store = tmp_path_factory.mktemp("store")
    return {v: tiny_version(store, v, seed=i) for i, v in enumerate(("v1", "v2", "v3"))}


def _registry(manifests: dict[str, Manifest], prepared: tuple[str, ...] = ("v1", "v2")
              ) -> VersionRegistry:
    reg = VersionRegistry("tiny", Metrics(), rng=random.Random(7))
    for v, m in manifests.items():
        reg.add(LoadedVersion(manifest=m, path=Path(v), dense=nn.Identity(),
                              prepared=v in prepared))
    return reg


def test_states_and_activation(manifests: dict[str, Manifest]) -> None:
    reg = _registry(manifests)
    assert [reg.state(lv) for lv in reg.versions.values()] == ["prepared", "prepared", "loaded"]
    with pytest.raises(RankError) as e:
        reg.acquire()
    assert e.value.status == 503 and e.value.reason == "no_active_version"
    with pytest.raises(AdminError) as a:
        reg.activate("v3")
    assert a.value.status == 409 and "prepare" in a.value.message
    with pytest.raises(AdminError) as a:
        reg.activate("v9")
    assert a.value.status == 404
    reg.activate("v1")
    assert reg.active == "v1" and reg.split == {"v1": 1.0}
    listing = reg.listing()
    assert listing["model"] == "tiny" and listing["active"] == "v1"
    assert [v["state"] for v in listing["versions"]] == ["active", "prepared", "loaded"]
    assert set(listing["versions"][0]) == {"version", "fingerprint", "state", "traffic_share",
                                           "in_flight", "requests_total", "seq",
                                           "delta_fingerprint", "delta_written_at"}


@pytest.mark.parametrize("split, status", [
    ({}, 422),
    ({"v1": 0.5, "v2": 0.4}, 422),
    ({"v1": 1.5, "v2": -0.5}, 422),
    ({"v1": "1"}, 422),
    ({"v1": True}, 422),
    ({"v1": float("nan")}, 422),
    ({"v1": 0.5, "v3": 0.5}, 409),  # v3 is not prepared
    ({"v1": 1.0, "v3": 0.0}, 409),  # named at all: must be prepared
    ({"v1": 0.5, "v9": 0.5}, 409),
])
def test_bad_splits_are_refused(manifests: dict[str, Manifest], split: dict[str, float],
                                status: int) -> None:
    reg = _registry(manifests)
    reg.activate("v1")
    with pytest.raises(AdminError) as e:
        reg.set_split(split)
    assert e.value.status == status
    assert reg.split == {"v1": 1.0}  # unchanged


def test_split_routes_by_share_and_the_leader_is_active(manifests: dict[str, Manifest]) -> None:
    reg = _registry(manifests)
    reg.activate("v1")
    reg.set_split({"v1": 0.9, "v2": 0.1 + 1e-9})
    assert reg.active == "v1"
    n = 20_000
    leases = [reg.acquire() for _ in range(n)]
    canary = sum(lease.version.version == "v2" for lease in leases)
    assert abs(canary / n - 0.1) < 4.5 * (0.1 * 0.9 / n) ** 0.5
    assert reg.versions["v2"].in_flight == canary
    for lease in leases:
        lease.release()
        lease.release()  # idempotent
    assert reg.versions["v1"].in_flight == reg.versions["v2"].in_flight == 0
    reg.set_split({"v1": 0.3, "v2": 0.7})
    assert reg.active == "v2"
    reg.set_split({"v1": 0.5, "v2": 0.5})
    assert reg.active == "v2"  # a tie keeps the current leader
    reg.set_split({"v1": 1.0, "v2": 0.0})
    assert reg.split == {"v1": 1.0} and reg.active == "v1"


def test_pinning_by_name(manifests: dict[str, Manifest]) -> None:
    reg = _registry(manifests)
    reg.activate("v1")
    assert reg.acquire("v2").version.version == "v2"  # prepared, no share: still pinnable
    for bad in ("v3", "v9"):
        with pytest.raises(RankError) as e:
            reg.acquire(bad)
        assert (e.value.status, e.value.field) == (404, "version")


def test_idle_event_follows_in_flight(manifests: dict[str, Manifest]) -> None:
    async def run() -> None:
        reg = _registry(manifests)
        reg.activate("v1")
        lv = reg.versions["v1"]
        lease = reg.acquire()
        assert not lv.idle.is_set()
        waiter = asyncio.create_task(lv.idle.wait())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        lease.release()
        await asyncio.wait_for(waiter, 1)

    asyncio.run(run())


def test_a_lease_is_released_once_by_its_one_owner(manifests: dict[str, Manifest]) -> None:
    reg = _registry(manifests)
    reg.activate("v1")
    lv = reg.versions["v1"]
    with pytest.raises(RankError), reg.acquire() as lease:  # the handler's block: refused
        raise RankError(422, "invalid_request", "x")
    assert lv.in_flight == 0
    with reg.acquire() as lease:
        moved = lease.take()  # submitted: the batcher owns it now
    assert lv.in_flight == 1  # leaving the handler's block released nothing
    with pytest.raises(RuntimeError):
        lease.take()  # a lease cannot be handed over twice
    moved.release()
    moved.release()
    assert lv.in_flight == 0 and lv.idle.is_set()
