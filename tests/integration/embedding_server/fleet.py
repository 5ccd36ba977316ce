"""Shared pieces of the embedding-server tests: the fleet's token, request builders, file reads.

Expected values come from the shard files through numpy (modelpack.int4.dequantize_rows),
never from the server's code.
"""

from __future__ import annotations

import queue
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt

from loadtest.harness.probes import grpc_serving
from loadtest.harness.process import ServerProcess
from modelpack.hashing import shard_of
from modelpack.manifest import read_manifest
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg

TOKEN = "t0ps3cret"
AUTH = [("authorization", f"Bearer {TOKEN}")]
ROWS, DIM, ROW_BYTES, CATS = 1000, 16, 12, 37
SERVICE = "hybrid.embedding.v1.EmbeddingService"
C = grpc.StatusCode


def server(store: Path, log_dir: Path, name: str, *args: str) -> ServerProcess:
    return ServerProcess.module("embedding_server", "--store", str(store), *args,
                                log_dir=log_dir, name=name, ready=grpc_serving)



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


def load_version(stub: pbg.EmbeddingServiceStub, version: str) -> pb.VersionInfo:
    info: pb.VersionInfo = stub.LoadVersion(pb.LoadVersionRequest(model="tiny", version=version),
                                            metadata=AUTH, timeout=30)
    return info


def unload_version(stub: pbg.EmbeddingServiceStub, version: str, drain: float = 0.0) -> pb.VersionInfo:
    req = pb.UnloadVersionRequest(model="tiny", version=version, drain_timeout_s=drain)
    info: pb.VersionInfo = stub.UnloadVersion(req, metadata=AUTH, timeout=30)
    return info


class StreamClient:
    """One LookupStream used from a test: send requests, receive answers (in any order)."""

    def __init__(self, stub: pbg.EmbeddingServiceStub, *, timeout: float = 30.0,
                 metadata: Sequence[tuple[str, str]] | None = None) -> None:
        self._q: queue.SimpleQueue[pb.LookupRequest | None] = queue.SimpleQueue()
        self.call = stub.LookupStream(iter(self._q.get, None), timeout=timeout, metadata=metadata)

    def send(self, req: pb.LookupRequest) -> None:
        self._q.put(req)

    def recv(self) -> pb.LookupResponse:
        resp: pb.LookupResponse = next(self.call)
        return resp

    def answers(self, n: int) -> dict[int, pb.LookupResponse]:
        """The next n answers, by id."""
        out = {}
        for _ in range(n):
            r = self.recv()
            out[r.id] = r
        assert len(out) == n, "two answers carried the same id"
        return out

    def close(self) -> None:
        """Half-close: the server ends the stream with OK once everything is answered."""
        self._q.put(None)
