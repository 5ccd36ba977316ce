"""R6: gRPC fuzz of EmbeddingService.Lookup on a real embedding server: structured requests
with malformed packed arrays (lengths that are not whole int64s, rows out of range,
negative, huge; broken offsets; unknown enum values; unknown tables and versions; up
to 100k rows), raw byte strings that are not a LookupRequest at all, and messages over
gRPC's size limit. Every structured request gets OK or a client-error status (never
INTERNAL or UNKNOWN, which would be an unhandled exception), and afterwards the server
is alive, SERVING, counts no INTERNAL error and still answers a good lookup exactly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.harness.probes import grpc_serving
from loadtest.harness.process import ServerProcess
from modelpack.hashing import shard_range
from modelpack.manifest import read_manifest
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg
from tests.e2e.openapi_fuzz import FUZZ, names

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------ gRPC Lookup fuzz

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
           grpc.StatusCode.DEADLINE_EXCEEDED}


@pytest.fixture(scope="module")
def shard(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("fuzz_shard")
    with ServerProcess.module("embedding_server", "--store", str(tiny_store), "--shard", "1",
                              "--num-shards", "2", "--preload", "tiny/v1", "--metrics-port", "0",
                              "--max-rows-per-request", "100000", log_dir=d, name="shard1",
                              ready=grpc_serving) as s:
        yield s


def _i64(values: list[int]) -> bytes:
    return np.array(values, dtype="<i8").tobytes()


def lookup_requests(tiny_store: Path) -> st.SearchStrategy[pb.LookupRequest]:
    m = read_manifest(tiny_store / "tiny" / "v1")
    ranges = {t.name: shard_range(1, t.rows, 2) if t.num_shards == 2 else (0, t.rows)
              for t in m.tables}
    def rows_of(t: str) -> st.SearchStrategy[tuple[str, list[int]]]:
        a, b = ranges[t]
        return st.tuples(st.just(t), st.lists(st.integers(a, b - 1), max_size=40))

    in_range = st.sampled_from(sorted(ranges)).flatmap(rows_of)
    any_i64 = st.integers(-(2**63), 2**63 - 1)
    rows = st.one_of(
        in_range.map(lambda tr: _i64(tr[1])), st.lists(any_i64, max_size=10).map(_i64),
        st.binary(max_size=40),
        st.integers(0, 100_001).map(lambda n: _i64([ranges["unified"][0]] * n)))
    offsets = st.one_of(st.just(b""), st.lists(st.integers(-3, 50), max_size=8).map(_i64),
                        st.binary(max_size=20))
    group = st.builds(
        lambda t, r, o, p, out: pb.TableLookup(table=t, rows=r, offsets=o, pooling=p, output=out),
        st.one_of(st.sampled_from(sorted(ranges)), st.sampled_from(sorted(ranges)), names),
        rows, offsets, st.integers(-2, 4), st.integers(-2, 4))
    valid_group = in_range.flatmap(lambda tr: st.builds(
        lambda p, out: pb.TableLookup(table=tr[0], rows=_i64(tr[1]), pooling=p, output=out),
        st.sampled_from([0, 1, 2]), st.sampled_from([0, 1, 2])))
    # Mostly the served version (so the arrays reach validation), sometimes anything.
    served = st.tuples(st.just("tiny"), st.just("v1"), st.sampled_from([m.fingerprint, ""]))
    other = st.tuples(st.sampled_from(["tiny", "", "other"]),
                      st.sampled_from(["v1", "v2", "", "../v1"]),
                      st.sampled_from([m.fingerprint, "", "sha256:nope"]))
    return st.builds(
        lambda h, gs: pb.LookupRequest(model=h[0], version=h[1], fingerprint=h[2], tables=gs),
        st.one_of(served, served, served, other), st.lists(st.one_of(group, valid_group),
                                                            max_size=6))


def test_r6_grpc_lookup_fuzz_never_crashes(shard: ServerProcess, tiny_store: Path) -> None:
    seen: Counter[str] = Counter()
    with grpc.insecure_channel(shard.address) as ch:
        stub = pbg.EmbeddingServiceStub(ch)  # type: ignore[no-untyped-call]
        raw = ch.unary_unary("/hybrid.embedding.v1.EmbeddingService/Lookup",
                             request_serializer=lambda b: b, response_deserializer=lambda b: b)

        @settings(FUZZ, max_examples=800)
        @given(lookup_requests(tiny_store))
        def structured(req: pb.LookupRequest) -> None:
            try:
                resp = stub.Lookup(req, timeout=30)
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code, resp = e.code(), None
            seen[code.name] += 1
            assert code in ALLOWED, (code, req)
            if resp is not None:
                assert resp.version == req.version and len(resp.results) == len(req.tables)

        @settings(FUZZ, max_examples=200)
        @given(st.one_of(st.binary(max_size=200),
                         lookup_requests(tiny_store).map(lambda r: r.SerializeToString()[:-1])))
        def garbage(data: bytes) -> None:
            try:
                raw(data, timeout=30)
                seen["raw:OK"] += 1
            except grpc.RpcError as e:
                seen[f"raw:{e.code().name}"] += 1

        structured()
        garbage()
        # Over gRPC's 4 MiB message limit, twice.
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as big:
                stub.Lookup(pb.LookupRequest(model="tiny", version="v1", tables=[
                    pb.TableLookup(table="unified", rows=b"\0" * (5 << 20))]), timeout=30)
            seen[f"big:{big.value.code().name}"] += 1
        shard.check_alive()
        assert grpc_serving(shard)
        # Still exact: a good lookup equals the shard file's bytes.
        m = read_manifest(tiny_store / "tiny" / "v1")
        t = m.table("unified")
        start, _ = shard_range(1, t.rows, 2)
        resp = stub.Lookup(pb.LookupRequest(model="tiny", version="v1", fingerprint=m.fingerprint,
                                            tables=[pb.TableLookup(table="unified",
                                                                   rows=_i64([start, start + 1]))]),
                           timeout=10)
    stored = (tiny_store / "tiny" / "v1" / "tables" / "unified" / "shard-1-of-2.bin").read_bytes()
    assert resp.results[0].data == stored[:2 * (4 + t.dim // 2)]
    metrics = httpx.get(f"http://127.0.0.1:{shard.metrics_port}/metrics", timeout=5).text
    internal = [ln for ln in metrics.splitlines()
                if ln.startswith("embedding_errors_total") and 'code="INTERNAL"' in ln]
    assert all(float(ln.rsplit(" ", 1)[1]) == 0 for ln in internal), internal
    print(f"\nR6 gRPC Lookup fuzz: {sum(seen.values())} calls, 0 crashes, 0 INTERNAL from the "
          f"servicer; statuses {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= 1000
