"""Health, reflection, metrics, SIGTERM drain, --workers, bad flags: the server as operated."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest.harness.process import ServerProcess
from modelpack.int4 import dequantize_rows
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg
from tests.integration.embedding_server.fleet import (
    DIM,
    SERVICE,
    TOKEN,
    C,
    StreamClient,
    close,
    file_rows,
    group,
    load_version,
    lookup,
    server,
    stub_of,
)

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
    for bad in (pb.LookupRequest(model="tiny", version="v1", tables=[group("unified", [999])]),
                pb.LookupRequest(model="tiny", version="v9"),
                pb.LookupRequest(model="tiny", version="v1", fingerprint="sha256:feed")):
        with pytest.raises(grpc.RpcError):
            stubs["s0"].Lookup(bad, timeout=10)
    text = _scrape(servers["s0"].metrics_port)
    for reason in ("version_not_loaded", "fingerprint_mismatch"):  # counted apart
        assert re.search(rf'embedding_errors_total\{{code="FAILED_PRECONDITION",reason="{reason}"\}} [1-9]',
                         text), reason
    assert re.search(r'embedding_rows_total\{output="fp16",table="unified"\} ([0-9.e+]+)', text)
    assert re.search(r'embedding_errors_total\{code="INVALID_ARGUMENT",reason="invalid_argument"\} [1-9]',
                     text)
    assert re.search(r'embedding_loaded_bytes\{model="tiny",version="v1"\} 6216.0', text)
    assert 'embedding_lookup_duration_seconds_bucket{le="5e-05"}' in text
    assert "embedding_inflight_requests " in text


def _with_id(req: pb.LookupRequest, rid: int) -> pb.LookupRequest:
    out = pb.LookupRequest()
    out.CopyFrom(req)  # a copy per message: the stream serializes it later, on its own thread
    out.id = rid
    return out


def _scrape(port: int | None) -> str:
    return str(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())


def test_sigterm_drains_in_flight_lookups_and_streams_and_exits_zero(store: Path, tmp_path: Path) -> None:
    srv = server(store, tmp_path, "drain", "--shard", "1", "--num-shards", "2", "--preload", "tiny/v1",
                  "--grace-period", "30", "--metrics-port", "0", "--max-tables-per-request", "3000")
    # Thousands of small groups: long in the handler (per-group work), short on the wire.
    rows = np.random.default_rng(9).integers(500, 1000, 20)
    req = [group("unified", rows, pb.OUTPUT_FP32, pb.POOLING_SUM, [0, 5, 20])] * 3000
    vals = dequantize_rows(file_rows(store, "v1", "unified", rows), DIM).astype(np.float64)
    want = np.stack([vals[:5].sum(0), vals[5:].sum(0)])
    outcomes: list[str] = []
    streamed: list[list[str]] = [[], []]

    def right(resp: pb.LookupResponse) -> bool:  # every group's answer is `want`
        got = np.frombuffer(b"".join(r.data for r in resp.results), np.float32)
        return got.size == want.size * len(resp.results) and close(got.reshape(-1, *want.shape), want,
                                                                   pb.OUTPUT_FP32)

    with srv:
        stub = stub_of(grpc.insecure_channel(srv.address))
        stop = threading.Event()

        full = pb.LookupRequest(model="tiny", version="v1", tables=req)  # built once: clients stay quick

        def client() -> None:  # keeps lookups in flight until the server refuses them
            answers = []  # checked at the end: each call follows the last answer at once
            while not stop.is_set():
                try:
                    answers.append(stub.Lookup(full, timeout=30))
                except grpc.RpcError as e:
                    outcomes.extend("ok" if right(a) else "WRONG" for a in answers)
                    outcomes.append(f"{e.code().name}: {e.details()}")
                    return

        probed: list[str] = []
        small = pb.LookupRequest(model="tiny", version="v1", tables=[group("cats", [30])])

        def probe() -> None:  # tiny lookups back to back: one is bound to arrive while draining
            while not stop.is_set():  # (each arrival holds the drain open for _QUIET_S = 0.2 s)
                try:
                    stub.Lookup(small, timeout=30)
                except grpc.RpcError as e:
                    probed.append(f"{e.code().name}: {e.details()}")
                    return

        started = [threading.Event(), threading.Event()]

        def streamer(k: int) -> None:  # two (smaller) lookups in flight until one is refused
            st, sent, mine = StreamClient(stub, timeout=60), 0, streamed[k]
            part = pb.LookupRequest(model="tiny", version="v1", tables=req[:300])
            try:
                for _ in range(2):
                    sent += 1
                    st.send(_with_id(part, sent))
                while not (r := st.recv()).HasField("failure"):
                    mine.append("ok" if right(r) else "WRONG")
                    started[k].set()
                    sent += 1
                    st.send(_with_id(part, sent))
                mine.append(f"failure {r.failure.reason} {r.failure.code}")
                rest = list(st.call)  # the stream then ends by itself
                mine.append(f"end {st.call.code().name} {len(rest)} "
                                f"{dict(st.call.trailing_metadata() or ()).get('x-embedding-draining')}")
            except grpc.RpcError as e:
                mine.append(f"stream failed: {e.code().name} {e.details()}")
            finally:
                st.close()

        idle = StreamClient(stub, timeout=60)  # one answer, then nothing in flight at SIGTERM
        idle.send(pb.LookupRequest(model="tiny", version="v1", tables=[group("cats", [30])]))
        assert idle.recv().results[0].count == 1
        with ThreadPoolExecutor(7) as pool:
            for fn in (client,) * 4 + (probe,):
                pool.submit(fn)
            for k in range(2):
                pool.submit(streamer, k)
            try:
                assert all(e.wait(20) for e in started), "the streams never answered"
                deadline = time.monotonic() + 20
                while not re.search(r"^embedding_inflight_requests [2-9]", _scrape(srv.metrics_port),
                                    re.M):
                    assert time.monotonic() < deadline, "no lookups in flight"
                t0 = time.monotonic()
                srv.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                assert srv.proc.wait(timeout=30) == 0  # type: ignore[union-attr]
                assert time.monotonic() - t0 < 10, "an idle stream held the server for the grace period"
            finally:
                stop.set()  # a failed assertion must not leave the clients looping forever
        with pytest.raises(grpc.RpcError):  # the idle stream is cancelled: it had nothing in flight
            idle.recv()
        idle.close()
    log = srv.log_tail()
    m = re.search(r"draining: (\d+) lookups in flight", log)
    assert m and "stopped: 0 lookups still running were cancelled" in log, log
    # Every lookup the server had started was answered in full; later ones were refused
    # with the retriable UNAVAILABLE (or found the port closed), never CANCELLED.
    oks = outcomes.count("ok") + sum(st.count("ok") for st in streamed)
    assert int(m.group(1)) >= 1 and oks >= int(m.group(1))
    assert "WRONG" not in outcomes + streamed[0] + streamed[1]
    failures = [o for o in outcomes if o != "ok"]
    assert len(failures) == 4 and all(f.startswith("UNAVAILABLE: ") for f in failures), failures
    # Each client sent again as soon as it was answered, and the drain waits _QUIET_S after
    # the last answer: the refusal is the clear `draining` one, not a CANCELLED from stop.
    drained = "UNAVAILABLE: embedding server is shutting down (SIGTERM); retry on another replica"
    assert failures == [drained] * 4 and probed == [drained]
    # Each stream: its received lookups answered, then one `draining` failure, then a clean end.
    for st in streamed:
        assert [s for s in st if s != "ok"] == [f"failure draining {C.UNAVAILABLE.value[0]}",
                                                 "end OK 0 1"], st


def test_workers_share_the_port_and_admin_reaches_every_worker(store: Path, tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN)
    srv = server(store, tmp_path, "workers", "--workers", "2", "--shard", "1", "--num-shards", "2",
                  "--admin-token-file", str(tmp_path / "token"), "--metrics-port", "0")
    with srv:
        with grpc.insecure_channel(srv.address) as ch:
            info = load_version(stub_of(ch), "v2")
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

