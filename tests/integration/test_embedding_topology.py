"""Serving topology is independent of the file layout: 1 and 3 servers over the 2-file demo store.

The demo store (small size) holds one table, "unified", exported in 2 files of 2000 rows.
A 1-server fleet serves both files; in a 3-server fleet shard 1 serves rows [1333, 2666),
which cross the file boundary at row 2000. Both fleets are real processes on free ports.
Expected values come from the files (modelpack.scorer.TableReader, modelpack.int4),
never from the server's code.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from embedding_server.client import EmbeddingClient
from loadtest.harness.probes import grpc_serving
from loadtest.harness.process import ServerProcess, start_all, stop_all
from modelpack.demo import DemoSize, build_demo_store
from modelpack.int4 import dequantize_rows
from modelpack.lookup import TableQuery
from modelpack.manifest import Manifest, read_manifest
from modelpack.scorer import TableReader
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg

MODEL, VERSION, ROWS, FILE_ROWS = "ads_ctr", "v1", 4000, 2000
FLEETS = (1, 3)
# Rows at every file and server boundary, both sides.
EDGES = np.array([0, 1, 1332, 1333, 1999, 2000, 2665, 2666, 3998, 3999], dtype=np.int64)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo_store")
    build_demo_store(root, DemoSize(rows=ROWS, requests=300, eval_requests=40, num_shards=2),
                     progress=False)
    return root


@pytest.fixture(scope="module")
def manifest(store: Path) -> Manifest:
    m = read_manifest(store / MODEL / VERSION)
    assert [(t.name, t.rows, t.num_shards) for t in m.tables] == [("unified", ROWS, 2)]
    return m


@pytest.fixture(scope="module")
def fleets(store: Path, manifest: Manifest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[dict[int, list[ServerProcess]]]:
    logs = tmp_path_factory.mktemp("topology_logs")
    procs = {n: [ServerProcess.module(
        "embedding_server", "--store", str(store), "--shard", str(k), "--num-shards", str(n),
        "--preload", f"{MODEL}/{VERSION}", log_dir=logs, name=f"s{k}of{n}",
        ready=lambda s: grpc_serving(s.address)) for k in range(n)] for n in FLEETS}
    start_all([s for fleet in procs.values() for s in fleet])
    yield procs
    stop_all([s for fleet in procs.values() for s in fleet])


def reader(store: Path, manifest: Manifest) -> TableReader:
    return TableReader(store / MODEL / VERSION, manifest.table("unified"))


def lookup_all(fleet: list[ServerProcess], manifest: Manifest, queries: list[TableQuery]
               ) -> list[npt.NDArray[np.generic]]:
    async def run() -> list[npt.NDArray[np.generic]]:
        client = EmbeddingClient([[s.address] for s in fleet], default_timeout_s=10.0)
        try:
            return await client.lookup(MODEL, VERSION, manifest.fingerprint, queries)
        finally:
            await client.close()
    return asyncio.run(run())


def close(got: npt.NDArray[np.generic], want: npt.NDArray[np.float64], output: str) -> bool:
    rel = 2.0**-10 if output == "fp16" else 1e-6  # one rounding to the output type
    return bool(np.all(np.abs(got.astype(np.float64) - want) <= np.abs(want) * rel + 1e-5))


def pooled_want(vals: npt.NDArray[np.float64], offsets: npt.NDArray[np.int64], mean: bool
                ) -> npt.NDArray[np.float64]:
    want = np.stack([vals[a:b].sum(0) if b > a else np.zeros(vals.shape[1])
                     for a, b in itertools.pairwise(offsets)])
    return want / np.maximum(np.diff(offsets), 1)[:, None] if mean else want


@pytest.mark.parametrize("n", FLEETS)
def test_fleet_serves_every_row_as_the_files_hold_it(store: Path, manifest: Manifest,
                                                     fleets: dict[int, list[ServerProcess]], n: int
                                                     ) -> None:
    dim = manifest.table("unified").dim
    rows = np.concatenate([EDGES, np.random.default_rng(n).integers(0, ROWS, 3000), EDGES[::-1]])
    queries = [TableQuery("unified", ROWS, dim, rows, output=o) for o in ("int4", "fp16", "fp32")]
    packed, fp16, fp32 = lookup_all(fleets[n], manifest, queries)
    want = reader(store, manifest).gather(rows)
    assert np.array_equal(packed, want)
    vals = dequantize_rows(want, dim).astype(np.float64)
    assert close(fp16, vals, "fp16") and close(fp32, vals, "fp32")


@pytest.mark.parametrize("n", FLEETS)
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_fleet_pools_bags_that_cross_files_and_servers(store: Path, manifest: Manifest,
                                                       fleets: dict[int, list[ServerProcess]],
                                                       n: int, pooling: str) -> None:
    dim = manifest.table("unified").dim
    rng = np.random.default_rng(10 + n)
    bags = [EDGES, np.array([1999, 2000]), np.array([], np.int64), rng.integers(0, ROWS, 40),
            np.array([2001, 5, 3999, 1998]), np.array([], np.int64)]
    rows = np.concatenate(bags).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum([b.size for b in bags])]).astype(np.int64)
    queries = [TableQuery("unified", ROWS, dim, rows, offsets, pooling, o) for o in ("fp16", "fp32")]
    got = lookup_all(fleets[n], manifest, queries)
    want = pooled_want(dequantize_rows(reader(store, manifest).gather(rows), dim).astype(np.float64),
                       offsets, pooling == "mean")
    assert close(got[0], want, "fp16") and close(got[1], want, "fp32")


@pytest.mark.parametrize(("n", "shard"), [(1, 0), (3, 1)])
@pytest.mark.parametrize("pooling", [pb.POOLING_SUM, pb.POOLING_MEAN])
@pytest.mark.parametrize("output", [pb.OUTPUT_FP16, pb.OUTPUT_FP32])
def test_one_server_pools_across_its_files(store: Path, manifest: Manifest,
                                           fleets: dict[int, list[ServerProcess]], n: int,
                                           shard: int, pooling: pb.Pooling, output: pb.Output
                                           ) -> None:
    """The server itself (not the client) combines a bag whose rows lie in both files."""
    dim = manifest.table("unified").dim
    lengths = np.array([0, 2, 6, 1, 0, 30, 3])
    lo, hi = (0, ROWS) if n == 1 else (1333, 2666)
    rows = np.random.default_rng(shard).integers(lo, hi, lengths.sum())
    rows[1:3] = [FILE_ROWS - 1, FILE_ROWS]  # bag 1: exactly the two rows around the boundary
    rows[3] = FILE_ROWS  # bag 2 starts in file 1
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    req = pb.LookupRequest(model=MODEL, version=VERSION, tables=[pb.TableLookup(
        table="unified", rows=rows.astype("<i8").tobytes(), offsets=offsets.astype("<i8").tobytes(),
        pooling=pooling, output=output)])
    with grpc.insecure_channel(fleets[n][shard].address) as ch:
        res = pbg.EmbeddingServiceStub(ch).Lookup(req, timeout=10).results[0]  # type: ignore[no-untyped-call]
    dtype = np.float16 if output == pb.OUTPUT_FP16 else np.float32
    got = np.frombuffer(res.data, dtype).reshape(-1, dim)
    want = pooled_want(dequantize_rows(reader(store, manifest).gather(rows), dim).astype(np.float64),
                       offsets, pooling == pb.POOLING_MEAN)
    assert res.count == lengths.size
    assert close(got, want, "fp16" if output == pb.OUTPUT_FP16 else "fp32")
    assert not got[lengths == 0].any()


@pytest.mark.parametrize("n", FLEETS)
def test_each_server_maps_and_counts_exactly_its_rows(manifest: Manifest,
                                                      fleets: dict[int, list[ServerProcess]], n: int
                                                      ) -> None:
    row_bytes = manifest.table("unified").row_bytes
    for k, s in enumerate(fleets[n]):
        with grpc.insecure_channel(s.address) as ch:
            r = pbg.EmbeddingServiceStub(ch).ListVersions(pb.ListVersionsRequest(), timeout=5)  # type: ignore[no-untyped-call]
        (v,) = r.versions
        assert v.state == pb.VERSION_STATE_READY and v.fingerprint == manifest.fingerprint
        lo, hi = k * ROWS // n, (k + 1) * ROWS // n
        assert v.bytes == r.memory_used_bytes == (hi - lo) * row_bytes


def test_a_row_outside_the_server_range_names_the_range(fleets: dict[int, list[ServerProcess]]
                                                        ) -> None:
    req = pb.LookupRequest(model=MODEL, version=VERSION, tables=[pb.TableLookup(
        table="unified", rows=np.array([2000, 2666], "<i8").tobytes())])
    with grpc.insecure_channel(fleets[3][1].address) as ch, pytest.raises(grpc.RpcError) as e:
        pbg.EmbeddingServiceStub(ch).Lookup(req, timeout=10)  # type: ignore[no-untyped-call]
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "row 2666 (rows[1]) is outside shard 1 of 3's range [1333, 2666)" in e.value.details()
