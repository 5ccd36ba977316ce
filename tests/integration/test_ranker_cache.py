"""The row cache on real shards: exact across a delta advance and a revert, and a batch
whose rows all hit makes no lookup at all.

Processes: one replica of the one shard of tiny/v1, deltas 1 and 2 applied (each touching
part of the rows), seqs 0..2 readable. Two rankers run in this process on it, one with
the cache and one without; every answer of the first must equal the second's bit for bit.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from loadtest.harness.probes import grpc_serving, metric_sum
from loadtest.harness.process import ServerProcess, start_all, stop_all
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg
from ranker_server.config import RankerConfig
from ranker_server.inprocess import serve_in_process
from tests.helpers_store import tiny_request
from tests.integration.test_ranker_deltas import delta_store

TOKEN = "cache-t0ken"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # part of the rows each: some entries survive each delta
    parts = [{"unified": np.arange(lo, hi), "cats": np.arange(0, 37, 2)}
             for lo, hi in ((0, 600), (300, 1000))]
    return delta_store(tmp_path_factory.mktemp("store"), TOKEN, parts, seed=2)


@pytest.fixture(scope="module")
def shard(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    (s,) = start_all([ServerProcess.module(
        "embedding_server", "--store", str(store), "--shard", "0", "--num-shards", "1",
        "--preload", "tiny/v1", "--admin-token-file", str(store / "token"),
        "--readable-seqs", "3", "--metrics-port", "0",
        log_dir=tmp_path_factory.mktemp("logs"), name="s0", ready=grpc_serving)])
    try:
        with grpc.insecure_channel(s.address) as ch:
            stub = pbg.EmbeddingServiceStub(ch)  # type: ignore[no-untyped-call]
            for seq in (1, 2):
                info = stub.ApplyDeltas(pb.ApplyDeltasRequest(model="tiny", version="v1", seq=seq),
                                        metadata=[("authorization", f"Bearer {TOKEN}")], timeout=30)
        assert list(info.readable_seqs) == [0, 1, 2]
        yield s
    finally:
        stop_all([s], signal.SIGKILL)


def test_cached_scores_equal_uncached_and_all_hits_skip_the_lookup(store: Path,
                                                                   shard: ServerProcess) -> None:
    reqs = [tiny_request(3 + i % 4, seed=i) for i in range(8)]
    base = RankerConfig(store=store, model="tiny", version="v1", device="cpu",
                        embedding_shards=((shard.address,),), admin_token_file=store / "token")
    cached = RankerConfig(**{**base.__dict__, "cache_bytes": 1 << 20})
    lookups = f"127.0.0.1:{shard.metrics_port}"

    async def main() -> None:
        async with serve_in_process(cached) as (on, state), serve_in_process(base) as (off, _):
            async def scores(client: Any) -> list[list[float]]:
                answers = [await client.post("/v1/rank", json=q) for q in reqs]
                assert all(a.status_code == 200 for a in answers), answers[0].text
                return [a.json()["scores"] for a in answers]

            for seq in (0, 2, 1):  # seq 0 fills the cache; an advance; a revert
                for c in (on, off):
                    r = await c.put("/admin/v1/versions/v1/seq", json={"seq": seq}, headers=AUTH)
                    assert r.status_code == 200, r.text
                assert await scores(on) == await scores(off), seq  # the same bits
            before = metric_sum(lookups, "embedding_lookup_duration_seconds_count")
            assert await scores(on) == await scores(off)  # seq 1 again: every row hits
            after = metric_sum(lookups, "embedding_lookup_duration_seconds_count")
            assert after - before == len(reqs)  # the cache-off ranker's lookups only
            st = (await on.get("/admin/v1/cache", headers=AUTH)).json()
            (v,) = st["versions"]
            assert st["enabled"] and v["version"] == "v1" and v["learned_seq"] == 2
            assert v["lookups_skipped"] == len(reqs) and v["invalidations"] > 0
            assert v["unique_hits"] > 0 and v["entries"] > 0
            assert state.cache is not None and state.cache.stats()["bytes"] <= 1 << 20
            off_st = (await off.get("/admin/v1/cache", headers=AUTH)).json()
            assert off_st == {"enabled": False}

    asyncio.run(main())
