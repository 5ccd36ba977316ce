"""A ranker reading delta seqs from real shards: exact scores at the seq it names, a
replica that cannot read the seq never answers it (routed away or failed over), a seq that no
replica can read refused 503 seq_not_applied, never served from other rows.

Processes: replicas r0 and r1 of the one shard of tiny/v1, whose store holds deltas
1..3. r0 applies deltas 1 then 2 (readable: 1, 2); r1 applies only 1 (readable: 0, 1);
no replica applies 3. The ranker runs in this process on them.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from loadtest.harness.probes import grpc_serving
from loadtest.harness.process import ServerProcess, start_all, stop_all
from modelpack.delta_write import write_delta
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg
from ranker_server.config import RankerConfig
from ranker_server.inprocess import serve_in_process
from tests.helpers_store import tiny_request, tiny_version
from tests.unit.test_ranker_deltas import offline_at

TOKEN = "delta-t0ken"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def delta_store(root: Path, token: str, deltas: list[dict[str, npt.NDArray[np.int64]]], *,
                seed: int) -> Path:
    """tiny/v1 under `root` with one delta per entry of `deltas` (its rows per table, new
    random values), and the admin token in root/token."""
    tiny_version(root, "v1", seed=seed)
    rng = np.random.default_rng(seed + 2)
    for rows in deltas:
        write_delta(root / "tiny" / "v1", {
            t: (r, 2 * rng.standard_normal((r.size, 16)).astype(np.float32))
            for t, r in rows.items()})
    (root / "token").write_text(token + "\n")
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    every = {"unified": np.arange(1000), "cats": np.arange(37)}
    # every row replaced each time: each seq scores differently
    return delta_store(tmp_path_factory.mktemp("store"), TOKEN, [every] * 3, seed=1)


def _apply(shard: ServerProcess, seq: int) -> pb.VersionInfo:
    with grpc.insecure_channel(shard.address) as ch:
        info: pb.VersionInfo = pbg.EmbeddingServiceStub(ch).ApplyDeltas(  # type: ignore[no-untyped-call]
            pb.ApplyDeltasRequest(model="tiny", version="v1", seq=seq),
            metadata=[("authorization", f"Bearer {TOKEN}")], timeout=30)
    return info


@pytest.fixture(scope="module")
def replicas(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    logs = tmp_path_factory.mktemp("logs")

    def replica(name: str) -> ServerProcess:
        return ServerProcess.module(
            "embedding_server", "--store", str(store), "--shard", "0", "--num-shards", "1",
            "--preload", "tiny/v1", "--admin-token-file", str(store / "token"),
            log_dir=logs, name=name, ready=grpc_serving)

    r0, r1 = procs = start_all([replica("r0"), replica("r1")])
    try:
        assert [_apply(r0, seq).applied_seq for seq in (1, 2)] == [1, 2]
        assert list(_apply(r1, 1).readable_seqs) == [0, 1]
        assert list(_apply(r1, 1).readable_seqs) == [0, 1]  # idempotent
        yield [r0.address, r1.address]
    finally:
        stop_all(procs, signal.SIGKILL)


def test_scores_at_the_seq_named_and_seq_not_applied(store: Path, replicas: list[str]) -> None:
    reqs = [tiny_request(3 + i % 4, seed=i) for i in range(10)]
    config = RankerConfig(store=store, model="tiny", version="v1", device="cpu",
                          embedding_shards=(tuple(replicas),), admin_token_file=store / "token")

    async def main() -> None:
        async with serve_in_process(config, wait_ready=True) as (client, state):
            async def at(seq: int) -> list[Any]:
                r = await client.put("/admin/v1/versions/v1/seq", json={"seq": seq},
                                     headers=AUTH)
                assert r.status_code == 200, r.text
                # One at a time: a batch each, so the lookups take turns on the replicas.
                return [await client.post("/v1/rank", json=q) for q in reqs]

            sample = state.metrics.registry.get_sample_value
            for seq in (2, 1):  # an advance, then a revert; r1 cannot read 2
                scorer = offline_at(store / "tiny" / "v1", seq)
                for q, a in zip(reqs, await at(seq), strict=True):
                    assert a.status_code == 200, a.text
                    assert a.json()["seq"] == seq
                    np.testing.assert_allclose(a.json()["scores"], scorer.score(q),
                                               atol=2e-3, rtol=0)
            for a in await at(3):  # in the store, applied by no replica
                assert a.status_code == 503 and a.json()["reason"] == "seq_not_applied", a.text
                assert "delta seq 3" in a.json()["detail"] and a.headers["retry-after"] == "1"
            assert sample("ranker_errors_total", {"reason": "seq_not_applied"}) == len(reqs)

    asyncio.run(main())
