"""embedding_server.client against real servers: fan-out, merge, version checks, failover.

Servers (started once per module, in parallel, on free ports):

- s0, s1: shards 0 and 1 of 2 of `tiny/v1` (seed 1);
- b, c, d: three more replicas of shard 1, the victims of the failover tests (each
  failover test sends its lookups over two replicas of shard 1 plus s0);
- x1: shard 1 of 2 of another build published under the same name `tiny/v1` (seed 2),
  from a second store, so its fingerprint differs;
- n1: shard 1 of 2 holding no version at all.

The client's default transport is one LookupStream per replica; the tests of behaviour
that the two transports implement apart (fan-out, version refusals, failover, deadlines)
run over unary `Lookup` too.

Expected values always come from the shard files through numpy
(modelpack.int4.dequantize_rows), never from the server's or the client's code.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import signal
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import numpy.typing as npt
import pytest

from embedding_server.client import (
    EmbeddingClient,
    EmbeddingLookupError,
    VersionMismatchError,
    VersionNotLoadedError,
)
from loadtest.harness.probes import grpc_serving
from loadtest.harness.process import ServerProcess, start_all, stop_all
from modelpack.hashing import shard_of
from modelpack.int4 import dequantize_rows
from modelpack.lookup import FINGERPRINT_MISMATCH, VERSION_NOT_LOADED, TableQuery
from modelpack.manifest import read_manifest
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg
from tests.helpers_store import tiny_version

ROWS, DIM, ROW_BYTES = 1000, 16, 12
C = grpc.StatusCode
Float = npt.NDArray[np.float64]
T = TypeVar("T")


def _server(store: Path, log_dir: Path, name: str, *args: str, port: int = 0) -> ServerProcess:
    return ServerProcess.module("embedding_server", "--store", str(store), *args, log_dir=log_dir,
                                name=name, ready=grpc_serving, port=port)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    main, other = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("other")
    tiny_version(main, "v1", seed=1)
    tiny_version(other, "v1", seed=2)  # another build, same model and version name
    return {"main": main, "other": other}


@pytest.fixture(scope="module")
def servers(stores: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, ServerProcess]]:
    logs = tmp_path_factory.mktemp("logs")
    two = ("--num-shards", "2", "--preload", "tiny/v1", "--grace-period", "20")
    procs = {
        "s0": _server(stores["main"], logs, "s0", "--shard", "0", *two),
        "s1": _server(stores["main"], logs, "s1", "--shard", "1", *two),
        **{r: _server(stores["main"], logs, r, "--shard", "1", *two, "--metrics-port", "0")
           for r in ("b", "c", "d")},
        "x1": _server(stores["other"], logs, "x1", "--shard", "1", *two),
        "n1": _server(stores["main"], logs, "n1", "--shard", "1", "--num-shards", "2"),
    }
    start_all(procs.values())
    yield procs
    stop_all(procs.values(), signal.SIGKILL)


def file_rows(store: Path, model: str, table: str, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """Packed INT4 rows of global row ids, read straight from the version's shard files."""
    spec = read_manifest(store / model / "v1").table(table)
    shard, local = shard_of(rows, spec.rows, spec.num_shards)
    out = np.empty((rows.size, spec.row_bytes), np.uint8)
    for k in range(spec.num_shards):
        data = np.fromfile(store / model / "v1" / spec.shard_path(k), np.uint8).reshape(-1, spec.row_bytes)
        out[shard == k] = data[local[shard == k]]
    return out


def file_values(store: Path, model: str, table: str, rows: npt.NDArray[np.int64]) -> Float:
    return dequantize_rows(file_rows(store, model, table, rows), DIM).astype(np.float64)


def fingerprint(store: Path, model: str = "tiny") -> str:
    return read_manifest(store / model / "v1").fingerprint


def close(got: npt.NDArray[np.generic], want: Float, output: str) -> bool:
    rel = 2.0**-10 if output == "fp16" else 1e-5  # one rounding to the output type (+ fp32 sums)
    return bool(np.all(np.abs(got.astype(np.float64) - want) <= np.abs(want) * rel + 1e-4))


def query(rows: npt.NDArray[np.int64], output: str = "int4", pooling: str = "none",
          offsets: npt.NDArray[np.int64] | None = None, table: str = "unified") -> TableQuery:
    return TableQuery(table, ROWS if table == "unified" else 37, DIM, rows.astype(np.int64),
                      offsets, pooling, output)


def run_with(shards: list[list[str]], body: Callable[[EmbeddingClient], Awaitable[T]], *,
             timeout_s: float = 5.0, transport: str = "stream") -> T:
    """Run `await body(client)` on a fresh EmbeddingClient, then close it."""

    async def main() -> T:
        client = EmbeddingClient(shards, default_timeout_s=timeout_s, transport=transport)
        try:
            return await body(client)
        finally:
            await client.close()

    return asyncio.run(main())


def addresses(servers: dict[str, ServerProcess], *names: str) -> list[list[str]]:
    return [[servers[n].address] for n in names]


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


# ------------------------------------------------------------------------- replicas and deadlines


def _stream(servers: dict[str, ServerProcess], stores: dict[str, Path], replicas: tuple[str, str],
            sig: int, transport: str = "stream", total: int = 600, concurrency: int = 8,
            at: int = 150) -> tuple[list[str], int, float]:
    """`total` lookups, `concurrency` at a time, over s0 and two replicas of shard 1; `sig`
    hits the second replica after `at` answers. Returns one outcome per lookup, the
    victim's exit code, and the rows the victim had served when it got the signal."""
    rng = np.random.default_rng(4)
    batches = [rng.integers(0, ROWS, 256) for _ in range(16)]
    want = [file_rows(stores["main"], "tiny", "unified", b).tobytes() for b in batches]
    fp = fingerprint(stores["main"])
    outcomes: list[str] = []
    victim_proc = servers[replicas[1]]
    served = [0.0]

    async def body(c: EmbeddingClient) -> None:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with sem:
                try:
                    [got] = await c.lookup("tiny", "v1", fp, [query(batches[i % 16])], timeout_s=5.0)
                    outcomes.append("ok" if got.tobytes() == want[i % 16] else "WRONG DATA")
                except EmbeddingLookupError as e:
                    outcomes.append(f"{e.code}: {e}")
                if len(outcomes) == at:
                    served[0] = _rows_served(victim_proc)
                    victim_proc.send(sig)

        await asyncio.gather(*(one(i) for i in range(total)))

    run_with([[servers["s0"].address], [servers[n].address for n in replicas]], body,
             transport=transport)
    # Wait for the exit the one signal causes; stop() would signal again if it still ran.
    victim_proc.wait(30)
    return outcomes, victim_proc.stop(sig, timeout=30), served[0]


def _rows_served(s: ServerProcess) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=5).read().decode()
    m = re.search(r'^embedding_rows_total\{output="int4_packed",table="unified"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize(("transport", "victim"), [("stream", "b"), ("unary", "d")])
def test_sigkill_of_one_replica_mid_stream_loses_no_lookup(
        stores: dict[str, Path], servers: dict[str, ServerProcess], transport: str,
        victim: str) -> None:
    outcomes, code, served = _stream(servers, stores, ("c", victim), signal.SIGKILL, transport)
    assert code == -signal.SIGKILL
    assert served > 0  # the victim was in the rotation when it died
    failed = [o for o in outcomes if o != "ok"]
    assert len(outcomes) == 600 and not failed, failed[:5]
    servers["c"].check_alive()


def test_sigterm_of_one_replica_mid_stream_loses_no_lookup(
        stores: dict[str, Path], servers: dict[str, ServerProcess]) -> None:
    """The victim answers what its streams already carry, refuses the rest as `draining`
    (retried on s1), ends its streams and exits 0."""
    outcomes, code, served = _stream(servers, stores, ("s1", "c"), signal.SIGTERM)
    assert code == 0, servers["c"].log_tail()  # drained and exited cleanly
    assert served > 0
    failed = [o for o in outcomes if o != "ok"]
    assert len(outcomes) == 600 and not failed, failed[:5]
    assert "draining:" in servers["c"].log_tail()


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_too_short_a_deadline_is_deadline_exceeded(servers: dict[str, ServerProcess],
                                                   transport: str) -> None:
    big = np.random.default_rng(5).integers(0, ROWS, 1_000_000)

    async def body(c: EmbeddingClient) -> None:
        t0 = time.perf_counter()
        try:
            await c.lookup("tiny", "v1", "", [query(big, "fp32")], timeout_s=0.02)
        finally:  # the deadline holds: no waiting for the answer
            assert time.perf_counter() - t0 < 0.5

    with pytest.raises(EmbeddingLookupError) as e:
        run_with(addresses(servers, "s0", "s1"), body, transport=transport)
    assert e.value.code == C.DEADLINE_EXCEEDED, e.value
    assert not isinstance(e.value, VersionMismatchError)

    async def small(c: EmbeddingClient) -> list[npt.NDArray[np.generic]]:
        return await c.lookup("tiny", "v1", "", [query(np.arange(5))], timeout_s=5.0)

    [got] = run_with(addresses(servers, "s0", "s1"), small)
    assert got.shape == (5, ROW_BYTES)  # the servers are fine afterwards


def test_a_shard_with_no_live_replica_fails_fast_and_heals_when_it_restarts(
        stores: dict[str, Path], servers: dict[str, ServerProcess], tmp_path: Path) -> None:
    """Its port refuses connections at once: the lookup must not wait out its deadline. A
    replica restarted on its old address serves the same client again within its backoff."""
    victim = _server(stores["main"], tmp_path, "victim", "--shard", "1", "--num-shards", "2",
                     "--preload", "tiny/v1")
    rows = np.arange(0, ROWS, 7)
    healed_after = [float("inf")]

    async def body(c: EmbeddingClient) -> list[tuple[str, float]]:
        [got] = await c.lookup("tiny", "v1", "", [query(rows)])
        assert np.array_equal(got, file_rows(stores["main"], "tiny", "unified", rows))
        assert victim.stop(signal.SIGKILL) == -signal.SIGKILL
        outcomes = []
        for _ in range(5):
            t0 = time.perf_counter()
            try:
                await c.lookup("tiny", "v1", "", [query(rows)])
                outcomes.append(("ok", time.perf_counter() - t0))
            except EmbeddingLookupError as e:
                assert e.shard == 1, e
                outcomes.append((str(e.code), time.perf_counter() - t0))
        with _server(stores["main"], tmp_path, "again", "--shard", "1", "--num-shards", "2",
                     "--preload", "tiny/v1", port=victim.port):
            serving = time.perf_counter()
            while time.perf_counter() - serving < 5:
                with contextlib.suppress(EmbeddingLookupError):
                    [got] = await c.lookup("tiny", "v1", "", [query(rows)])
                    healed_after[0] = time.perf_counter() - serving
                    break
                await asyncio.sleep(0.05)
        return outcomes

    with victim:
        outcomes = run_with([[servers["s0"].address], [victim.address]], body, timeout_s=2.0)
    assert all(code == str(C.UNAVAILABLE) and took < 0.2 for code, took in outcomes), outcomes
    assert healed_after[0] < 1.5, healed_after  # reconnect backoff: at most 1 s


def test_the_lookup_token_is_sent_when_the_shard_wants_one(
        stores: dict[str, Path], servers: dict[str, ServerProcess], tmp_path: Path) -> None:
    (tmp_path / "token").write_text("d4ta-t0ken")
    guarded = _server(stores["main"], tmp_path, "guarded", "--shard", "1", "--num-shards", "2",
                      "--preload", "tiny/v1", "--lookup-token-file", str(tmp_path / "token"))
    rows = np.arange(0, ROWS, 7)

    async def lookup(c: EmbeddingClient) -> list[npt.NDArray[np.generic]]:
        return await c.lookup("tiny", "v1", "", [query(rows)])

    async def with_token() -> list[npt.NDArray[np.generic]]:
        c = EmbeddingClient([[servers["s0"].address], [guarded.address]], lookup_token="d4ta-t0ken")
        try:  # shard 0 has no token of its own and ignores the header
            return await lookup(c)
        finally:
            await c.close()

    with guarded:
        with pytest.raises(EmbeddingLookupError) as e:
            run_with([[servers["s0"].address], [guarded.address]], lookup)
        assert e.value.code == C.UNAUTHENTICATED and e.value.shard == 1
        [got] = asyncio.run(with_token())
    assert np.array_equal(got, file_rows(stores["main"], "tiny", "unified", rows))
