"""The controller's real fleet clients against real servers: the admin contracts of the
ranker (HTTP) and the embedding shards (gRPC), one executor run over them, and a delta
stream (advance, revert, a corrupt delta refused) over them.

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
from typing import Any

import httpx
import numpy as np
import pytest

from deploy_controller.config import ControllerConfig
from deploy_controller.controller import Controller
from deploy_controller.discovery import LocalDiscovery, Topology
from deploy_controller.errors import ControllerError
from deploy_controller.executor import Executor
from deploy_controller.fleet import FleetError, RemoteFleet
from deploy_controller.gates import parse_metrics
from deploy_controller.journal import Journal
from deploy_controller.state import Status
from loadtest.harness.probes import grpc_serving, http_ready
from loadtest.harness.process import ServerProcess, start_all
from modelpack import desired
from modelpack.delta_write import write_delta
from modelpack.manifest import parse_manifest, write_manifest
from tests.helpers_store import tiny_version
from tests.unit.delta_helpers import update

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


def test_delta_stream_on_real_servers(topo: tuple[Topology, Path]) -> None:
    """Deltas of the serving version: every shard applies before the ranker moves, revert,
    a corrupt delta pauses the stream; the ranker's and shards' own listings show it."""
    t, d = topo
    store = d / "store"
    headers = {"authorization": f"Bearer {TOKEN}"}
    (url,) = t.rankers
    active = httpx.get(f"{url}/admin/v1/versions", headers=headers).json()["active"]
    rng = np.random.default_rng(7)
    for _ in range(3):
        write_delta(store / MODEL / active, {"unified": update(rng)})
    fleet_file = d / "delta-fleet.json"
    fleet_file.write_text(json.dumps(t.to_json()))
    cfg = ControllerConfig(store=store, journal=d / "delta.sqlite", delta_poll_s=0.0,
                           delta_gate_s=0.2, gate_interval_s=0.05, retry_backoff_s=0.05,
                           reconcile_interval_s=0.0, desired_state=d / "delta-desired.json")

    def seqs(st: dict[str, Any]) -> tuple[int, list[list[int]]]:
        """The ranker's seq of the version (its own listing) and each replica's readable."""
        ranker = next(v["seq"] for v in httpx.get(f"{url}/admin/v1/versions",
                                                  headers=headers).json()["versions"]
                      if v["version"] == active)
        return ranker, [r["readable_seqs"] for r in st["replicas"]]

    async def go() -> None:
        f = RemoteFleet(LocalDiscovery(fleet_file), TOKEN, http_timeout_s=30, grpc_timeout_s=60)
        c = Controller(cfg, Journal(cfg.journal), f)
        await c.start()
        try:
            op = await c.deltas.wait((await c.deltas.advance(MODEL, 2)).id)
            assert op.status == "committed", op.reason
            assert seqs(await c.deltas.status(MODEL)) == (2, [[0, 2], [0, 2]])
            assert desired.read(cfg.desired_state_path())[MODEL].deltas == {active: 2}
            op = await c.deltas.wait((await c.deltas.revert(MODEL, 1, "test")).id)
            assert op.status == "committed", op.reason
            st = await c.deltas.status(MODEL)
            assert seqs(st) == (1, [[1, 2], [1, 2]])
            assert st["state"] == "paused" and st["paused"] == "operator"
            # Delta 3 flipped on disk: refused naming it, the stream paused at the last good.
            data = store / MODEL / active / "deltas" / "3" / "tables" / "unified" / "rows.int4"
            raw = bytearray(data.read_bytes())
            raw[3] ^= 0x10
            data.write_bytes(bytes(raw))
            await c.deltas.resume(MODEL)
            op = await c.deltas.wait((await c.deltas.advance(MODEL)).id)
            assert (op.status, op.to_seq) == ("committed", 2), op.reason
            with pytest.raises(ControllerError, match=f"{MODEL}/{active} delta 3"):
                await c.deltas.advance(MODEL)
            st = await c.deltas.status(MODEL)
            assert st["paused"] == "refused" and st["committed_seq"] == 2
            # The shard refuses it too (its own verification), and still reads 2.
            with pytest.raises(FleetError) as e:
                await f.shard_apply_deltas(t.shards[0][0], MODEL, active, 3, "")
            assert e.value.reason == "delta_refused" and "delta 3" in e.value.message
            assert seqs(await c.deltas.status(MODEL)) == (2, [[1, 2], [1, 2]])
        finally:
            await c.stop()
            await f.close()

    asyncio.run(go())
