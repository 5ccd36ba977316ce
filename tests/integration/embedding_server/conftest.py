"""The fleet every embedding-server test here shares, started once for the package, in parallel.

Shard 0 and shard 1 of 2 (admin token, v1 preloaded, a 20 kB memory budget that holds three
tiny versions per shard), and a second replica of shard 0 without an admin token.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from loadtest.harness.process import ServerProcess, start_all, stop_all
from protos import embedding_pb2_grpc as pbg
from tests.helpers_store import tiny_version
from tests.integration.embedding_server.fleet import (
    TOKEN,
    server,
    stub_of,
)


@pytest.fixture(scope="package")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    for i, v in enumerate(("v1", "v2", "v3", "v4", "bad"), start=1):
        tiny_version(root, v, seed=i)
    f = root / "tiny" / "bad" / "tables" / "unified" / "shard-0-of-2.bin"
    data = bytearray(f.read_bytes())
    data[100] ^= 0x10  # one flipped bit in shard 0's file
    f.write_bytes(bytes(data))
    return root


@pytest.fixture(scope="package")
def servers(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    logs = tmp_path_factory.mktemp("logs")
    (logs / "token").write_text(TOKEN + "\n")
    common = ("--num-shards", "2", "--preload", "tiny/v1", "--memory-budget", "20000",
              "--max-rows-per-request", "5000", "--grace-period", "20",
              "--max-tables-per-request", "3000")  # the overload test's heavy requests
    procs = {
        "s0": server(store, logs, "s0", "--shard", "0", *common, "--admin-token-file",
                      str(logs / "token"), "--metrics-port", "0"),
        "s1": server(store, logs, "s1", "--shard", "1", *common, "--admin-token-file",
                      str(logs / "token"), "--max-concurrent", "2"),
        "r0": server(store, logs, "r0", "--shard", "0", "--num-shards", "2", "--preload", "tiny/v1",
                      "--max-rows-per-request", "4000000", "--max-bags-per-request", "4000000",
                      "--max-response-bytes", str(1 << 30)),  # the deadline test's slow request
    }
    start_all(procs.values())
    yield procs
    stop_all(procs.values())


@pytest.fixture(scope="package")
def stubs(servers: dict[str, ServerProcess]) -> Iterator[dict[str, pbg.EmbeddingServiceStub]]:
    channels = {k: grpc.insecure_channel(s.address, options=[("grpc.max_receive_message_length", -1)])
                for k, s in servers.items()}
    yield {k: stub_of(ch) for k, ch in channels.items()}
    for ch in channels.values():
        ch.close()

