"""The embedding server as deployed: real processes on free ports, real gRPC, tiny stores.

Servers (started once per module, in parallel): shard 0 and shard 1 of 2 (admin token,
v1 preloaded, a 20 kB memory budget that holds three tiny versions per shard), and a
second replica of shard 0 without an admin token. Expected values come from the shard
files through numpy (modelpack.int4.dequantize_rows), never from the server's code.
"""

from __future__ import annotations

import itertools
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest.harness.probes import grpc_serving
from loadtest.harness.process import ServerProcess, start_all, stop_all
from modelpack.hashing import shard_of, shard_range
from modelpack.int4 import dequantize_rows
from modelpack.manifest import read_manifest
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg
from tests.helpers_store import tiny_version

TOKEN = "t0ps3cret"
AUTH = [("authorization", f"Bearer {TOKEN}")]
ROWS, DIM, ROW_BYTES, CATS = 1000, 16, 12, 37
SERVICE = "hybrid.embedding.v1.EmbeddingService"
C = grpc.StatusCode


def _server(store: Path, log_dir: Path, name: str, *args: str) -> ServerProcess:
    return ServerProcess.module("embedding_server", "--store", str(store), *args,
                                log_dir=log_dir, name=name, ready=grpc_serving)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    for i, v in enumerate(("v1", "v2", "v3", "v4", "bad"), start=1):
        tiny_version(root, v, seed=i)
    f = root / "tiny" / "bad" / "tables" / "unified" / "shard-0-of-2.bin"
    data = bytearray(f.read_bytes())
    data[100] ^= 0x10  # one flipped bit in shard 0's file
    f.write_bytes(bytes(data))
    return root


@pytest.fixture(scope="module")
def servers(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    logs = tmp_path_factory.mktemp("logs")
    (logs / "token").write_text(TOKEN + "\n")
    common = ("--num-shards", "2", "--preload", "tiny/v1", "--memory-budget", "20000",
              "--max-rows-per-request", "5000", "--grace-period", "20",
              "--max-tables-per-request", "3000")  # the overload test's heavy requests
    procs = {
        "s0": _server(store, logs, "s0", "--shard", "0", *common, "--admin-token-file",
                      str(logs / "token"), "--metrics-port", "0"),
        "s1": _server(store, logs, "s1", "--shard", "1", *common, "--admin-token-file",
                      str(logs / "token"), "--max-concurrent", "2"),
        "r0": _server(store, logs, "r0", "--shard", "0", "--num-shards", "2", "--preload", "tiny/v1",
                      "--max-rows-per-request", "4000000", "--max-bags-per-request", "4000000",
                      "--max-response-bytes", str(1 << 30)),  # the deadline test's slow request
    }
    start_all(procs.values())
    yield procs
    stop_all(procs.values())


@pytest.fixture(scope="module")
def stubs(servers: dict[str, ServerProcess]) -> Iterator[dict[str, pbg.EmbeddingServiceStub]]:
    channels = {k: grpc.insecure_channel(s.address, options=[("grpc.max_receive_message_length", -1)])
                for k, s in servers.items()}
    yield {k: stub_of(ch) for k, ch in channels.items()}
    for ch in channels.values():
        ch.close()


def stub_of(channel: grpc.Channel) -> pbg.EmbeddingServiceStub:
    return pbg.EmbeddingServiceStub(channel)  # type: ignore[no-untyped-call]


def file_rows(store: Path, version: str, table: str, rows: np.ndarray) -> np.ndarray:
    """Packed INT4 rows of global row ids, read straight from the version's shard files."""
    m = read_manifest(store / "tiny" / version)
    spec = m.table(table)
    shard, local = shard_of(rows, spec.rows, spec.num_shards)
    out = np.empty((rows.size, spec.row_bytes), np.uint8)
    for k in range(spec.num_shards):
        path = store / "tiny" / version / spec.shard_path(k)
        data = np.fromfile(path, np.uint8).reshape(-1, spec.row_bytes)
        out[shard == k] = data[local[shard == k]]
    return out


def group(table: str, rows: npt.ArrayLike, output: pb.Output = pb.OUTPUT_INT4_PACKED,
          pooling: pb.Pooling = pb.POOLING_NONE, offsets: npt.ArrayLike | None = None) -> pb.TableLookup:
    return pb.TableLookup(table=table, rows=np.asarray(rows, "<i8").tobytes(), output=output,
                          pooling=pooling,
                          offsets=b"" if offsets is None else np.asarray(offsets, "<i8").tobytes())


def lookup(stub: pbg.EmbeddingServiceStub, *groups: pb.TableLookup, version: str = "v1",
           fingerprint: str = "", timeout: float = 10.0) -> pb.LookupResponse:
    req = pb.LookupRequest(model="tiny", version=version, fingerprint=fingerprint, tables=list(groups))
    resp: pb.LookupResponse = stub.Lookup(req, timeout=timeout)
    return resp


def values(result: pb.TableResult, output: pb.Output) -> np.ndarray:
    dtype = {pb.OUTPUT_FP16: np.float16, pb.OUTPUT_FP32: np.float32}[output]
    return np.frombuffer(result.data, dtype).reshape(int(result.count), result.dim).astype(np.float64)


def close(got: np.ndarray, want: np.ndarray, output: pb.Output) -> bool:
    rel = 2.0**-10 if output == pb.OUTPUT_FP16 else 1e-6  # one rounding to the output type
    return bool(np.all(np.abs(got - want) <= np.abs(want) * rel + 1e-5))


def fingerprint(store: Path, version: str) -> str:
    return read_manifest(store / "tiny" / version).fingerprint


# ------------------------------------------------------------------------- lookups


@pytest.mark.parametrize("shard", [0, 1])
def test_every_output_equals_numpy_dequantization_of_the_files(
        store: Path, stubs: dict[str, pbg.EmbeddingServiceStub], shard: int) -> None:
    rng = np.random.default_rng(shard)
    lo, hi = shard_range(shard, ROWS, 2)
    c_lo, c_hi = shard_range(shard, CATS, 2)
    rows, cats = rng.integers(lo, hi, 300), rng.integers(c_lo, c_hi, 40)
    outputs = (pb.OUTPUT_INT4_PACKED, pb.OUTPUT_FP16, pb.OUTPUT_FP32)
    resp = lookup(stubs[f"s{shard}"], *[group("unified", rows, o) for o in outputs],
                  *[group("cats", cats, o) for o in outputs], fingerprint=fingerprint(store, "v1"))
    assert (resp.model, resp.version, resp.fingerprint) == ("tiny", "v1", fingerprint(store, "v1"))
    assert (resp.shard, resp.num_shards) == (shard, 2)
    assert [r.table for r in resp.results] == ["unified"] * 3 + ["cats"] * 3
    for res, ids in zip(resp.results, [rows] * 3 + [cats] * 3, strict=True):
        assert res.dim == DIM and res.count == ids.size
    for i, (table, ids) in enumerate((("unified", rows), ("cats", cats))):
        packed = file_rows(store, "v1", table, ids)
        assert resp.results[3 * i].data == packed.tobytes()
        for j, out in ((1, pb.OUTPUT_FP16), (2, pb.OUTPUT_FP32)):
            assert close(values(resp.results[3 * i + j], out), dequantize_rows(packed, DIM), out)


@pytest.mark.parametrize("output", [pb.OUTPUT_FP16, pb.OUTPUT_FP32])
@pytest.mark.parametrize("pooling", [pb.POOLING_SUM, pb.POOLING_MEAN])
def test_pooled_bags_including_empty_ones(store: Path, stubs: dict[str, pbg.EmbeddingServiceStub],
                                          pooling: pb.Pooling, output: pb.Output) -> None:
    rng = np.random.default_rng(7)
    lengths = np.array([0, 3, 1, 0, 20, 5, 0])
    rows = rng.integers(500, 1000, lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    res = lookup(stubs["s1"], group("unified", rows, output, pooling, offsets)).results[0]
    assert res.count == lengths.size
    vals = dequantize_rows(file_rows(store, "v1", "unified", rows), DIM).astype(np.float64)
    want = np.stack([vals[a:b].sum(0) for a, b in itertools.pairwise(offsets)])
    if pooling == pb.POOLING_MEAN:
        want /= np.maximum(lengths, 1)[:, None]
    got = values(res, output)
    assert close(got, want, output)
    assert not got[lengths == 0].any()
    # Pooling without offsets: one row per bag, i.e. the rows themselves.
    res = lookup(stubs["s1"], group("unified", rows[:5], output, pooling)).results[0]
    assert res.count == 5 and close(values(res, output), vals[:5], output)


def test_two_shards_together_serve_the_whole_table(store: Path, stubs: dict[str, pbg.EmbeddingServiceStub]
                                                   ) -> None:
    rows = np.random.default_rng(3).integers(0, ROWS, 2000)
    shard, _ = shard_of(rows, ROWS, 2)
    got = np.empty((rows.size, ROW_BYTES), np.uint8)
    for k in (0, 1):
        res = lookup(stubs[f"s{k}"], group("unified", rows[shard == k])).results[0]
        got[shard == k] = np.frombuffer(res.data, np.uint8).reshape(-1, ROW_BYTES)
    assert np.array_equal(got, file_rows(store, "v1", "unified", rows))


def test_two_replicas_of_a_shard_answer_identically(stubs: dict[str, pbg.EmbeddingServiceStub]) -> None:
    req = (group("unified", np.arange(0, 500, 7), pb.OUTPUT_FP32, pb.POOLING_SUM, [0, 10, 72]),
           group("cats", np.arange(18)))
    assert lookup(stubs["s0"], *req) == lookup(stubs["r0"], *req)


# ------------------------------------------------------------------------- status codes

_R = np.array([1, 2, 3])
BAD_REQUESTS = [
    ("out of range", dict(tables=[group("unified", [5, 499, 500, 7])]), C.INVALID_ARGUMENT,
     r"table 'unified': row 500 \(rows\[2\]\) is outside shard 0 of 2's range \[0, 500\)"),
    ("negative row", dict(tables=[group("cats", [-4])]), C.INVALID_ARGUMENT, r"table 'cats': row -4 "),
    ("rows bytes", dict(tables=[pb.TableLookup(table="unified", rows=b"\x01" * 12)]), C.INVALID_ARGUMENT,
     r"table 'unified': rows has 12 bytes, not a whole number of int64"),
    ("offsets bytes", dict(tables=[pb.TableLookup(table="unified", rows=_R.astype("<i8").tobytes(),
                                                  offsets=b"\x00" * 9, pooling=pb.POOLING_SUM,
                                                  output=pb.OUTPUT_FP16)]),
     C.INVALID_ARGUMENT, r"table 'unified': offsets has 9 bytes"),
    ("offsets start", dict(tables=[group("unified", _R, pb.OUTPUT_FP16, pb.POOLING_SUM, [1, 3])]),
     C.INVALID_ARGUMENT, r"table 'unified': offsets\[0\] must be 0, got 1"),
    ("offsets end", dict(tables=[group("unified", _R, pb.OUTPUT_FP16, pb.POOLING_SUM, [0, 2])]),
     C.INVALID_ARGUMENT, r"offsets\[-1\] must equal the number of rows 3, got 2"),
    ("offsets order", dict(tables=[group("unified", _R, pb.OUTPUT_FP32, pb.POOLING_MEAN, [0, 2, 1, 3])]),
     C.INVALID_ARGUMENT, r"non-decreasing, offsets\[2\] = 1 < offsets\[1\] = 2"),
    ("unknown table", dict(tables=[group("nope", _R)]), C.INVALID_ARGUMENT,
     r"table 'nope': no such table in tiny/v1 \(tables: cats, unified\)"),
    ("packed pooled", dict(tables=[group("unified", _R, pb.OUTPUT_INT4_PACKED, pb.POOLING_SUM)]),
     C.INVALID_ARGUMENT, r"table 'unified': OUTPUT_INT4_PACKED .* needs POOLING_NONE, got POOLING_SUM"),
    ("offsets unpooled", dict(tables=[group("unified", _R, pb.OUTPUT_FP16, pb.POOLING_NONE, [0, 3])]),
     C.INVALID_ARGUMENT, r"table 'unified': offsets must be empty with POOLING_NONE"),
    ("bad enum", dict(tables=[pb.TableLookup(table="cats", output=7)]),  # type: ignore[arg-type]
     C.INVALID_ARGUMENT, r"table 'cats': unknown output 7"),
    ("too many rows", dict(tables=[group("unified", np.zeros(3000)), group("cats", np.zeros(2001))]),
     C.INVALID_ARGUMENT, r"request asks for 5001 rows, more than .*--max-rows-per-request=5000"),
    ("unknown version", dict(version="v9"), C.FAILED_PRECONDITION,
     r"version tiny/v9 is not loaded on shard 0 of 2 \(ready: tiny/v1\)"),
    ("unknown model", dict(model="other"), C.FAILED_PRECONDITION, r"version other/v1 is not loaded"),
    ("fingerprint", dict(fingerprint="sha256:feed"), C.FAILED_PRECONDITION,
     r"tiny/v1 on shard 0 has fingerprint sha256:[0-9a-f]{64}, the request expects sha256:feed"),
]


@pytest.mark.parametrize(("case", "fields", "code", "message"), BAD_REQUESTS,
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_their_code_and_message(stubs: dict[str, pbg.EmbeddingServiceStub], case: str,
                                                 fields: dict[str, object], code: grpc.StatusCode,
                                                 message: str) -> None:
    req = pb.LookupRequest(**{"model": "tiny", "version": "v1", **fields})  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as e:
        stubs["s0"].Lookup(req, timeout=10)
    assert e.value.code() == code, e.value.details()
    assert re.search(message, e.value.details()), e.value.details()


def test_deadlines_are_honoured(stubs: dict[str, pbg.EmbeddingServiceStub]) -> None:
    big = group("unified", np.zeros(2_000_000, np.int64), pb.OUTPUT_FP32)
    with pytest.raises(grpc.RpcError) as e:
        lookup(stubs["r0"], big, big, timeout=0.02)
    assert e.value.code() == C.DEADLINE_EXCEEDED
    assert lookup(stubs["r0"], group("cats", [1])).results[0].count == 1


def test_overload_is_resource_exhausted(stubs: dict[str, pbg.EmbeddingServiceStub]) -> None:
    # Thousands of one-row groups: each request stays in its handler for a long while.
    heavy = [group("unified", [700], pb.OUTPUT_FP32, pb.POOLING_SUM, [0, 1])] * 3000
    codes: list[grpc.StatusCode] = []
    details: list[str] = []

    def one(_: int) -> None:
        try:
            for _ in range(3):
                lookup(stubs["s1"], *heavy, timeout=30)
            codes.append(C.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
            details.append(e.details())

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(one, range(12)))
    assert C.RESOURCE_EXHAUSTED in codes, codes
    assert set(codes) <= {C.OK, C.RESOURCE_EXHAUSTED}
    assert any("overloaded: 2 lookups already in flight (--max-concurrent)" in d for d in details)
    assert lookup(stubs["s1"], group("cats", [20])).results[0].count == 1


# ------------------------------------------------------------------------- versions


def _load(stub: pbg.EmbeddingServiceStub, version: str) -> pb.VersionInfo:
    info: pb.VersionInfo = stub.LoadVersion(pb.LoadVersionRequest(model="tiny", version=version),
                                            metadata=AUTH, timeout=30)
    return info


def _unload(stub: pbg.EmbeddingServiceStub, version: str, drain: float = 0.0) -> pb.VersionInfo:
    req = pb.UnloadVersionRequest(model="tiny", version=version, drain_timeout_s=drain)
    info: pb.VersionInfo = stub.UnloadVersion(req, metadata=AUTH, timeout=30)
    return info


def test_admin_needs_the_bearer_token(stubs: dict[str, pbg.EmbeddingServiceStub]) -> None:
    req = pb.LoadVersionRequest(model="tiny", version="v2")
    cases = [(stubs["s0"], None, "needs metadata 'authorization: Bearer <token>'"),
             (stubs["s0"], [("authorization", "Bearer wrong")], "wrong bearer token"),
             (stubs["s0"], [("authorization", f"Basic {TOKEN}")], "wrong bearer token"),
             (stubs["r0"], AUTH, "admin RPCs are disabled: .* without --admin-token-file")]
    for stub, md, message in cases:
        for call in (stub.LoadVersion, stub.UnloadVersion):
            with pytest.raises(grpc.RpcError) as e:
                call(req if call == stub.LoadVersion else pb.UnloadVersionRequest(model="tiny", version="v1"),
                     metadata=md, timeout=10)
            assert e.value.code() == C.UNAUTHENTICATED and re.search(message, e.value.details())
    # Read-only calls need no token.
    listing = stubs["s0"].ListVersions(pb.ListVersionsRequest(), timeout=10)
    assert [v.version for v in listing.versions] == ["v1"]
    assert stubs["r0"].CheckFit(req, timeout=10).fits


def test_load_serve_list_unload_round_trip(store: Path, stubs: dict[str, pbg.EmbeddingServiceStub]) -> None:
    s = stubs["s1"]
    fit = s.CheckFit(pb.LoadVersionRequest(model="tiny", version="v2"), timeout=10)
    assert fit.fits and fit.required_bytes == 500 * ROW_BYTES + 19 * ROW_BYTES
    info = _load(s, "v2")
    assert (info.state, info.fingerprint, info.bytes) == (pb.VERSION_STATE_READY, fingerprint(store, "v2"),
                                                          fit.required_bytes)
    try:
        assert _load(s, "v2") == info  # idempotent
        listing = s.ListVersions(pb.ListVersionsRequest(model="tiny"), timeout=10)
        assert [(v.version, v.state) for v in listing.versions] == [("v1", pb.VERSION_STATE_READY),
                                                                    ("v2", pb.VERSION_STATE_READY)]
        assert listing.memory_used_bytes == 2 * fit.required_bytes and listing.memory_budget_bytes == 20000
        rows = np.arange(500, 1000, 3)
        for v in ("v1", "v2"):
            resp = lookup(s, group("unified", rows), version=v, fingerprint=fingerprint(store, v))
            assert resp.version == v
            assert resp.results[0].data == file_rows(store, v, "unified", rows).tobytes()
    finally:
        gone = _unload(s, "v2")
    assert gone.state == pb.VERSION_STATE_UNSPECIFIED and gone.in_flight == 0
    with pytest.raises(grpc.RpcError) as e:
        lookup(s, group("cats", [20]), version="v2")
    assert e.value.code() == C.FAILED_PRECONDITION
    assert _unload(s, "v2").state == pb.VERSION_STATE_UNSPECIFIED  # idempotent


def test_admin_refusals(stubs: dict[str, pbg.EmbeddingServiceStub]) -> None:
    s = stubs["s0"]
    for version, code, message in (
            ("v9", C.NOT_FOUND, r"tiny/v9: no such version in store"),
            ("../v1", C.INVALID_ARGUMENT, r"invalid version name '\.\./v1'")):
        with pytest.raises(grpc.RpcError) as e:
            _load(s, version)
        assert e.value.code() == code and re.search(message, e.value.details()), e.value.details()


def test_memory_budget_refuses_a_load_that_does_not_fit(stubs: dict[str, pbg.EmbeddingServiceStub]) -> None:
    s = stubs["s0"]
    need = 500 * ROW_BYTES + 18 * ROW_BYTES
    _load(s, "v2")
    _load(s, "v3")
    try:
        fit = s.CheckFit(pb.LoadVersionRequest(model="tiny", version="v4"), timeout=10)
        assert not fit.fits and fit.available_bytes == 20000 - 3 * need and "needs" in fit.reason
        with pytest.raises(grpc.RpcError) as e:
            _load(s, "v4")
        assert e.value.code() == C.RESOURCE_EXHAUSTED
        assert (f"tiny/v4 needs {need} bytes of tables on shard 0, only {20000 - 3 * need} of the "
                f"20000-byte memory budget are free ({3 * need} used") in e.value.details()
        listing = s.ListVersions(pb.ListVersionsRequest(), timeout=10)
        assert [v.version for v in listing.versions] == ["v1", "v2", "v3"]
    finally:
        _unload(s, "v2")
        _unload(s, "v3")


def test_corrupt_byte_refuses_the_load_and_the_old_version_keeps_serving(
        store: Path, stubs: dict[str, pbg.EmbeddingServiceStub]) -> None:
    s = stubs["s0"]
    with pytest.raises(grpc.RpcError) as e:
        _load(s, "bad")
    assert e.value.code() == C.FAILED_PRECONDITION
    assert re.search(r"load of tiny/bad refused: .*shard-0-of-2.bin sha256 [0-9a-f]+ != manifest "
                     r"[0-9a-f]+ \(corrupt\)", e.value.details()), e.value.details()
    versions = {v.version: v for v in s.ListVersions(pb.ListVersionsRequest(), timeout=10).versions}
    assert versions["bad"].state == pb.VERSION_STATE_FAILED and "corrupt" in versions["bad"].error
    assert versions["bad"].bytes == 0 and versions["v1"].state == pb.VERSION_STATE_READY
    rows = np.arange(0, 500, 5)
    want = file_rows(store, "v1", "unified", rows).tobytes()
    assert lookup(s, group("unified", rows)).results[0].data == want
    with pytest.raises(grpc.RpcError) as e:
        lookup(s, group("unified", rows), version="bad")
    assert e.value.code() == C.FAILED_PRECONDITION and "is FAILED on shard 0" in e.value.details()
    assert _unload(s, "bad").state == pb.VERSION_STATE_UNSPECIFIED
    # Shard 1 checks only its own file, which is intact.
    assert _load(stubs["s1"], "bad").state == pb.VERSION_STATE_READY
    _unload(stubs["s1"], "bad")


def test_unload_under_concurrent_lookups_loses_none(store: Path, stubs: dict[str, pbg.EmbeddingServiceStub]
                                                    ) -> None:
    s = stubs["s0"]
    _load(s, "v2")
    rows = np.random.default_rng(5).integers(0, 500, 4000)
    want = {v: file_rows(store, v, "unified", rows).tobytes() for v in ("v1", "v2")}
    outcomes: dict[str, list[str]] = {"v1": [], "v2": []}
    stop = threading.Event()

    def hammer(version: str) -> None:
        while not stop.is_set():
            try:
                resp = lookup(s, group("unified", rows), version=version)
                ok = resp.version == version and resp.results[0].data == want[version]
                outcomes[version].append("ok" if ok else "WRONG DATA")
            except grpc.RpcError as e:
                gone = e.code() == C.FAILED_PRECONDITION and re.search("UNLOADING|not loaded", e.details())
                outcomes[version].append("refused" if gone else f"{e.code()}: {e.details()}")

    threads = [threading.Thread(target=hammer, args=(v,)) for v in ("v2", "v2", "v1")]
    for t in threads:
        t.start()
    time.sleep(0.3)
    info = _unload(s, "v2", drain=10)
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    assert info.in_flight == 0  # drained, not timed out
    assert set(outcomes["v1"]) == {"ok"}
    assert set(outcomes["v2"]) <= {"ok", "refused"}, set(outcomes["v2"])
    first_refusal = outcomes["v2"].index("refused")
    assert first_refusal > 0 and "refused" in outcomes["v2"][-2:]


# ------------------------------------------------------------------------- operations


def test_health_and_reflection(servers: dict[str, ServerProcess]) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(servers["s0"].address) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE):
            status = h.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(ch).get_services()
        assert SERVICE in services and "grpc.health.v1.Health" in services


def test_metrics(servers: dict[str, ServerProcess], stubs: dict[str, pbg.EmbeddingServiceStub]) -> None:
    lookup(stubs["s0"], group("unified", np.arange(7), pb.OUTPUT_FP16))
    with pytest.raises(grpc.RpcError):
        lookup(stubs["s0"], group("unified", [999]))
    text = _scrape(servers["s0"].metrics_port)
    assert re.search(r'embedding_rows_total\{output="fp16",table="unified"\} ([0-9.e+]+)', text)
    assert re.search(r'embedding_errors_total\{code="INVALID_ARGUMENT"\} [1-9]', text)
    assert re.search(r'embedding_loaded_bytes\{model="tiny",version="v1"\} 6216.0', text)
    assert 'embedding_lookup_duration_seconds_bucket{le="5e-05"}' in text
    assert "embedding_inflight_requests " in text


def _scrape(port: int | None) -> str:
    return str(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())


def test_sigterm_drains_in_flight_lookups_and_exits_zero(store: Path, tmp_path: Path) -> None:
    srv = _server(store, tmp_path, "drain", "--shard", "1", "--num-shards", "2", "--preload", "tiny/v1",
                  "--grace-period", "30", "--metrics-port", "0", "--max-tables-per-request", "3000")
    # Thousands of small groups: long in the handler (per-group work), short on the wire.
    rows = np.random.default_rng(9).integers(500, 1000, 20)
    req = [group("unified", rows, pb.OUTPUT_FP32, pb.POOLING_SUM, [0, 5, 20])] * 3000
    vals = dequantize_rows(file_rows(store, "v1", "unified", rows), DIM).astype(np.float64)
    want = np.stack([vals[:5].sum(0), vals[5:].sum(0)])
    outcomes: list[str] = []
    with srv:
        stub = stub_of(grpc.insecure_channel(srv.address))

        stop = threading.Event()

        def client() -> None:  # keeps lookups in flight until the server refuses them
            while not stop.is_set():
                try:
                    resp = lookup(stub, *req, timeout=30)
                    got = np.frombuffer(b"".join(r.data for r in resp.results), np.float32)
                    ok = got.size == want.size * len(req) and close(got.reshape(-1, *want.shape), want,
                                                                     pb.OUTPUT_FP32)
                    outcomes.append("ok" if ok else "WRONG")
                except grpc.RpcError as e:
                    outcomes.append(f"{e.code().name}: {e.details()}")
                    return

        with ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(client)
            try:
                deadline = time.monotonic() + 20
                while not re.search(r"^embedding_inflight_requests [1-9]", _scrape(srv.metrics_port),
                                    re.M):
                    assert time.monotonic() < deadline, "no lookup ever in flight"
                srv.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                assert srv.proc.wait(timeout=30) == 0  # type: ignore[union-attr]
            finally:
                stop.set()  # a failed assertion must not leave the clients looping forever
    log = srv.log_tail()
    m = re.search(r"draining: (\d+) lookups in flight", log)
    assert m and "stopped: 0 lookups still running were cancelled" in log, log
    # Every lookup the server had started was answered in full; later ones were refused
    # with the retriable UNAVAILABLE (or found the port closed), never CANCELLED.
    assert int(m.group(1)) >= 1 and outcomes.count("ok") >= int(m.group(1)) and "WRONG" not in outcomes
    failures = [o for o in outcomes if o != "ok"]
    assert len(failures) == 4 and all(f.startswith("UNAVAILABLE: ") for f in failures), failures
    assert "UNAVAILABLE: embedding server is shutting down (SIGTERM); retry on another replica" in failures


def test_workers_share_the_port_and_admin_reaches_every_worker(store: Path, tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN)
    srv = _server(store, tmp_path, "workers", "--workers", "2", "--shard", "1", "--num-shards", "2",
                  "--admin-token-file", str(tmp_path / "token"), "--metrics-port", "0")
    with srv:
        with grpc.insecure_channel(srv.address) as ch:
            info = _load(stub_of(ch), "v2")
            assert info.state == pb.VERSION_STATE_READY
        for _ in range(12):  # fresh connections: the kernel spreads them over the workers
            with grpc.insecure_channel(srv.address) as ch:
                stub = stub_of(ch)
                assert lookup(stub, group("cats", [20, 21]), version="v2").results[0].count == 2
                listing = stub.ListVersions(pb.ListVersionsRequest(), timeout=10)
                assert [(v.version, v.state) for v in listing.versions] == [("v2", pb.VERSION_STATE_READY)]
        # Merged over both workers' files; 12 fresh connections all but surely used both.
        text = _scrape(srv.metrics_port)
        m = re.search(r'embedding_rows_total\{output="int4_packed",table="cats"\} ([0-9.]+)', text)
        assert m and float(m.group(1)) == 24.0, text
        assert re.search(r'embedding_loaded_bytes\{model="tiny",version="v2"\} 6228.0', text), text
        assert srv.stop() == 0


def test_bad_flags_and_failed_preload_exit_with_a_message(store: Path, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "embedding_server", *args], capture_output=True,
                              text=True, timeout=60)

    r = run("--store", str(tmp_path / "missing"))
    assert r.returncode == 2 and "--store" in r.stderr and "not a directory" in r.stderr
    r = run("--store", str(store), "--shard", "2", "--num-shards", "2")
    assert r.returncode == 2 and "--shard must be in [0, 2), got 2" in r.stderr
    r = run("--store", str(store), "--memory-budget", "lots")
    assert r.returncode == 2 and "--memory-budget 'lots'" in r.stderr
    copy = tmp_path / "store"
    shutil.copytree(store / "tiny" / "bad", copy / "tiny" / "bad")
    r = run("--store", str(copy), "--num-shards", "2", "--preload", "tiny/bad", "--port", "0")
    assert r.returncode == 2 and "preload of tiny/bad failed" in r.stderr and "corrupt" in r.stderr
