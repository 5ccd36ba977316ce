"""The controller's real fleet clients against real servers: the admin contracts of the
ranker (HTTP) and the embedding shards (gRPC), and one executor run over them.

Tiny stores (tests.helpers_store) keep it fast; the whole-stack run with the demo store
and load is tests/e2e/test_rollout.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from deploy_controller.config import ControllerConfig
from deploy_controller.discovery import LocalDiscovery, Topology
from deploy_controller.executor import Executor
from deploy_controller.fleet import FleetError, RemoteFleet
from deploy_controller.gates import parse_metrics
from deploy_controller.journal import Journal
from deploy_controller.state import Status
from loadtest.harness.probes import grpc_serving, http_ready
from loadtest.harness.process import ServerProcess, start_all
from modelpack.manifest import parse_manifest, write_manifest
from tests.helpers_store import tiny_version

MODEL = "tiny"
TOKEN = "integration-token"


@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Topology, Path]]:
    d = tmp_path_factory.mktemp("fleet")
    store = d / "store"
    for i, v in enumerate(("v1", "v2", "v3"), start=1):
        tiny_version(store, v, seed=i)
    bad = store / MODEL / "bad"
    shutil.copytree(store / MODEL / "v3", bad)
    write_manifest(bad, replace(parse_manifest(json.loads((bad / "manifest.json").read_text())),
                                version="bad"))
    f = bad / "tables" / "unified" / "shard-1-of-2.bin"
    data = bytearray(f.read_bytes())
    data[7] ^= 0x40
    f.write_bytes(bytes(data))
    (d / "token").write_text(TOKEN)
    shards = [ServerProcess.module(
        "embedding_server", "--store", str(store), "--shard", str(k), "--num-shards", "2",
        "--preload", f"{MODEL}/v1", "--admin-token-file", str(d / "token"),
        log_dir=d, name=f"shard{k}", ready=grpc_serving) for k in range(2)]
    start_all(shards)
    ranker = ServerProcess.module(
        "ranker_server", "--store", str(store), "--model", MODEL, "--version", "v1",
        "--embedding-shards", ",".join(s.address for s in shards), "--device", "cpu",
        "--admin-token-file", str(d / "token"), log_dir=d, name="ranker", ready=http_ready)
    try:
        ranker.start().wait_ready()
        yield (Topology((f"http://{ranker.address}",), tuple((s.address,) for s in shards)), d)
    finally:
        if ranker.proc is not None:
            ranker.stop()
        for s in shards:
            s.stop(signal.SIGTERM)


def _fleet(topo: Topology, token: str = TOKEN) -> RemoteFleet:
    from deploy_controller.discovery import StaticDiscovery

    return RemoteFleet(StaticDiscovery(topo), token, http_timeout_s=30, grpc_timeout_s=60)


def test_admin_contracts(topo: tuple[Topology, Path]) -> None:
    t, _ = topo
    (url,) = t.rankers
    addrs = [a for _, a in t.replicas()]

    async def go() -> None:
        f = _fleet(t)
        try:
            st = await f.ranker_status(url)
            assert (st.model, st.active, st.split) == (MODEL, "v1", {"v1": 1.0})
            await f.ranker_load(url, "v2")
            await f.ranker_load(url, "v2")  # idempotent
            assert (await f.ranker_status(url)).get("v2") is not None
            with pytest.raises(FleetError) as e:
                await f.ranker_prepare(url, "v2")  # shards do not hold v2 yet
            assert e.value.status == 409 and e.value.retryable
            for a in addrs:
                fit = await f.shard_check_fit(a, MODEL, "v2")
                assert fit.fits and fit.required_bytes > 0
                sv = await f.shard_load(a, MODEL, "v2")
                assert sv.state == "ready" and sv.fingerprint.startswith("sha256:")
            await f.ranker_prepare(url, "v2")
            assert (await f.ranker_status(url)).servable("v2")
            await f.ranker_split(url, {"v1": 0.5, "v2": 0.5})
            assert (await f.ranker_status(url)).split == {"v1": 0.5, "v2": 0.5}
            scrape = parse_metrics(await f.ranker_metrics(url))
            assert scrape.mismatch == 0
            with pytest.raises(FleetError) as e:
                await f.ranker_unload(url, "v2", 1.0)  # still has traffic
            assert e.value.status == 409
            await f.ranker_activate(url, "v1")
            await f.ranker_unload(url, "v2", 5.0)
            await f.ranker_unload(url, "v2", 5.0)  # already gone: fine
            for a in addrs:
                await f.shard_unload(a, MODEL, "v2", 5.0)
                assert await f.shard_unload(a, MODEL, "v2", 5.0) is not None
                assert {v.version for v in await f.shard_versions(a, MODEL)} == {"v1"}
            with pytest.raises(FleetError) as e:
                await f.ranker_load(url, "v404")
            assert e.value.status == 404 and not e.value.retryable
        finally:
            await f.close()

    asyncio.run(go())


def test_wrong_token_is_refused_not_retried(topo: tuple[Topology, Path]) -> None:
    t, _ = topo

    async def go() -> None:
        f = _fleet(t, token="wrong")
        try:
            with pytest.raises(FleetError) as e:
                await f.ranker_status(t.rankers[0])
            assert e.value.status == 401 and not e.value.retryable
            with pytest.raises(FleetError) as e:
                await f.shard_load(t.shards[0][0], MODEL, "v2")
            assert "UNAUTHENTICATED" in str(e.value) and not e.value.retryable
        finally:
            await f.close()

    asyncio.run(go())


def _run(t: Topology, d: Path, to: str, name: str) -> tuple[Status, str]:
    fleet_file = d / f"{name}.json"
    fleet_file.write_text(json.dumps(t.to_json()))
    cfg = ControllerConfig(gate_interval_s=0.05, retry_backoff_s=0.05, default_bake_s=0.1)
    journal = Journal(d / f"{name}.sqlite")

    async def go() -> tuple[Status, str]:
        f = RemoteFleet(LocalDiscovery(fleet_file), TOKEN)
        try:
            r = journal.create(MODEL, "v1", to, [50, 100], 0.1)
            done = await Executor(journal, f, cfg).run(r.id)
            return done.status, done.reason_code
        finally:
            await f.close()

    return asyncio.run(go())


def test_executor_rolls_back_a_corrupt_version_on_real_servers(topo: tuple[Topology, Path]
                                                               ) -> None:
    t, d = topo
    status, code = _run(t, d, "bad", "bad")
    assert (status, code) == (Status.ROLLED_BACK, "shard_load_failed")
    httpx.get(f"{t.rankers[0]}/healthz").raise_for_status()


def test_executor_moves_real_servers_and_back(topo: tuple[Topology, Path]) -> None:
    t, d = topo
    assert _run(t, d, "v3", "fwd") == (Status.SUCCEEDED, "")
    headers = {"authorization": f"Bearer {TOKEN}"}
    st = httpx.get(f"{t.rankers[0]}/admin/v1/versions", headers=headers).json()
    assert st["active"] == "v3" and [v["version"] for v in st["versions"]] == ["v3"]
