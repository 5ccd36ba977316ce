"""The embedding server refuses abuse before doing the work (issue 11, findings 4 and 7).

One real server with the default cost limits and a Lookup token serves two versions:
`tiny/v1` (16 dims) and `wide/v1` (256 dims, where a few rows make a large answer).
Memory is measured from /proc: VmHWM, the process's peak resident set, must not jump.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from loadtest.harness.probes import grpc_serving
from loadtest.harness.process import ServerProcess
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg
from tests.helpers_store import tiny_version

TOKEN = "l00kup-t0ken"
AUTH = [("authorization", f"Bearer {TOKEN}")]
C = grpc.StatusCode
MB = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    store, logs = tmp_path_factory.mktemp("store"), tmp_path_factory.mktemp("logs")
    tiny_version(store, "v1", shards=1, seed=1)
    tiny_version(store, "v1", shards=1, seed=2, model="wide", dim=256)
    (logs / "token").write_text(TOKEN + "\n")
    srv = ServerProcess.module("embedding_server", "--store", str(store), "--preload", "tiny/v1",
                               "--preload", "wide/v1", "--lookup-token-file", str(logs / "token"),
                               log_dir=logs, name="abuse", ready=grpc_serving)
    with srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pbg.EmbeddingServiceStub]:
    with grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", -1),
                                                        ("grpc.max_send_message_length", -1)]) as ch:
        yield pbg.EmbeddingServiceStub(ch)  # type: ignore[no-untyped-call]


def peak_rss(pid: int) -> int:
    """VmHWM of `pid` in bytes: the most resident memory it ever held."""
    m = re.search(r"^VmHWM:\s+(\d+) kB$", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert m, "no VmHWM in /proc status"
    return int(m.group(1)) * 1024


def refused(server: ServerProcess, stub: pbg.EmbeddingServiceStub, req: pb.LookupRequest
            ) -> tuple[grpc.RpcError, float, int]:
    """Send `req`, expect a refusal; return it, the seconds it took and the peak RSS growth."""
    before = peak_rss(server.pid)
    t0 = time.perf_counter()
    with pytest.raises(grpc.RpcError) as e:
        stub.Lookup(req, metadata=AUTH, timeout=30)
    took = time.perf_counter() - t0
    return e.value, took, peak_rss(server.pid) - before


def test_empty_bags_cannot_amplify_the_answer(server: ServerProcess,
                                              stub: pbg.EmbeddingServiceStub) -> None:
    # The request: no rows, 2M empty bags, MEAN to FP32; 16 MB in, 128 MB out at 16 dims.
    offsets = np.zeros(2_000_001, "<i8").tobytes()
    req = pb.LookupRequest(model="tiny", version="v1", tables=[pb.TableLookup(
        table="unified", offsets=offsets, pooling=pb.POOLING_MEAN, output=pb.OUTPUT_FP32)])
    err, took, grew = refused(server, stub, req)
    assert err.code() == C.INVALID_ARGUMENT, err.details()
    assert re.search(r"2000000 bags, more than .*--max-bags-per-request=1048576", err.details()), \
        err.details()
    # Receiving 16 MB costs a few copies of it; answering would have cost 128 MB and more.
    assert took < 2.0 and grew < 100 * MB, (took, grew)


def test_wide_rows_cannot_amplify_the_answer(server: ServerProcess,
                                             stub: pbg.EmbeddingServiceStub) -> None:
    # 300k rows (well under --max-rows-per-request) of 256 dims as FP32: a 307 MB answer.
    rows = np.zeros(300_000, "<i8").tobytes()
    req = pb.LookupRequest(model="wide", version="v1", tables=[pb.TableLookup(
        table="unified", rows=rows, output=pb.OUTPUT_FP32)])
    err, took, grew = refused(server, stub, req)
    assert err.code() == C.INVALID_ARGUMENT, err.details()
    assert re.search(r"answer of 307200000 bytes, more than .*--max-response-bytes=67108864",
                     err.details()), err.details()
    assert took < 2.0 and grew < 100 * MB, (took, grew)
    # The same rows packed (4 + 128 bytes each, 39.6 MB) are within the limit and served.
    req.tables[0].output = pb.OUTPUT_INT4_PACKED
    resp = stub.Lookup(req, metadata=AUTH, timeout=30)
    assert len(resp.results[0].data) == 300_000 * 132


def test_many_empty_groups_are_refused_at_once(server: ServerProcess,
                                               stub: pbg.EmbeddingServiceStub) -> None:
    req = pb.LookupRequest(model="tiny", version="v1",
                           tables=[pb.TableLookup(table="cats") for _ in range(100_000)])
    err, took, _ = refused(server, stub, req)
    assert err.code() == C.INVALID_ARGUMENT, err.details()
    assert re.search(r"100000 table groups, more than .*--max-tables-per-request=1024",
                     err.details()), err.details()
    assert took < 0.5, took


def test_lookup_token_is_required_when_configured(stub: pbg.EmbeddingServiceStub) -> None:
    req = pb.LookupRequest(model="tiny", version="v1",
                           tables=[pb.TableLookup(table="cats", rows=np.arange(3, dtype="<i8").tobytes())])
    assert stub.Lookup(req, metadata=AUTH, timeout=10).results[0].count == 3
    for md in (None, [("authorization", "Bearer wrong")]):
        with pytest.raises(grpc.RpcError) as e:
            stub.Lookup(req, metadata=md, timeout=10)
        assert e.value.code() == C.UNAUTHENTICATED
        assert "--lookup-token-file" in e.value.details(), e.value.details()
        with pytest.raises(grpc.RpcError) as e:  # a stream is refused at open, as a whole
            next(stub.LookupStream(iter([req]), metadata=md, timeout=10))
        assert e.value.code() == C.UNAUTHENTICATED, e.value.details()
    assert [r.results[0].count for r in stub.LookupStream(iter([req, req]), metadata=AUTH, timeout=10)] \
        == [3, 3]
    # Read-only calls stay open: the ranker's prepare handshake and health checks use them.
    assert [v.model for v in stub.ListVersions(pb.ListVersionsRequest(), timeout=10).versions] \
        == ["tiny", "wide"]


# ------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["v1\n", "v1\r\n"])
def test_a_trailing_newline_is_not_a_valid_name(stub: pbg.EmbeddingServiceStub, name: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.CheckFit(pb.LoadVersionRequest(model="tiny", version=name), timeout=10)
    assert e.value.code() == C.INVALID_ARGUMENT, e.value.details()
    assert "invalid version name 'v1\\" in e.value.details(), e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Lookup(pb.LookupRequest(model="tiny", version=name), metadata=AUTH, timeout=10)
    assert e.value.code() == C.INVALID_ARGUMENT, e.value.details()


def test_a_10k_character_name_gets_a_short_error(stub: pbg.EmbeddingServiceStub) -> None:
    long = "m" * 10_000
    calls = [
        lambda: stub.CheckFit(pb.LoadVersionRequest(model=long, version="v1"), timeout=10),
        lambda: stub.Lookup(pb.LookupRequest(model=long, version="v1"), metadata=AUTH, timeout=10),
        lambda: stub.Lookup(pb.LookupRequest(model="tiny", version="v1",
                                             tables=[pb.TableLookup(table=long)]),
                            metadata=AUTH, timeout=10),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == C.INVALID_ARGUMENT, (e.value.code(), e.value.details()[:200])
        assert "mmmm" in e.value.details() and len(e.value.details()) < 1024, e.value.details()
