"""A ranker reaches shards that require a Lookup token (--lookup-token-file) with its own
--embedding-token-file; without the token its lookups are refused, never served."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from loadtest.harness.probes import grpc_serving, http_ready
from loadtest.harness.process import ServerProcess, start_all, stop_all
from tests.helpers_store import tiny_request, tiny_version

TOKEN = "l00kup-t0ken"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    store, logs = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("logs")
    tiny_version(store, "v1", shards=1, seed=1)
    (logs / "token").write_text(TOKEN + "\n")
    shard = ServerProcess.module("embedding_server", "--store", str(store), "--preload", "tiny/v1",
                                 "--lookup-token-file", str(logs / "token"), log_dir=logs,
                                 name="shard", ready=grpc_serving)
    with shard:
        common = ("--store", str(store), "--model", "tiny", "--version", "v1", "--device", "cpu",
                  "--embedding-shards", shard.address)
        rankers = {
            "with": ServerProcess.module("ranker_server", *common, "--embedding-token-file",
                                         str(logs / "token"), log_dir=logs, name="with_token",
                                         ready=http_ready),
            # ListVersions needs no token, so this one prepares and says ready; its lookups fail.
            "without": ServerProcess.module("ranker_server", *common, log_dir=logs,
                                            name="without_token", ready=http_ready),
        }
        start_all(rankers.values())
        yield rankers
        stop_all(rankers.values())


def test_the_token_reaches_the_shards(fleet: dict[str, ServerProcess]) -> None:
    body = tiny_request(4)
    ok = httpx.post(f"http://{fleet['with'].address}/v1/rank", json=body, timeout=10)
    assert ok.status_code == 200 and len(ok.json()["scores"]) == 4, ok.text
    refused = httpx.post(f"http://{fleet['without'].address}/v1/rank", json=body, timeout=10)
    assert refused.status_code == 502, refused.text
    assert "UNAUTHENTICATED" in refused.json()["detail"], refused.text
