"""Delta updates on a real server: ApplyDeltas, reads at (V, s) over unary and stream, the
readable window, a corrupt delta refused, SIGKILL and a restart that replays the committed seq.

A server of its own (shard 0 of 2, its own store with deltas 1..4 of tiny/v1, delta 4 with
a flipped byte): the package's shared fleet keeps its memory budget for its own tests.
Expected rows come from the files through modelpack (read_chain + overlay_rows), never
from the server's code.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from loadtest.harness.probes import metric_sum
from loadtest.harness.process import ServerProcess
from modelpack import desired
from modelpack.delta_read import overlay_rows, read_chain
from modelpack.delta_write import write_delta
from modelpack.desired import DesiredModel
from modelpack.int4 import dequantize_rows
from modelpack.lookup import REASON_METADATA
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg
from tests.helpers_store import tiny_version
from tests.integration.embedding_server.fleet import (
    AUTH,
    DIM,
    TOKEN,
    C,
    StreamClient,
    file_rows,
    group,
    server,
    stub_of,
)

ROWS = np.array([0, 1, 5, 17, 250, 251, 499, 17, 0, 333], dtype=np.int64)  # shard 0's range: [0, 500)
CATS = np.array([0, 1, 2, 17, 3], dtype=np.int64)  # [0, 18)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, ServerProcess]]:
    store = tmp_path_factory.mktemp("delta-store")
    logs = tmp_path_factory.mktemp("delta-logs")
    (logs / "token").write_text(TOKEN + "\n")
    tiny_version(store, "v1", seed=11)
    vdir = store / "tiny" / "v1"
    rng = np.random.default_rng(11)
    for _ in range(4):  # rows on both shards (and both files), overlapping from delta to delta
        rows = np.unique(np.concatenate([rng.choice(ROWS, 4, replace=False), rng.integers(0, 1000, 30)]))
        cats = rng.choice(18, 5, replace=False)
        write_delta(vdir, {"unified": (rows, rng.standard_normal((rows.size, DIM)).astype(np.float32)),
                           "cats": (cats, rng.standard_normal((5, DIM)).astype(np.float32))})
    bad = vdir / "deltas" / "4" / "tables" / "unified" / "rows.int4"
    data = bytearray(bad.read_bytes())
    data[7] ^= 0x01
    bad.write_bytes(bytes(data))
    proc = server(store, logs, "d0", "--shard", "0", "--num-shards", "2", "--preload", "tiny/v1",
                  "--admin-token-file", str(logs / "token"), "--metrics-port", "0",
                  "--desired-state", str(logs / "desired.json"), "--grace-period", "1")
    proc.start().wait_ready()
    yield store, logs, proc
    proc.stop()


@contextmanager
def connect(proc: ServerProcess) -> Iterator[pbg.EmbeddingServiceStub]:
    with grpc.insecure_channel(proc.address) as ch:
        yield stub_of(ch)


def apply(stub: pbg.EmbeddingServiceStub, seq: int, fingerprint: str = "", model: str = "tiny",
          version: str = "v1", metadata: list[tuple[str, str]] | None = AUTH) -> pb.VersionInfo:
    req = pb.ApplyDeltasRequest(model=model, version=version, seq=seq, fingerprint=fingerprint)
    info: pb.VersionInfo = stub.ApplyDeltas(req, metadata=metadata, timeout=30)
    return info


def request(seq: int, *groups: pb.TableLookup, rid: int = 0) -> pb.LookupRequest:
    return pb.LookupRequest(model="tiny", version="v1", seq=seq, id=rid, tables=list(groups))


def want_packed(store: Path, seq: int, table: str, rows: np.ndarray) -> np.ndarray:
    chain = read_chain(store / "tiny" / "v1", seq) if seq else []
    return overlay_rows(file_rows(store, "v1", table, rows), rows, [d.tables[table] for d in chain
                                                                     if table in d.tables])


def check_reads(stub: pbg.EmbeddingServiceStub, store: Path, seq: int) -> None:
    """Packed and mean-pooled fp32 answers at `seq`, unary, equal the files' rows at seq."""
    offsets = np.array([0, 3, 3, 7, ROWS.size])
    resp = stub.Lookup(request(seq, group("unified", ROWS), group("cats", CATS),
                               group("unified", ROWS, pb.OUTPUT_FP32, pb.POOLING_MEAN, offsets)),
                       timeout=10)
    assert resp.seq == seq
    assert resp.results[0].data == want_packed(store, seq, "unified", ROWS).tobytes()
    assert resp.results[1].data == want_packed(store, seq, "cats", CATS).tobytes()
    rows = dequantize_rows(want_packed(store, seq, "unified", ROWS), DIM).astype(np.float64)
    mean = np.stack([rows[a:b].mean(axis=0) if b > a else np.zeros(DIM)
                     for a, b in itertools.pairwise(offsets)])
    got = np.frombuffer(resp.results[2].data, np.float32).reshape(-1, DIM)
    np.testing.assert_allclose(got, mean, rtol=1e-5, atol=1e-4)


def test_apply_read_refuse_kill_and_replay(world: tuple[Path, Path, ServerProcess]) -> None:
    store, logs, proc = world
    with connect(proc) as stub:
        info = apply(stub, 1)
        assert (list(info.readable_seqs), info.applied_seq) == ([0, 1], 1) and info.overlay_bytes > 0
        assert list(apply(stub, 2).readable_seqs) == [1, 2]
        chain = read_chain(store / "tiny" / "v1", 3)
        info = apply(stub, 3, fingerprint=chain[2].manifest.fingerprint)
        assert (list(info.readable_seqs), info.applied_seq) == ([2, 3], 3)
        assert apply(stub, 3) == info  # idempotent
        for seq in (3, 2):  # both readable seqs of the advance answer their own rows
            check_reads(stub, store, seq)
        with pytest.raises(grpc.RpcError) as e:  # seq 0 left the window after K = 2 advances
            stub.Lookup(request(0, group("unified", ROWS)), timeout=10)
        assert e.value.code() == C.FAILED_PRECONDITION
        assert dict(e.value.trailing_metadata())[REASON_METADATA] == "seq_not_applied"
        assert ("version tiny/v1 on shard 0 cannot be read at delta seq 0: readable seqs [2, 3]"
                in e.value.details())
        stream = StreamClient(stub)
        stream.send(request(3, group("unified", ROWS), rid=1))
        stream.send(request(1, group("unified", ROWS), rid=2))
        got = stream.answers(2)
        stream.close()
        assert got[1].seq == 3 and got[1].results[0].data == want_packed(store, 3, "unified", ROWS).tobytes()
        failed = got[2].failure
        assert (failed.reason, failed.code) == ("seq_not_applied", C.FAILED_PRECONDITION.value[0])
        assert "delta seq 1: readable seqs [2, 3]" in got[2].failure.message

        for seq, fp, message in (
                (4, "", r"tiny/v1 delta 4: file tables/unified/rows.int4 sha256 .* \(corrupt\); "
                        r"this shard still reads tiny/v1 at seqs \[2, 3\]"),
                (3, "sha256:" + "0" * 64, r"tiny/v1 delta 3 has fingerprint sha256:\w+, the request "
                                          r"expects sha256:0000")):
            with pytest.raises(grpc.RpcError) as e:
                apply(stub, seq, fingerprint=fp)
            assert e.value.code() == C.FAILED_PRECONDITION
            assert re.search(message, e.value.details()), e.value.details()
            assert dict(e.value.trailing_metadata())[REASON_METADATA] == "delta_refused"
        check_reads(stub, store, 3)  # the refusal changed nothing
        listed = stub.ListVersions(pb.ListVersionsRequest(), timeout=10).versions[0]
        assert list(listed.readable_seqs) == [2, 3]
        metrics = f"127.0.0.1:{proc.metrics_port}"
        assert metric_sum(metrics, "embedding_delta_applied_seq{") == 3
        assert metric_sum(metrics, "embedding_delta_overlay_bytes{") == info.overlay_bytes
        assert metric_sum(metrics, 'embedding_errors_total{code="FAILED_PRECONDITION",'
                                   'reason="seq_not_applied"}') == 2
        assert metric_sum(metrics, "embedding_delta_rows_applied_total") > 0

        # A rebuild below the window (deltas 1..1 from V), killed while it runs or just after.
        threading.Thread(target=_rebuild_killed, args=(stub,), daemon=True).start()
        proc.send(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    desired.write(logs / "desired.json", {"tiny": DesiredModel("v1", ("v1",), {"v1": 1.0}, deltas={"v1": 3})})
    proc.start().wait_ready()
    log = proc.log_path.read_text()
    assert log.index("replayed to committed delta seq 3") < log.index("SERVING")
    with connect(proc) as stub:
        info = stub.ListVersions(pb.ListVersionsRequest(), timeout=10).versions[0]
        assert (list(info.readable_seqs), info.applied_seq) == ([0, 3], 3)
        check_reads(stub, store, 3)


def _rebuild_killed(stub: pbg.EmbeddingServiceStub) -> None:
    with contextlib.suppress(grpc.RpcError):  # the server is killed under it
        apply(stub, 1)


def test_apply_deltas_refuses_bad_input(world: tuple[Path, Path, ServerProcess]) -> None:
    _, _, proc = world
    with connect(proc) as stub:
        cases = [
            (dict(metadata=None), C.UNAUTHENTICATED, "needs metadata 'authorization: Bearer <token>'"),
            (dict(metadata=[("authorization", "Bearer nope")]), C.UNAUTHENTICATED, "wrong bearer token"),
            (dict(version="../v1"), C.INVALID_ARGUMENT, r"invalid version name '\.\./v1'"),
            (dict(model="ti ny"), C.INVALID_ARGUMENT, "invalid model name"),
            (dict(version="v9"), C.FAILED_PRECONDITION, r"version tiny/v9 is not loaded on shard 0"),
            (dict(seq=10**13), C.INVALID_ARGUMENT, r"ApplyDeltas seq must be an integer in \[1, "),
        ]
        for kwargs, code, message in cases:
            args = {"seq": 1, **kwargs}
            with pytest.raises(grpc.RpcError) as e:
                apply(stub, **args)  # type: ignore[arg-type]
            assert e.value.code() == code and re.search(message, e.value.details()), e.value.details()
