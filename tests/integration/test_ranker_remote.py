"""A ranker on real shards tells "this shard does not hold the version" from "this shard
holds another build of it": version_not_loaded vs version_mismatch, each with its own
count, and the mismatch alarm fires only for the second.

Processes: shards s0, s1 (2 of `tiny/v1`; s1 over a copy of the store it can be made to
swap builds in) and a ranker on them. s1 first unloads v1 (not loaded), then loads
another build published under the same name v1 (mismatch).
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from loadtest.harness.probes import grpc_serving, http_ready, metric_sum
from loadtest.harness.process import ServerProcess, start_all, stop_all
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg
from tests.helpers_store import tiny_request, tiny_version

TOKEN = "admin-t0ken"
N = 6  # requests per phase


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stores main, copy (s1's, at first the same) and other (another build of tiny/v1)."""
    root = tmp_path_factory.mktemp("stores")
    tiny_version(root / "main", "v1", seed=1)
    shutil.copytree(root / "main", root / "copy")
    tiny_version(root / "other", "v1", seed=2)
    return root


@pytest.fixture(scope="module")
def fleet(root: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[dict[str, ServerProcess]]:
    logs = tmp_path_factory.mktemp("logs")
    (logs / "token").write_text(TOKEN + "\n")

    def shard(store: str, k: int) -> ServerProcess:
        return ServerProcess.module(
            "embedding_server", "--store", str(root / store), "--shard", str(k), "--num-shards",
            "2", "--preload", "tiny/v1", "--admin-token-file", str(logs / "token"),
            log_dir=logs, name=f"s{k}", ready=grpc_serving)

    shards = start_all([shard("main", 0), shard("copy", 1)])
    try:
        ranker = ServerProcess.module(
            "ranker_server", "--store", str(root / "main"), "--model", "tiny", "--version", "v1",
            "--device", "cpu", "--embedding-shards", ",".join(s.address for s in shards),
            log_dir=logs, name="ranker", ready=http_ready)
        with ranker:
            yield {"s0": shards[0], "s1": shards[1], "ranker": ranker}
    finally:
        stop_all(shards, signal.SIGKILL)


def _admin(shard: ServerProcess, method: str, version: str = "v1") -> pb.VersionInfo:
    with grpc.insecure_channel(shard.address) as ch:
        stub = pbg.EmbeddingServiceStub(ch)  # type: ignore[no-untyped-call]
        info: pb.VersionInfo = getattr(stub, method)(
            pb.UnloadVersionRequest(model="tiny", version=version) if method == "UnloadVersion"
            else pb.LoadVersionRequest(model="tiny", version=version),
            metadata=[("authorization", f"Bearer {TOKEN}")], timeout=30)
    return info


def _rank_all(ranker: ServerProcess) -> list[httpx.Response]:
    with httpx.Client(base_url=f"http://{ranker.address}", timeout=10) as c:
        return [c.post("/v1/rank", json=tiny_request(8, seed=i)) for i in range(N)]


def test_not_loaded_and_another_build_are_told_apart(root: Path,
                                                     fleet: dict[str, ServerProcess]) -> None:
    ranker, s1 = fleet["ranker"], fleet["s1"]
    assert [r.status_code for r in _rank_all(ranker)] == [200] * N
    requested = metric_sum(ranker, "ranker_lookup_rows_requested_total")
    assert 0 < metric_sum(ranker, "ranker_lookup_rows_unique_total") <= requested

    # s1 no longer holds v1: an ordinary state (a rollout's retire step, a restart), not the alarm.
    _admin(s1, "UnloadVersion")
    answers = _rank_all(ranker)
    assert [a.status_code for a in answers] == [503] * N
    for a in answers:
        assert a.json()["reason"] == "version_not_loaded", a.text
        assert "shard 1" in a.json()["detail"] and "tiny/v1" in a.json()["detail"]
        assert a.headers["retry-after"] == "1"
    assert metric_sum(ranker, 'ranker_errors_total{reason="version_not_loaded"}') == N
    assert metric_sum(ranker, "ranker_version_mismatch_total") == 0
    assert metric_sum(ranker, "ranker_version_not_loaded_total") == N

    # s1 loads another build under the same name: the real mismatch.
    (root / "copy" / "tiny" / "v1").rename(root / "copy-original-v1")
    shutil.copytree(root / "other" / "tiny" / "v1", root / "copy" / "tiny" / "v1")
    assert _admin(s1, "LoadVersion").state == pb.VERSION_STATE_READY
    answers = _rank_all(ranker)
    assert [a.status_code for a in answers] == [503] * N
    for a in answers:
        assert a.json()["reason"] == "version_mismatch", a.text
        assert "scores" not in a.json()
    assert metric_sum(ranker, "ranker_version_mismatch_total") == N
    assert metric_sum(ranker, "ranker_version_not_loaded_total") == N  # unchanged
    assert metric_sum(ranker, 'ranker_errors_total{reason="version_not_loaded"}') == N
