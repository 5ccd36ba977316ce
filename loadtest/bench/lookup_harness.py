"""Shared pieces of the embedding benchmarks (P1 embedding.py, P3 scale.py): random INT4
tables written with the streaming VersionWriter, a real pinned `python -m embedding_server`,
lookup requests per cell, and the in-process anchors the gRPC path is judged against.
Closed-loop drivers and their statistics are in grpc_driver.py; /proc readers in
loadtest/harness/procfs.py.
"""

from __future__ import annotations

import logging
import mmap
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import torch

from loadtest.harness.process import ServerProcess
from loadtest.harness.procfs import pin_process
from modelpack.dense import build_dense
from modelpack.manifest import Manifest, read_manifest
from modelpack.schema import DenseFeature, DenseSpec, FeatureSchema, SparseFeature, TableSpec
from modelpack.writer import VersionWriter
from protos import embedding_pb2 as pb

log = logging.getLogger("bench")
MODEL, TABLE = "bench", "ids"
BATCHES = (512, 4096, 16384)
MODES = ("packed", "pooled")
BAG = 20  # pooled: rows per bag (L)
SERVER_CPU, CLIENT_CPU = 0, 1


def taskset(cpus: set[int] | None, argv: Sequence[str]) -> list[str]:
    """`argv` started under `taskset -c cpus` (where taskset exists): pinned from its first thread."""
    if cpus is None or not shutil.which("taskset"):
        return list(argv)
    return ["taskset", "-c", ",".join(map(str, sorted(cpus))), *argv]


# --------------------------------------------------------------------------- tables


class RandomBlocks:
    """Float32 row blocks for a synthetic table, cheap to make: a small pool of random
    blocks reused with a different additive offset per block (data generation is not
    what is measured; the writer still quantizes every block)."""

    def __init__(self, dim: int, seed: int, block_rows: int = 1 << 18, pool: int = 4) -> None:
        rng = np.random.default_rng(seed)
        self.block_rows = block_rows
        self.pool = [rng.standard_normal((block_rows, dim), dtype=np.float32) for _ in range(pool)]
        self.offsets = rng.uniform(-1.0, 1.0, 4096).astype(np.float32)
        self._buf = np.empty((block_rows, dim), dtype=np.float32)

    def blocks(self, rows: int, deadline: float | None = None) -> Iterator[npt.NDArray[np.float32]]:
        """Yield blocks covering `rows` rows in order (the yielded buffer is reused); raise
        TimeoutError once time.monotonic() passes `deadline`."""
        done, i = 0, 0
        while done < rows:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"time limit reached after writing {done} of {rows} rows")
            n = min(self.block_rows, rows - done)
            out = self._buf[:n]
            np.add(self.pool[i % len(self.pool)][:n], self.offsets[i % self.offsets.size], out=out)
            yield out
            done += n
            i += 1


def bench_schema(dim: int) -> tuple[FeatureSchema, DenseSpec, dict[str, Any]]:
    config: dict[str, Any] = {"num_sparse": 1, "embedding_dim": dim, "num_dense": 1,
                              "cross_layers": 1, "cross_rank": 4, "mlp_dims": [8]}
    schema = FeatureSchema(sparse=(SparseFeature("entity_id", "candidate", TABLE, 1),),
                           dense=(DenseFeature("bid", "candidate"),))
    return schema, DenseSpec("dcn_v2", config), config


def write_random_version(store: Path, version: str, rows: int, dim: int, *, seed: int,
                         progress: bool = True, model: str = MODEL, deadline: float | None = None
                         ) -> tuple[Manifest, float]:
    """Write STORE/model/version holding one `rows` x `dim` INT4 table (one file) with the
    streaming VersionWriter; returns (manifest, seconds). Past `deadline` (monotonic) the
    write stops with TimeoutError and the writer removes its temp directory."""
    schema, dense_spec, config = bench_schema(dim)
    spec = TableSpec(TABLE, rows, dim, num_shards=1)
    gen = RandomBlocks(dim, seed)
    t0 = time.monotonic()
    with VersionWriter(store, model, version, schema, [spec], dense_spec, progress=progress,
                       provenance={"benchmark": "synthetic", "seed": seed}, overwrite=True) as w:
        w.write_table_blocks(TABLE, gen.blocks(rows, deadline))
        torch.manual_seed(seed)
        w.write_dense(build_dense("dcn_v2", config))
    assert w.manifest is not None
    return w.manifest, time.monotonic() - t0


def reuse_or_write(store: Path, version: str, rows: int, dim: int, *, seed: int,
                   progress: bool = True, model: str = MODEL) -> tuple[Manifest, float | None]:
    """The version if it already exists with this shape (write seconds None), else write it."""
    vdir = store / model / version
    if (vdir / "manifest.json").exists():
        m = read_manifest(vdir)
        t = m.table(TABLE)
        if (t.rows, t.dim, t.num_shards) == (rows, dim, 1):
            log.info("reusing %s (%d x %d)", vdir, rows, dim)
            return m, None
    return write_random_version(store, version, rows, dim, seed=seed, progress=progress, model=model)


@dataclass
class MappedTable:
    """A table file mapped exactly as the server maps it (read-only, shared), with its kernel."""

    rows: int
    dim: int
    weights: torch.Tensor  # uint8 (rows, 4 + dim/2)
    kernel: Any  # embedding_server.fbgemm_tbe.Int4Kernel


def map_table(version_dir: Path, rows: int, dim: int) -> MappedTable:
    from embedding_server.fbgemm_tbe import Int4Kernel

    row_bytes = 4 + dim // 2
    with open(version_dir / f"tables/{TABLE}/shard-0-of-1.bin", "rb") as f:
        mm = mmap.mmap(f.fileno(), rows * row_bytes, prot=mmap.PROT_READ)
    arr = np.frombuffer(mm, dtype=np.uint8, count=rows * row_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only memory is the point
        w = torch.from_numpy(arr).view(rows, row_bytes)
    return MappedTable(rows, dim, w, Int4Kernel(TABLE, rows, dim, w))


# --------------------------------------------------------------------------- server


def start_server(store: Path, preload: Sequence[str], log_dir: Path, *, name: str = "server",
                 cpus: set[int] | None = None, extra: Sequence[str] = (),
                 timeout_s: float = 600.0) -> ServerProcess:
    """`python -m embedding_server` on a free loopback port, optionally pinned to `cpus`.

    Ready once its port file exists (written after every --preload is READY); `ready_s`
    is the time to that point. Stop it with stop() (SIGTERM, SIGKILL after a timeout).
    """
    argv = [sys.executable, "-m", "embedding_server", "--store", str(store), "--host", "127.0.0.1",
            *extra, *(a for p in preload for a in ("--preload", p))]
    server = ServerProcess(taskset(cpus, argv), log_dir=log_dir, name=name).start()
    server.wait_ready(timeout=timeout_s)
    if cpus is not None:
        pin_process(server.pid, cpus)  # also without taskset, and threads started since
    return server


# --------------------------------------------------------------------------- requests


@dataclass
class Cell:
    """One measured configuration: a mode and a batch size (rows per call)."""

    mode: str  # "packed" | "pooled"
    batch: int

    @property
    def name(self) -> str:
        return f"{self.mode}-{self.batch}"

    @property
    def bags(self) -> int:
        return self.batch if self.mode == "packed" else -(-self.batch // BAG)


def offsets_for(batch: int) -> npt.NDArray[np.int64]:
    """Bags of BAG rows (the last one shorter when BAG does not divide the batch)."""
    return np.append(np.arange(0, batch, BAG, dtype=np.int64), np.int64(batch))


def random_rows(rng: np.random.Generator, table_rows: int, n: int) -> npt.NDArray[np.int64]:
    return rng.integers(0, table_rows, n, dtype=np.int64)


def lookup_request(cell: Cell, rows: npt.NDArray[np.int64], version: str, fingerprint: str,
                   model: str = MODEL) -> pb.LookupRequest:
    g = pb.TableLookup(table=TABLE, rows=rows.astype("<i8").tobytes())
    if cell.mode == "packed":
        g.pooling, g.output = pb.POOLING_NONE, pb.OUTPUT_INT4_PACKED
    else:
        g.pooling, g.output = pb.POOLING_SUM, pb.OUTPUT_FP16
        g.offsets = offsets_for(cell.batch).astype("<i8").tobytes()
    return pb.LookupRequest(model=model, version=version, fingerprint=fingerprint, tables=[g])


def anchor_call(cell: Cell, table: MappedTable) -> Callable[[npt.NDArray[np.int64]], Callable[[], bytes]]:
    """Given rows, a zero-argument callable running the server's kernel on them in-process
    and copying the answer out once (bytes): the gather + copy the server is judged by.
    Packed rows are gathered as the server does, with np.take (~0.65x torch.index_select's
    CPU time for these sizes)."""
    packed = table.weights.numpy()

    def make(rows: npt.NDArray[np.int64]) -> Callable[[], bytes]:
        if cell.mode == "packed":
            return lambda: np.take(packed, rows, axis=0, mode="clip").tobytes()
        idx, off = torch.from_numpy(rows), torch.from_numpy(offsets_for(cell.batch))
        return lambda: table.kernel.lookup(idx, off, "sum", "fp16").numpy().tobytes()

    return make


class _Context:
    """Just enough of grpc.ServicerContext for EmbeddingServicer.Lookup: no deadline."""

    def time_remaining(self) -> None:
        return None

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"{code.name}: {details}")

    def set_trailing_metadata(self, metadata: object) -> None:
        pass


def in_process_servicer(store: Path, version: str, model: str = MODEL
                        ) -> Callable[[bytes], Callable[[], bytes]]:
    """The server's whole per-request Python work without the gRPC transport: parse the
    request, EmbeddingServicer.Lookup (in-flight limit, version hold, validation, kernel,
    metrics, the answer's wire bytes). Returns raw request -> zero-argument callable."""
    from embedding_server.auth import AdminAuth
    from embedding_server.config import ServerConfig
    from embedding_server.metrics import Metrics
    from embedding_server.servicer import EmbeddingServicer
    from embedding_server.versions import VersionRegistry

    cfg = ServerConfig(store=store, memory_budget_bytes=1 << 50)
    registry = VersionRegistry(store, 0, 1, cfg.memory_budget_bytes)
    registry.load(model, version)  # verifies checksums and maps, as the server does
    servicer = EmbeddingServicer(cfg, registry, Metrics(), AdminAuth(None))
    ctx: Any = _Context()

    def make(raw: bytes) -> Callable[[], bytes]:
        def call() -> bytes:
            return servicer.Lookup(pb.LookupRequest.FromString(raw), ctx)  # wire bytes already

        return call

    return make


def check_answer(cell: Cell, table: MappedTable, rows: npt.NDArray[np.int64], raw: bytes,
                 version: str) -> None:
    """The server's answer must equal the in-process kernel's, byte for byte."""
    resp = pb.LookupResponse.FromString(raw)
    if resp.version != version or len(resp.results) != 1:
        raise AssertionError(f"{cell.name}: unexpected answer {resp.version} {len(resp.results)}")
    if resp.results[0].data != anchor_call(cell, table)(rows)():
        raise AssertionError(f"{cell.name}: gRPC answer differs from the in-process kernel")
