"""Version-aware routing (embedding_server.routing) against real shard servers.

Servers (started once per module, in parallel): 2 shards x 2 replicas of `tiny`; a0 and
a1 hold v1 and v2, b0 and b1 only v2 (a blue/green rollout half-way). Which replica
served is read from each server's own counters (embedding_rows_total,
embedding_errors_total on --metrics-port), never from the client.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from embedding_server.client import (
    EmbeddingClient,
    NoReplicaHoldsVersionError,
    SeqNotAppliedError,
)
from embedding_server.routing import NO_REPLICA_HOLDS_VERSION
from loadtest.harness.probes import metric_sum
from loadtest.harness.process import ServerProcess, start_all, stop_all
from modelpack.manifest import read_manifest
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg
from ranker_server.remote_tables import RemoteTables
from ranker_server.sources import PrepareError
from tests.helpers_store import tiny_version
from tests.integration.client_fleet import ROWS, file_rows, query, run_with, shard_server

TOKEN = "r0ute-t0ken"
NAMES = ("a0", "b0", "a1", "b1")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("store")
    tiny_version(store, "v1", seed=1)
    tiny_version(store, "v2", seed=3)
    (store / "token").write_text(TOKEN + "\n")
    return store


@pytest.fixture(scope="module")
def servers(store: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, ServerProcess]]:
    logs = tmp_path_factory.mktemp("logs")

    def replica(name: str) -> ServerProcess:
        held = ("tiny/v1", "tiny/v2") if name.startswith("a") else ("tiny/v2",)
        preload = [a for v in held for a in ("--preload", v)]
        return shard_server(store, logs, name, "--shard", name[1], "--num-shards", "2",
                            *preload, "--admin-token-file", str(store / "token"),
                            "--metrics-port", "0", "--grace-period", "20")

    procs = {n: replica(n) for n in NAMES}
    start_all(procs.values())
    yield procs
    stop_all(procs.values(), signal.SIGKILL)


def fp(store: Path, version: str) -> str:
    return read_manifest(store / "tiny" / version).fingerprint


def counters(servers: dict[str, ServerProcess], name: str) -> dict[str, float]:
    return {n: metric_sum(f"127.0.0.1:{s.metrics_port}", name) for n, s in servers.items()}


def admin(server: ServerProcess, method: str, version: str) -> None:
    with grpc.insecure_channel(server.address) as ch:
        stub = pbg.EmbeddingServiceStub(ch)  # type: ignore[no-untyped-call]
        req = (pb.UnloadVersionRequest if method == "UnloadVersion" else pb.LoadVersionRequest)(
            model="tiny", version=version)
        getattr(stub, method)(req, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=30)


def shards(servers: dict[str, ServerProcess]) -> list[list[str]]:
    return [[servers["a0"].address, servers["b0"].address],
            [servers["a1"].address, servers["b1"].address]]


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_lookups_go_only_to_replicas_holding_the_version_balanced_among_them(
        store: Path, servers: dict[str, ServerProcess], transport: str) -> None:
    rng = np.random.default_rng(0)
    batches = [np.unique(rng.integers(0, ROWS, 64)) for _ in range(12)]
    rows_before = counters(servers, "embedding_rows_total")
    errors_before = counters(servers, "embedding_errors_total")

    async def body(c: EmbeddingClient) -> tuple[dict[str, float], dict[str, float]]:
        await c.list_versions()  # what a ranker's prepare does: the table knows the fleet
        for b in batches:
            (got,) = await c.lookup("tiny", "v1", fp(store, "v1"), [query(b)])
            np.testing.assert_array_equal(got, file_rows(store, "tiny", "unified", b))
        after_v1 = counters(servers, "embedding_rows_total")
        for b in batches:
            await c.lookup("tiny", "v2", fp(store, "v2"), [query(b)])
        return after_v1, counters(servers, "embedding_rows_total")

    after_v1, after_v2 = run_with(shards(servers), body, transport=transport)
    for k in "01":  # v1: only a_k, and no replica had to refuse it
        assert after_v1[f"b{k}"] == rows_before[f"b{k}"]
        assert after_v1[f"a{k}"] > rows_before[f"a{k}"]
    assert counters(servers, "embedding_errors_total") == errors_before
    for k in "01":  # v2, held by both: balanced (round-robin) between them
        a, b = (after_v2[f"{r}{k}"] - after_v1[f"{r}{k}"] for r in "ab")
        assert 0.25 <= a / (a + b) <= 0.75, (k, a, b)


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_a_replica_unloading_the_version_mid_load_fails_no_lookup(
        store: Path, servers: dict[str, ServerProcess], transport: str) -> None:
    """b0 also holds v1; a0 unloads it under load (a blue/green step): its lookups fail over
    to b0, none fails, and after the refresh a0 is not asked v1 again."""
    admin(servers["b0"], "LoadVersion", "v1")
    failures: list[BaseException] = []
    done = 0

    async def worker(c: EmbeddingClient, until: float, seed: int) -> None:
        nonlocal done
        rng = np.random.default_rng(seed)
        while time.monotonic() < until:
            b = np.unique(rng.integers(0, ROWS, 32))
            try:
                (got,) = await c.lookup("tiny", "v1", fp(store, "v1"), [query(b)])
                np.testing.assert_array_equal(got, file_rows(store, "tiny", "unified", b))
                done += 1
            except Exception as e:
                failures.append(e)

    async def body(c: EmbeddingClient) -> tuple[float, float]:
        await c.list_versions()
        until = time.monotonic() + 0.9
        load = asyncio.gather(*(worker(c, until, s) for s in range(4)))
        await asyncio.sleep(0.25)
        await asyncio.to_thread(admin, servers["a0"], "UnloadVersion", "v1")
        await asyncio.sleep(0.2)  # refusals triggered a refresh; the periodic one also ran
        a0 = counters(servers, "embedding_rows_total")["a0"]
        await load
        return a0, counters(servers, "embedding_rows_total")["a0"]

    try:
        a0_after_unload, a0_at_end = run_with(shards(servers), body, transport=transport)
    finally:
        admin(servers["a0"], "LoadVersion", "v1")
        admin(servers["b0"], "UnloadVersion", "v1")
    assert failures == [] and done > 10
    assert a0_at_end == a0_after_unload  # the table knows: a0 no longer asked for v1


def test_no_holder_fails_at_once_with_its_own_reason(
        store: Path, servers: dict[str, ServerProcess]) -> None:
    async def body(c: EmbeddingClient) -> None:
        await c.list_versions()
        t0 = time.monotonic()
        with pytest.raises(NoReplicaHoldsVersionError) as e:
            await c.lookup("tiny", "v3", fp(store, "v1"), [query(np.arange(10))], 5.0)
        # At once: one ListVersions round, not the 5 s deadline (under 0.1 s on a quiet
        # machine; the bound leaves room for a busy 2-core CI box).
        assert time.monotonic() - t0 < 1.0
        assert e.value.reason == NO_REPLICA_HOLDS_VERSION and e.value.shard == 0
        assert "shard 0" in str(e.value) and "tiny/v3" in str(e.value)
        assert f"{servers['b0'].address}: v2 READY" in str(e.value)
        t0 = time.monotonic()  # held by every replica, readable by none at seq 3
        with pytest.raises(SeqNotAppliedError, match="tiny/v2 at delta seq 3"):
            await c.lookup("tiny", "v2", fp(store, "v2"), [query(np.arange(10))], 5.0, seq=3)
        assert time.monotonic() - t0 < 1.0

    run_with(shards(servers), body)


def test_the_rankers_prepare_rule_on_a_half_converted_fleet(
        store: Path, servers: dict[str, ServerProcess]) -> None:
    """Every replica (the default, in-place rollouts) refuses v1, which b0 and b1 lack; one
    per shard (blue/green) accepts it; v2, on every replica, passes both."""
    v1, v2 = (read_manifest(store / "tiny" / v) for v in ("v1", "v2"))

    async def main() -> None:
        remote = RemoteTables(shards(servers), 5.0, prepare_min_replicas=1)
        try:
            await remote.prepare(v1)
            with pytest.raises(PrepareError, match=rf"shard 0 replica {servers['b0'].address} "
                                                   r"does not hold tiny/v1"):
                await remote.prepare(v1, min_replicas=0)
            await remote.prepare(v2, min_replicas=0)
        finally:
            await remote.close()

    asyncio.run(main())
