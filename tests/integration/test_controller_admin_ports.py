"""The controller drives a rollout through the servers' admin ports (--admin-port): the
fleet file names each server's data and admin address, and the controller uses admin."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deploy_controller.config import ControllerConfig
from deploy_controller.discovery import LocalDiscovery
from deploy_controller.executor import Executor
from deploy_controller.fleet import RemoteFleet
from deploy_controller.journal import Journal
from deploy_controller.state import Status
from loadtest.harness.probes import grpc_serving, http_ready
from loadtest.harness.process import ServerProcess
from tests.helpers_store import tiny_request, tiny_version

MODEL = "tiny"
TOKEN = "adm1n-ports"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, ServerProcess]]:
    d = tmp_path_factory.mktemp("fleet")
    store = d / "store"
    tiny_version(store, "v1", shards=1, seed=1)
    tiny_version(store, "v2", shards=1, seed=2)
    (d / "token").write_text(TOKEN)
    auth = ("--admin-token-file", str(d / "token"), "--admin-port", "0")
    with ServerProcess.module("embedding_server", "--store", str(store), "--preload",
                              f"{MODEL}/v1", *auth, log_dir=d, name="shard",
                              ready=grpc_serving) as shard, \
            ServerProcess.module("ranker_server", "--store", str(store), "--model", MODEL,
                                 "--version", "v1", "--embedding-shards", shard.address,
                                 "--device", "cpu", *auth, log_dir=d, name="ranker",
                                 ready=http_ready) as ranker:
        fleet_file = d / "fleet.json"
        fleet_file.write_text(json.dumps({
            "rankers": [{"data": f"http://{ranker.address}",
                         "admin": f"http://127.0.0.1:{ranker.admin_port}"}],
            "embedding_shards": [[{"data": shard.address,
                                   "admin": f"127.0.0.1:{shard.admin_port}"}]]}))
        yield fleet_file, ranker


def test_rollout_through_admin_ports(fleet: tuple[Path, ServerProcess]) -> None:
    fleet_file, ranker = fleet
    topo = asyncio.run(LocalDiscovery(fleet_file).topology())
    assert topo.rankers == (f"http://127.0.0.1:{ranker.admin_port}",)
    cfg = ControllerConfig(gate_interval_s=0.05, retry_backoff_s=0.05, default_bake_s=0.1)
    journal = Journal(fleet_file.with_suffix(".sqlite"))

    async def go() -> tuple[Status, str]:
        f = RemoteFleet(LocalDiscovery(fleet_file), TOKEN)
        try:
            r = journal.create(MODEL, "v1", "v2", [50, 100], 0.1)
            done = await Executor(journal, f, cfg).run(r.id)
            return done.status, done.reason_code
        finally:
            await f.close()

    assert asyncio.run(go()) == (Status.SUCCEEDED, "")
    headers = {"authorization": f"Bearer {TOKEN}"}
    st = httpx.get(f"http://127.0.0.1:{ranker.admin_port}/admin/v1/versions",
                   headers=headers, timeout=10).json()
    assert st["active"] == "v2", st
    ranked = httpx.post(f"http://{ranker.address}/v1/rank", json=tiny_request(2), timeout=10)
    assert ranked.status_code == 200 and ranked.json()["version"] == "v2", ranked.text
