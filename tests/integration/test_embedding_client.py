"""embedding_server.client against real servers: fan-out, merge and version checks.

Servers (started once per module, in parallel, on free ports):

- s0, s1: shards 0 and 1 of 2 of `tiny/v1` (seed 1);
- x1: shard 1 of 2 of another build published under the same name `tiny/v1` (seed 2),
  from a second store, so its fingerprint differs;
- n1: shard 1 of 2 holding no version at all.

The client's default transport is one LookupStream per replica; the tests of behaviour
that the two transports implement apart (fan-out, version refusals) run over unary
`Lookup` too. Failover and deadlines: test_embedding_client_failover.py.

Expected values always come from the shard files through numpy
(modelpack.int4.dequantize_rows), never from the server's or the client's code.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from embedding_server.client import (
    EmbeddingClient,
    VersionMismatchError,
    VersionNotLoadedError,
)
from loadtest.harness.process import ServerProcess, start_all, stop_all
from modelpack.hashing import shard_of
from modelpack.lookup import FINGERPRINT_MISMATCH, VERSION_NOT_LOADED
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg
from tests.integration.client_fleet import (
    DIM,
    ROW_BYTES,
    ROWS,
    TWO_SHARDS,
    addresses,
    close,
    file_rows,
    file_values,
    fingerprint,
    make_stores,
    query,
    run_with,
    shard_server,
)

C = grpc.StatusCode


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_stores(tmp_path_factory)


@pytest.fixture(scope="module")
def servers(stores: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, ServerProcess]]:
    logs = tmp_path_factory.mktemp("logs")
    procs = {
        "s0": shard_server(stores["main"], logs, "s0", "--shard", "0", *TWO_SHARDS),
        "s1": shard_server(stores["main"], logs, "s1", "--shard", "1", *TWO_SHARDS),
        "x1": shard_server(stores["other"], logs, "x1", "--shard", "1", *TWO_SHARDS),
        "n1": shard_server(stores["main"], logs, "n1", "--shard", "1", "--num-shards", "2"),
    }
    start_all(procs.values())
    yield procs
    stop_all(procs.values(), signal.SIGKILL)


# ------------------------------------------------------------------------- fan-out and merge


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_fan_out_over_two_shards_merges_packed_rows_in_request_order(
        stores: dict[str, Path], servers: dict[str, ServerProcess], transport: str) -> None:
    rng = np.random.default_rng(0)
    rows = rng.integers(0, ROWS, 3000)  # interleaved over both shards, with repeats
    rows[:4] = [999, 0, 500, 499]  # both edges of the shard boundary
    cats = rng.integers(0, 37, 50)  # one shard file, still split by the two server shards
    fp = fingerprint(stores["main"])

    async def body(c: EmbeddingClient) -> list[npt.NDArray[np.generic]]:
        return await c.lookup("tiny", "v1", fp, [query(rows), query(cats, table="cats"),
                                                 query(rows[:0])])

    got = run_with(addresses(servers, "s0", "s1"), body, transport=transport)
    assert len(got) == 3
    assert got[0].dtype == np.uint8 and got[0].shape == (rows.size, ROW_BYTES)
    assert np.array_equal(got[0], file_rows(stores["main"], "tiny", "unified", rows))
    assert np.array_equal(got[1], file_rows(stores["main"], "tiny", "cats", cats))
    assert got[2].shape == (0, ROW_BYTES)


@pytest.mark.parametrize("output", ["fp16", "fp32"])
def test_unpooled_float_outputs_equal_numpy(stores: dict[str, Path], servers: dict[str, ServerProcess],
                                            output: str) -> None:
    rows = np.random.default_rng(1).integers(0, ROWS, 700)

    async def body(c: EmbeddingClient) -> list[npt.NDArray[np.generic]]:
        return await c.lookup("tiny", "v1", "", [query(rows, output)])

    [got] = run_with(addresses(servers, "s0", "s1"), body)
    assert got.dtype == (np.float16 if output == "fp16" else np.float32) and got.shape == (rows.size, DIM)
    assert close(got, file_values(stores["main"], "tiny", "unified", rows), output)


@pytest.mark.parametrize("output", ["fp16", "fp32"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_pooled_bags_spanning_both_shards_equal_numpy(
        stores: dict[str, Path], servers: dict[str, ServerProcess], pooling: str, output: str) -> None:
    rng = np.random.default_rng(2)
    lengths = np.array([20, 0, 1, 7, 0, 3, 20, 2] * 8)
    rows = rng.integers(0, ROWS, int(lengths.sum()))
    rows[:2] = [10, 990]  # bag 0 holds rows of both shards for sure
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    shard, _ = shard_of(rows, ROWS, 2)
    assert len(set(shard[:20])) == 2

    async def body(c: EmbeddingClient) -> list[npt.NDArray[np.generic]]:
        return await c.lookup("tiny", "v1", "", [query(rows, output, pooling, offsets)])

    [got] = run_with(addresses(servers, "s0", "s1"), body)
    vals = file_values(stores["main"], "tiny", "unified", rows)
    want = np.stack([vals[a:b].sum(0) for a, b in itertools.pairwise(offsets)])
    if pooling == "mean":
        want /= np.maximum(lengths, 1)[:, None]
    assert got.shape == (lengths.size, DIM)
    assert got.dtype == (np.float16 if output == "fp16" else np.float32)
    assert close(got, want, output)
    assert not got[lengths == 0].any()


# ------------------------------------------------------------------------- version checks


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_fingerprint_of_another_build_is_refused_as_a_mismatch(
        stores: dict[str, Path], servers: dict[str, ServerProcess], transport: str) -> None:
    rows = np.arange(0, ROWS, 3)
    fp = fingerprint(stores["main"])
    assert fp != fingerprint(stores["other"])

    async def body(c: EmbeddingClient) -> None:
        await c.lookup("tiny", "v1", fp, [query(rows)])

    with pytest.raises(VersionMismatchError) as e:  # the shard itself refuses our fingerprint
        run_with(addresses(servers, "s0", "x1"), body, transport=transport)
    assert e.value.code == C.FAILED_PRECONDITION and e.value.shard == 1
    assert e.value.reason == FINGERPRINT_MISMATCH
    assert f"the request expects {fp}" in str(e.value)


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_a_shard_without_the_version_is_not_loaded_not_a_mismatch(
        stores: dict[str, Path], servers: dict[str, ServerProcess], transport: str) -> None:
    async def body(c: EmbeddingClient) -> None:
        await c.lookup("tiny", "v1", fingerprint(stores["main"]), [query(np.arange(0, ROWS, 3))])

    with pytest.raises(VersionNotLoadedError) as e:
        run_with(addresses(servers, "s0", "n1"), body, transport=transport)
    assert not isinstance(e.value, VersionMismatchError)
    assert e.value.code == C.FAILED_PRECONDITION and e.value.shard == 1
    assert e.value.reason == VERSION_NOT_LOADED and "tiny/v1" in str(e.value)


def test_shards_of_different_builds_never_merge_without_a_fingerprint(
        servers: dict[str, ServerProcess]) -> None:
    async def body(c: EmbeddingClient) -> None:
        await c.lookup("tiny", "v1", "", [query(np.arange(0, ROWS, 3))])

    with pytest.raises(VersionMismatchError, match=r"shard 1 answered tiny/v1 \(sha256:"):
        run_with(addresses(servers, "s0", "x1"), body)


class _LyingShard(pbg.EmbeddingServiceServicer):
    """Answers every lookup as `version`/`fp`, whatever was asked (a stale or buggy shard)."""

    def __init__(self, version: str, fp: str) -> None:
        self.version, self.fp = version, fp

    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext) -> pb.LookupResponse:
        results = [pb.TableResult(table=t.table, dim=DIM, count=len(t.rows) // 8,
                                  data=bytes(len(t.rows) // 8 * ROW_BYTES)) for t in request.tables]
        return pb.LookupResponse(model=request.model, version=self.version, fingerprint=self.fp,
                                 shard=1, num_shards=2, results=results, id=request.id)

    def LookupStream(self, requests: Iterator[pb.LookupRequest], context: grpc.ServicerContext
                     ) -> Iterator[pb.LookupResponse]:
        for r in requests:
            yield self.Lookup(r, context)


@pytest.mark.parametrize("transport", ["stream", "unary"])
@pytest.mark.parametrize(("version", "fp"), [("v2", "same"), ("v1", "sha256:0ther")])
def test_echo_of_another_version_or_fingerprint_is_a_mismatch(
        stores: dict[str, Path], servers: dict[str, ServerProcess], version: str, fp: str,
        transport: str) -> None:
    """The client checks every answer's echo, even from a shard that skipped its own check."""
    want_fp = fingerprint(stores["main"])
    liar = grpc.server(futures.ThreadPoolExecutor(2))
    pbg.add_EmbeddingServiceServicer_to_server(  # type: ignore[no-untyped-call]
        _LyingShard(version, want_fp if fp == "same" else fp), liar)
    port = liar.add_insecure_port("127.0.0.1:0")
    liar.start()

    async def body(c: EmbeddingClient) -> None:
        await c.lookup("tiny", "v1", want_fp, [query(np.arange(0, ROWS, 3))])

    try:
        with pytest.raises(VersionMismatchError) as e:
            run_with([[servers["s0"].address], [f"127.0.0.1:{port}"]], body, transport=transport)
    finally:
        liar.stop(0).wait()
    assert e.value.shard == 1
    assert f"shard 1 answered tiny/{version} " in str(e.value)
