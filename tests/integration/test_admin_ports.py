"""--admin-port (issue 11, finding 7): each server serves admin on a port of its own, so a
NetworkPolicy can let only the controller reach it; the data port refuses admin. The
controller drives a rollout through the admin ports named in its fleet file."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
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
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg
from tests.helpers_store import tiny_request, tiny_version

MODEL = "tiny"
TOKEN = "adm1n-t0ken"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with tiny v1 and v2, and the admin token file beside it (logs go there)."""
    root = tmp_path_factory.mktemp("fleet")
    (root / "token").write_text(TOKEN + "\n")
    for seed, version in enumerate(("v1", "v2"), start=1):
        tiny_version(root / "store", version, shards=1, seed=seed)
    return root / "store"


@pytest.fixture(scope="module")
def logs(store: Path) -> Path:
    return store.parent


@pytest.fixture(scope="module")
def ranker(store: Path, logs: Path) -> Iterator[ServerProcess]:
    with ServerProcess.module("ranker_server", "--store", str(store), "--model", "tiny",
                              "--version", "v1", "--device", "cpu", "--local-tables",
                              "--admin-token-file", str(logs / "token"), "--admin-port", "0",
                              log_dir=logs, name="ranker", ready=http_ready) as r:
        yield r


def test_ranker_admin_only_on_the_admin_port(ranker: ServerProcess) -> None:
    assert ranker.admin_port is not None and ranker.admin_port != ranker.port
    data, admin = f"http://127.0.0.1:{ranker.port}", f"http://127.0.0.1:{ranker.admin_port}"
    refused = httpx.get(f"{data}/admin/v1/versions", headers=AUTH, timeout=10)
    assert refused.status_code == 404, refused.text
    assert str(ranker.admin_port) in refused.json()["detail"]
    listed = httpx.get(f"{admin}/admin/v1/versions", headers=AUTH, timeout=10)
    assert listed.status_code == 200, listed.text
    assert httpx.get(f"{admin}/admin/v1/versions", timeout=10).status_code == 401
    loaded = httpx.post(f"{admin}/admin/v1/versions", headers=AUTH, json={"version": "v2"},
                        timeout=30)
    assert loaded.status_code == 200, loaded.text
    # The admin listener serves what the controller needs besides admin: /metrics (gates
    # scrape it) and /healthz; it is not a second data port.
    assert httpx.get(f"{admin}/metrics", timeout=10).status_code == 200
    assert httpx.get(f"{admin}/healthz", timeout=10).status_code == 200
    assert httpx.post(f"{admin}/v1/rank", json=tiny_request(2), timeout=10).status_code == 404
    ranked = httpx.post(f"{data}/v1/rank", json=tiny_request(2), timeout=10)
    assert ranked.status_code == 200, ranked.text


def _stub(channel: grpc.Channel) -> pbg.EmbeddingServiceStub:
    return pbg.EmbeddingServiceStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def shard(store: Path, logs: Path) -> Iterator[ServerProcess]:
    with ServerProcess.module("embedding_server", "--store", str(store), "--preload", "tiny/v1",
                              "--admin-token-file", str(logs / "token"), "--admin-port", "0",
                              log_dir=logs, name="shard", ready=grpc_serving) as s:
        yield s


def test_embedding_admin_only_on_the_admin_port(shard: ServerProcess) -> None:
    assert shard.admin_port is not None and shard.admin_port != shard.port
    meta = tuple(AUTH.items())
    with grpc.insecure_channel(f"127.0.0.1:{shard.port}") as data_ch, \
            grpc.insecure_channel(f"127.0.0.1:{shard.admin_port}") as admin_ch:
        data, admin = _stub(data_ch), _stub(admin_ch)
        with pytest.raises(grpc.RpcError) as refused:
            data.LoadVersion(pb.LoadVersionRequest(model="tiny", version="v2"), metadata=meta,
                             timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert str(shard.admin_port) in (refused.value.details() or "")
        with pytest.raises(grpc.RpcError) as refused:
            data.UnloadVersion(pb.UnloadVersionRequest(model="tiny", version="v1"),
                               metadata=meta, timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        info = admin.LoadVersion(pb.LoadVersionRequest(model="tiny", version="v2"),
                                 metadata=meta, timeout=30)
        assert info.version == "v2"
        for stub in (data, admin):  # rankers' prepare handshake reads it on the data port
            names = {(v.model, v.version) for v in
                     stub.ListVersions(pb.ListVersionsRequest(), timeout=10).versions}
            assert {("tiny", "v1"), ("tiny", "v2")} <= names


def test_embedding_admin_port_with_workers(store: Path, logs: Path) -> None:
    """--workers 2: every worker listens on the admin port (SO_REUSEPORT) and an admin call
    on it reaches both workers (their fan-out goes through their admin servers)."""
    meta = tuple(AUTH.items())
    with ServerProcess.module("embedding_server", "--store", str(store), "--preload", "tiny/v1",
                              "--admin-token-file", str(logs / "token"), "--admin-port", "0",
                              "--workers", "2", log_dir=logs, name="workers",
                              ready=grpc_serving) as s:
        assert s.admin_port is not None and s.admin_port != s.port
        with grpc.insecure_channel(f"127.0.0.1:{s.port}") as data_ch, \
                grpc.insecure_channel(f"127.0.0.1:{s.admin_port}") as admin_ch:
            data, admin = _stub(data_ch), _stub(admin_ch)
            with pytest.raises(grpc.RpcError) as refused:
                data.LoadVersion(pb.LoadVersionRequest(model="tiny", version="v2"),
                                 metadata=meta, timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            admin.LoadVersion(pb.LoadVersionRequest(model="tiny", version="v2"), metadata=meta,
                              timeout=30)
            for _ in range(8):  # whichever worker answers, it merged both workers' lists
                names = {(v.model, v.version) for v in
                         data.ListVersions(pb.ListVersionsRequest(), timeout=10).versions}
                assert ("tiny", "v2") in names


def test_embedding_admin_port_is_checked(store: Path) -> None:
    from embedding_server.config import ConfigError, config_from_args
    with pytest.raises(ConfigError, match="--admin-port 7001 is also --port"):
        config_from_args(["--store", str(store), "--port", "7001", "--admin-port", "7001"])


@pytest.fixture(scope="module")
def fleet(store: Path, logs: Path) -> Iterator[tuple[Path, ServerProcess]]:
    """A shard and a ranker using it, both with --admin-port, and the fleet file naming them."""
    auth = ("--admin-token-file", str(logs / "token"), "--admin-port", "0")
    with ServerProcess.module("embedding_server", "--store", str(store), "--preload",
                              f"{MODEL}/v1", *auth, log_dir=logs, name="fleet_shard",
                              ready=grpc_serving) as shard, \
            ServerProcess.module("ranker_server", "--store", str(store), "--model", MODEL,
                                 "--version", "v1", "--embedding-shards", shard.address,
                                 "--device", "cpu", *auth, log_dir=logs, name="fleet_ranker",
                                 ready=http_ready) as ranker:
        fleet_file = logs / "fleet.json"
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
    st = httpx.get(f"http://127.0.0.1:{ranker.admin_port}/admin/v1/versions",
                   headers=AUTH, timeout=10).json()
    assert st["active"] == "v2", st
    ranked = httpx.post(f"http://{ranker.address}/v1/rank", json=tiny_request(2), timeout=10)
    assert ranked.status_code == 200 and ranked.json()["version"] == "v2", ranked.text
