"""P1 (issue 3): embedding lookups through gRPC on loopback vs the same kernel in-process.

    python -m loadtest.bench_embedding                       # 20M x 32 table, ~2-3 minutes
    python -m loadtest.bench_embedding --rows 2000000 --seconds 0.5 --no-workers --no-profile

For batches of 512 / 4096 / 16384 rows, single-ID INT4_PACKED and pooled (L=20, FP16):

- in-process anchor: the server's own kernel on the same memory-mapped table, one thread
  pinned to one core (torch.index_select of packed rows; Int4Kernel.lookup for pooled);
- gRPC: a real `python -m embedding_server` process pinned to core 0, this process (the
  client) pinned to core 1; sync stubs sending pre-serialized requests and keeping the
  raw response bytes (no client-side protobuf work); closed loop, 1 and 2 callers.

Every measurement is repeated in rounds that interleave the anchor and gRPC for each cell,
so slow phases of a shared machine hit both alike; a cell's rate is the median of its
rounds, its latencies are percentiles over all calls. The ratio gRPC / in-process is
what the targets judge (>= 0.85x at 16384 rows, >= 0.7x at 4096, p99 <= 2 ms per
4096-row RPC). When one is missed, the server is profiled with py-spy under that load.
Optionally (`--workers`, default on) the same server with `--workers 2` is compared
with one worker, both unpinned. Results: JSON (with os.getloadavg() before/after) + PNG.

The helpers (table writer, server process, drivers, stats) are reused by bench_scale.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import mmap
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import torch

from modelpack.dense import build_dense
from modelpack.manifest import Manifest, read_manifest
from modelpack.schema import DenseFeature, DenseSpec, FeatureSchema, SparseFeature, TableSpec
from modelpack.writer import VersionWriter
from protos import embedding_pb2 as pb

log = logging.getLogger("bench")
METHOD = "/hybrid.embedding.v1.EmbeddingService/Lookup"
MODEL, TABLE = "bench", "ids"
BATCHES = (512, 4096, 16384)
MODES = ("packed", "pooled")
BAG = 20  # pooled: rows per bag (L)
RESULTS = Path(__file__).resolve().parent / "results"
SERVER_CPU, CLIENT_CPU = 0, 1


# --------------------------------------------------------------------------- machine


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def pin(cpus: set[int] | None) -> None:
    """Pin the calling thread (and threads it starts later) to `cpus`; None = all CPUs."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus if cpus is not None else set(range(os.cpu_count() or 1)))


def pin_process(pid: int, cpus: set[int] | None) -> None:
    """Pin every thread of `pid` (and its children's) to `cpus`; None = all CPUs."""
    cpus = cpus if cpus is not None else set(range(os.cpu_count() or 1))
    for p in [pid, *child_pids(pid)]:
        for tid in os.listdir(f"/proc/{p}/task") if os.path.isdir(f"/proc/{p}/task") else []:
            with contextlib.suppress(OSError):  # the thread just exited
                os.sched_setaffinity(int(tid), cpus)


def child_pids(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its live children."""
    total = 0.0
    for p in [pid, *child_pids(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in bytes (Rss, Pss, Private_Dirty, Anonymous, ...)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        m = re.match(r"(\w+):\s+(\d+) kB", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * 1024
    return out


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
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only memory is the point
        w = torch.from_numpy(arr).view(rows, row_bytes)
    return MappedTable(rows, dim, w, Int4Kernel(TABLE, rows, dim, w))


# --------------------------------------------------------------------------- server


class EmbeddingServer:
    """`python -m embedding_server` on a free 127.0.0.1 port, optionally pinned with taskset.

    Ready once its port file exists (written after every --preload is READY). Stopped
    with SIGTERM (SIGKILL after a timeout) by stop() / the context manager.
    """

    def __init__(self, store: Path, preload: Sequence[str], log_dir: Path, *, name: str = "server",
                 cpus: set[int] | None = None, extra: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> None:
        self.port_file = log_dir / f"{name}.port"
        self.log_path = log_dir / f"{name}.log"
        argv = [sys.executable, "-m", "embedding_server", "--store", str(store), "--host", "127.0.0.1",
                "--port", "0", "--port-file", str(self.port_file), *extra]
        for p in preload:
            argv += ["--preload", p]
        if cpus is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *argv]
        self.argv, self.cpus, self.env = argv, cpus, {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.spawned_at = 0.0
        self.ready_s = 0.0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self, timeout_s: float = 600.0) -> EmbeddingServer:
        self.port_file.unlink(missing_ok=True)
        self.spawned_at = time.monotonic()
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(self.argv, stdout=logf, stderr=subprocess.STDOUT, env=self.env)
        while not self.port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() - self.spawned_at > timeout_s:
                self.stop(signal.SIGKILL)
                raise TimeoutError(f"server not ready after {timeout_s}s:\n{self.log_tail()}")
            time.sleep(0.02)
        self.ready_s = time.monotonic() - self.spawned_at
        self.port = int(self.port_file.read_text().split()[0])
        if self.cpus is not None:
            pin_process(self.pid, self.cpus)  # also without taskset
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> EmbeddingServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


_FLOOR_SERVER = """
import sys, threading, grpc
from concurrent.futures import ThreadPoolExecutor
sizes = {}
def handle(req, ctx):  # request = b"<answer size>;" + padding; answer that many bytes, prebuilt
    n = int(req.split(b";", 1)[0] or b"0")
    if n not in sizes:
        sizes[n] = bytes(n)
    return sizes[n]
h = grpc.method_handlers_generic_handler("floor.Floor", {"Echo": grpc.unary_unary_rpc_method_handler(handle)})
srv = grpc.server(ThreadPoolExecutor(max_workers=40), options=[("grpc.max_send_message_length", -1)])
srv.add_generic_rpc_handlers((h,))
port = srv.add_insecure_port("127.0.0.1:0")
srv.start()
open(sys.argv[1] + ".tmp", "w").write(str(port))
import os; os.replace(sys.argv[1] + ".tmp", sys.argv[1])
threading.Event().wait()
"""


def measure_floor(log_dir: Path, sizes: Sequence[tuple[int, int]], seconds: float, rounds: int,
                  cpus: set[int] | None) -> dict[str, Any]:
    """The bare Python gRPC unary call on this machine (same sync server type, same pinning,
    no protobuf, no lookup): server CPU and latency per call for each (request bytes,
    answer bytes) pair."""
    port_file = log_dir / "floor.port"
    argv = [sys.executable, "-c", _FLOOR_SERVER, str(port_file)]
    if cpus is not None and shutil.which("taskset"):
        argv = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out: dict[str, Any] = {}
    try:
        t0 = time.monotonic()
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() - t0 > 60:
                return {"error": "floor server did not start"}
            time.sleep(0.02)
        driver = GrpcDriver(f"127.0.0.1:{port_file.read_text().strip()}", 2, "/floor.Floor/Echo")
        for req_bytes, size in sizes:
            head = f"{size};".encode()
            req = [head + bytes(max(req_bytes - len(head), 0))]
            driver.run(req, 0, 2, 0.1)
            runs: dict[int, list[Run]] = {1: [], 2: []}
            for _ in range(rounds):
                for k in (1, 2):
                    runs[k].append(driver.run(req, 0, k, seconds / rounds, proc.pid))
            key = f"request {len(req[0])} B, answer {size} B"
            out[key] = {}
            for k, rs in runs.items():
                sm = summarize(rs)
                out[key][f"callers_{k}"] = {
                    "calls_per_s": round(sum(r.calls for r in rs) / sum(r.wall_s for r in rs)),
                    "p50_us": round(sm["p50_us"], 1), "p99_us": round(sm["p99_us"], 1),
                    "server_cpu_us_per_call": sm.get("cpu_us_per_call")}
        driver.close()
    finally:
        proc.kill()
        proc.wait()
    return out


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


def anchor_call(cell: Cell, table: MappedTable) -> Callable[[npt.NDArray[np.int64]], Callable[[], Any]]:
    """Given rows, a zero-argument callable running the server's kernel on them in-process."""
    def make(rows: npt.NDArray[np.int64]) -> Callable[[], Any]:
        idx = torch.from_numpy(rows)
        if cell.mode == "packed":
            return lambda: torch.index_select(table.weights, 0, idx)
        off = torch.from_numpy(offsets_for(cell.batch))
        return lambda: table.kernel.lookup(idx, off, "sum", "fp16")

    return make


class _Context:
    """Just enough of grpc.ServicerContext for EmbeddingServicer.Lookup: no deadline."""

    def time_remaining(self) -> None:
        return None

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError(f"{code.name}: {details}")


def in_process_servicer(store: Path, version: str, model: str = MODEL
                        ) -> Callable[[bytes], Callable[[], bytes]]:
    """The server's whole per-request Python work without the gRPC transport: parse the
    request, EmbeddingServicer.Lookup (in-flight limit, version acquire, validation, kernel,
    metrics, response build), serialize. Returns raw request -> zero-argument callable."""
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
            out: bytes = servicer.Lookup(pb.LookupRequest.FromString(raw), ctx).SerializeToString()
            return out

        return call

    return make


def check_answer(cell: Cell, table: MappedTable, rows: npt.NDArray[np.int64], raw: bytes,
                 version: str) -> None:
    """The server's answer must equal the in-process kernel's, byte for byte."""
    resp = pb.LookupResponse.FromString(raw)
    if resp.version != version or len(resp.results) != 1:
        raise AssertionError(f"{cell.name}: unexpected answer {resp.version} {len(resp.results)}")
    want = anchor_call(cell, table)(rows)()
    if resp.results[0].data != want.numpy().tobytes():
        raise AssertionError(f"{cell.name}: gRPC answer differs from the in-process kernel")


# --------------------------------------------------------------------------- drivers


@dataclass
class Run:
    """One timed closed-loop run."""

    calls: int
    rows: int
    wall_s: float
    latencies_ns: list[int]
    cpu_s: float | None = None
    """CPU seconds spent serving: the anchor thread's own, or the server process's."""
    load: list[float] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else 0.0


def run_anchor(calls: Sequence[Callable[[], Any]], rows_per_call: int, seconds: float) -> Run:
    """Call `calls` round-robin on this thread for `seconds`."""
    lat: list[int] = []
    n = len(calls)
    t_end = time.perf_counter() + seconds
    cpu0 = time.thread_time_ns()
    t0 = time.perf_counter_ns()
    i = 0
    while True:
        a = time.perf_counter_ns()
        calls[i % n]()
        b = time.perf_counter_ns()
        lat.append(b - a)
        i += 1
        if b * 1e-9 >= t_end:  # perf_counter and perf_counter_ns share one clock
            break
    wall = (time.perf_counter_ns() - t0) * 1e-9
    return Run(i, i * rows_per_call, wall, lat, (time.thread_time_ns() - cpu0) * 1e-9, loadavg())


class GrpcDriver:
    """Closed-loop callers over their own channels (own TCP connections), raw bytes in/out."""

    def __init__(self, address: str, callers: int, method: str = METHOD) -> None:
        opts = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1),
                ("grpc.max_send_message_length", -1)]
        self.channels = [grpc.insecure_channel(address, options=opts) for _ in range(callers)]
        self.calls = [ch.unary_unary(method, request_serializer=None, response_deserializer=None)
                      for ch in self.channels]
        for ch in self.channels:  # connect now, not inside a timed run
            grpc.channel_ready_future(ch).result(timeout=30)

    def call(self, raw: bytes, caller: int = 0, timeout: float = 30.0) -> bytes:
        out: bytes = self.calls[caller](raw, timeout=timeout)
        return out

    def run(self, requests: Sequence[bytes], rows_per_call: int, callers: int, seconds: float,
            server_pid: int | None = None, until: threading.Event | None = None) -> Run:
        """`callers` threads call round-robin over `requests` for `seconds` (or until `until`)."""
        lats: list[list[int]] = [[] for _ in range(callers)]
        ends = [0.0] * callers
        errors: list[BaseException] = []
        start = threading.Barrier(callers + 1)
        n = len(requests)

        def caller(k: int) -> None:
            call, lat = self.calls[k], lats[k]
            start.wait()
            t_end = time.perf_counter() + seconds
            i = k * 7
            try:
                while True:
                    a = time.perf_counter_ns()
                    call(requests[i % n], timeout=30.0)
                    b = time.perf_counter_ns()
                    lat.append(b - a)
                    i += 1
                    if b * 1e-9 >= t_end or (until is not None and until.is_set()):
                        break
            except BaseException as e:  # reported by the main thread
                errors.append(e)
            ends[k] = time.perf_counter()

        threads = [threading.Thread(target=caller, args=(k,), daemon=True) for k in range(callers)]
        for t in threads:
            t.start()
        cpu0 = cpu_seconds(server_pid) if server_pid else None
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = max(ends) - t0
        cpu = cpu_seconds(server_pid) - cpu0 if server_pid and cpu0 is not None else None
        if errors:
            raise RuntimeError(f"gRPC caller failed: {errors[0]}") from errors[0]
        calls = sum(len(x) for x in lats)
        return Run(calls, calls * rows_per_call, wall, [v for x in lats for v in x], cpu, loadavg())

    def close(self) -> None:
        for ch in self.channels:
            ch.close()


def summarize(runs: Sequence[Run]) -> dict[str, Any]:
    """Median of the rounds' rates; latency percentiles over every call of every round.

    rows_per_s is wall-clock; rows_per_cpu_s divides by the CPU seconds the serving side
    (anchor thread or server process) actually got, which is what one dedicated core
    would do at saturation and is far less sensitive to other jobs on a shared machine.
    """
    lat = np.array([v for r in runs for v in r.latencies_ns], dtype=np.float64) / 1e3
    rates = [r.rows_per_s for r in runs]
    out: dict[str, Any] = {
        "rows_per_s": statistics.median(rates),
        "rows_per_s_rounds": [round(x) for x in rates],
        "calls": sum(r.calls for r in runs),
        "p50_us": float(np.percentile(lat, 50)) if lat.size else None,
        "p99_us": float(np.percentile(lat, 99)) if lat.size else None,
        "mean_us": float(lat.mean()) if lat.size else None,
        "loadavg_rounds": [r.load[0] for r in runs if r.load],
    }
    cpu = [r.cpu_s for r in runs if r.cpu_s is not None]
    if cpu and sum(cpu) > 0:
        out["rows_per_cpu_s_rounds"] = [round(r.rows / r.cpu_s) for r in runs if r.cpu_s]
        out["cpu_s"] = round(sum(cpu), 3)
        out["rows_per_cpu_s"] = sum(r.rows for r in runs) / sum(cpu)
        out["cpu_us_per_call"] = round(sum(cpu) / out["calls"] * 1e6, 1)
        out["cpu_util"] = round(sum(cpu) / sum(r.wall_s for r in runs), 3)
    return out


# --------------------------------------------------------------------------- profiling


def profile_server(pid: int, seconds: float, out: Path, load: Callable[[], None],
                   native: bool = True) -> dict[str, Any]:
    """py-spy record the server while `load()` runs; summarize the hottest frames.

    native: C frames too (grpc core, torch, FBGEMM, libc), which needs py-spy to pause
    the process for every sample, so the rate is low; otherwise `--gil --nonblocking`:
    only the thread holding the GIL, i.e. where the Python time goes."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {"error": "py-spy not found"}
    argv = [spy, "record", "--pid", str(pid), "--rate", "100" if native else "500",
            "--duration", str(int(seconds)), "--format", "raw", "--output", str(out)]
    argv += ["--native"] if native else ["--gil", "--nonblocking"]
    proc = subprocess.Popen([*argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    try:
        load()
    finally:
        try:
            _, err = proc.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    if proc.returncode != 0 or not out.exists():
        return {"error": f"py-spy exited {proc.returncode}: {err.decode(errors='replace')[-500:]}"}
    summary = summarize_collapsed(out.read_text())
    summary["mode"] = "native (all threads, idle dropped)" if native else "GIL holder only (--gil)"
    return summary


def _frame(f: str) -> str:
    f = re.sub(r":\d+\)$", ")", f.strip())
    return re.sub(r"\(.*/(site-packages|lib/python3\.\d+)/", "(", f)


_IDLE = ("PyThread_acquire_lock_timed", "_queue_SimpleQueue_get", "epoll_wait")
_GIL_WAIT = ("pthread_cond_timedwait", "pthread_cond_wait", "take_gil")
# Where an active sample's time goes: the innermost frame that matches a category wins.
_CATEGORIES = (
    ("kernel: torch index_select / FBGEMM", ("index_select", "fbgemm", "int_nbit_split", "torch/_ops")),
    ("socket syscalls (sendmsg/recvmsg/write/eventfd)",
     ("sendmsg", "recvmsg", "write (libc", "eventfd", "read (libc", "syscall (libc")),
    ("protobuf (upb) parse/build/serialize", ("PyUpb", "upb_", "_message.abi3")),
    ("numpy (tobytes, min/max/diff checks)", ("numpy/", "_multiarray_umath")),
    ("prometheus metrics", ("prometheus_client/",)),
    ("embedding_server Python (servicer, validation, version acquire)", ("embedding_server/",)),
    ("grpc Python/Cython server layer", ("grpc/",)),
)


def categorize(frames: Sequence[str]) -> str:
    """The category of one stack (innermost frame last)."""
    named = [f for f in frames if not re.match(r"0x[0-9a-f]+ ", f)]
    if named and any(m in named[-1] for m in _GIL_WAIT):
        return "GIL / lock wait (thread hand-offs on one core)"
    for f in reversed(frames):
        for name, marks in _CATEGORIES:
            if any(m in f for m in marks):
                return name
    return "other (Python interpreter, libc)"


def summarize_collapsed(text: str, top: int = 15) -> dict[str, Any]:
    """Active-sample shares from py-spy's collapsed ('raw') output: by category, by innermost
    named frame, and by Python function (inclusive), plus the most frequent stacks. Idle
    threads (blocked on a queue, a threading lock or epoll) are dropped; waiting for the
    GIL counts as active."""
    leaf: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    cats: Counter[str] = Counter()
    stacks: Counter[str] = Counter()
    total = idle = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";") if f.strip()]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        if any(m in frames[-1] for m in _IDLE) or any(
                m in f for f in frames[-4:] for m in _IDLE[:2]):
            idle += n
            continue
        total += n
        named = [f for f in frames if not re.match(r"0x[0-9a-f]+ ", f)]
        leaf[(named[-1] if named else frames[-1])[:140]] += n
        for f in {f for f in frames if ".py)" in f}:
            incl[f] += n
        cats[categorize(frames)] += n
        stacks[";".join(f if len(f) <= 90 else f[:87] + "..." for f in named[-8:])] += n

    def share(c: Counter[str], k: int = top) -> list[dict[str, Any]]:
        return [{"frame": f, "share": round(v / total, 4)} for f, v in c.most_common(k)] if total else []

    return {"active_samples": total, "idle_samples": idle,
            "categories": {k: round(v / total, 4) for k, v in cats.most_common()} if total else {},
            "top_innermost": share(leaf), "top_python_inclusive": share(incl),
            "top_stacks_innermost_8_frames": [{"stack": st, "samples": v}
                                              for st, v in stacks.most_common(25)]}


# --------------------------------------------------------------------------- P1


def target(name: str, value: float | None, goal: float, higher_is_better: bool) -> dict[str, Any]:
    if value is None:
        return {"name": name, "value": None, "target": goal, "met": False}
    met = value >= goal if higher_is_better else value <= goal
    # Relative distance from the target, positive when met: +0.15 = 15% to spare.
    margin = value / goal - 1 if higher_is_better else 1 - value / goal
    return {"name": name, "value": round(value, 4), "target": goal, "met": met,
            "kind": ">=" if higher_is_better else "<=", "margin": round(margin, 4),
            "text": f"{'met' if met else 'MISSED'} by {abs(margin) * 100:.0f}%"}


def judge_cell(c: Cell, s: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A cell's summary with its gRPC / in-process ratios, and the targets it is judged on."""
    a = s["in_process"]
    callers = [k.removeprefix("grpc_") for k in s if k.startswith("grpc_")]
    wall = {k: s[f"grpc_{k}"]["rows_per_s"] / a["rows_per_s"] for k in callers}
    cpu = {k: s[f"grpc_{k}"]["rows_per_cpu_s"] / a["rows_per_cpu_s"] for k in callers}
    last = s[f"grpc_{callers[-1]}"]
    cell = {"mode": c.mode, "batch": c.batch, "bags": c.bags, **s,
            "ratio_wall": {k: round(v, 4) for k, v in wall.items()},
            "ratio_cpu": {k: round(v, 4) for k, v in cpu.items()},
            "ratio_wall_best": round(max(wall.values()), 4),
            "ratio_cpu_best": round(max(cpu.values()), 4),
            # Server CPU per RPC beyond the kernel's own time for the same rows.
            "server_overhead_us_per_call": round(last["cpu_us_per_call"] - a["cpu_us_per_call"], 1)}
    if "handler" in s:
        h = s["handler"]
        cell["cpu_us_per_call_breakdown"] = {
            "kernel": a["cpu_us_per_call"],
            "servicer_python_beyond_kernel": round(h["cpu_us_per_call"] - a["cpu_us_per_call"], 1),
            "grpc_transport_beyond_servicer": round(last["cpu_us_per_call"] - h["cpu_us_per_call"], 1),
            "total_server": last["cpu_us_per_call"]}
    targets = []
    goal = {16384: 0.85, 4096: 0.7}.get(c.batch)
    if goal is not None:
        targets.append(target(f"{c.name}: rows per server core, gRPC / in-process "
                              "(CPU-normalized, best of callers)", max(cpu.values()), goal, True))
        targets.append(target(f"{c.name}: rows/s wall-clock, gRPC (1 server core) / in-process "
                              "(best of callers)", max(wall.values()), goal, True))
    if c.batch == 4096:
        for k in callers:
            p99 = s[f"grpc_{k}"]["p99_us"]
            targets.append(target(f"{c.name}: p99 ms per RPC, {k} caller(s)",
                                  None if p99 is None else p99 / 1e3, 2.0, False))
    return cell, targets


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_embedding", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20_000_000, help="table rows (default 20M)")
    p.add_argument("--dim", type=int, default=32, help="embedding dim (default 32)")
    p.add_argument("--seconds", type=float, default=2.0,
                   help="time per measurement (one cell, one variant), split over the rounds")
    p.add_argument("--rounds", type=int, default=5, help="rounds per measurement (median taken)")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    p.add_argument("--table-dir", type=Path, default=None,
                   help="model store to build the table in, or reuse it from (kept afterwards); "
                   "default: a temp dir, deleted at the end")
    p.add_argument("--out", type=Path, default=RESULTS / "embedding_p1.json",
                   help="result JSON; the PNG goes beside it")
    p.add_argument("--no-workers", action="store_true", help="skip the --workers 1 vs 2 comparison")
    p.add_argument("--no-profile", action="store_true", help="skip py-spy even if a target is missed")
    p.add_argument("--profile-seconds", type=float, default=4.0)
    return p.parse_args(argv)


def measure_cells(cells: Sequence[Cell], table: MappedTable, driver: GrpcDriver, server_pid: int,
                  version: str, fp: str, rounds: int, seconds: float, callers: Sequence[int],
                  rng: np.random.Generator, handler: Callable[[bytes], Callable[[], bytes]] | None = None
                  ) -> dict[str, dict[str, list[Run]]]:
    """Rounds x cells x (in-process kernel, in-process servicer if `handler`, gRPC with each
    caller count), interleaved so that a slow phase of the machine hits all alike."""
    variants = 16
    inputs = {c.name: [random_rows(rng, table.rows, c.batch) for _ in range(variants)] for c in cells}
    raw = {c.name: [lookup_request(c, r, version, fp).SerializeToString() for r in inputs[c.name]]
           for c in cells}
    local: dict[str, dict[str, list[Callable[[], Any]]]] = {c.name: {} for c in cells}
    for c in cells:
        local[c.name]["in_process"] = [anchor_call(c, table)(r) for r in inputs[c.name]]
        if handler is not None:
            local[c.name]["handler"] = [handler(q) for q in raw[c.name]]
    for c in cells:  # correctness, then warm-up (page cache, connections, allocators)
        answer = driver.call(raw[c.name][0])
        check_answer(c, table, inputs[c.name][0], answer, version)
        if handler is not None and local[c.name]["handler"][0]() != answer:
            raise AssertionError(f"{c.name}: in-process handler and server answers differ")
        pin({SERVER_CPU})
        for fns in local[c.name].values():
            run_anchor(fns, c.batch, 0.1)
        pin({CLIENT_CPU})
        driver.run(raw[c.name], c.batch, max(callers), 0.15)
    runs: dict[str, dict[str, list[Run]]] = {c.name: {} for c in cells}
    per = seconds / rounds
    for r in range(rounds):
        for c in cells:
            pin({SERVER_CPU})  # the server's core, idle meanwhile
            for name, fns in local[c.name].items():
                runs[c.name].setdefault(name, []).append(run_anchor(fns, c.batch, per))
            pin({CLIENT_CPU})
            for k in callers:
                runs[c.name].setdefault(f"grpc_{k}", []).append(
                    driver.run(raw[c.name], c.batch, k, per, server_pid))
        log.info("round %d/%d done (load %s)", r + 1, rounds, loadavg())
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    ncpu = len(os.sched_getaffinity(0))
    if ncpu < 2:
        log.warning("only %d CPU: server and client share it", ncpu)
    pinning = ncpu >= 2
    if pinning:
        pin({CLIENT_CPU})
    batches = [int(b) for b in args.batches.split(",")]
    cells = [Cell(m, b) for m in MODES for b in batches]
    load_start = loadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-embedding-"))
    store = args.table_dir or tmp / "store"
    version = f"r{args.rows}d{args.dim}"
    result: dict[str, Any] = {"benchmark": "P1 embedding lookups: gRPC vs in-process",
                              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:]}
    servers: list[EmbeddingServer] = []
    try:
        manifest, write_s = reuse_or_write(store, version, args.rows, args.dim, seed=7)
        table = map_table(store / MODEL / version, args.rows, args.dim)
        result["table"] = {"rows": args.rows, "dim": args.dim, "bytes": args.rows * (4 + args.dim // 2),
                           "write_seconds": None if write_s is None else round(write_s, 2),
                           "reused": write_s is None}
        srv = EmbeddingServer(store, [f"{MODEL}/{version}"], tmp, name="w1",
                              cpus={SERVER_CPU} if pinning else None)
        servers.append(srv.start())
        log.info("server pid %d on %s, ready in %.1fs", srv.pid, srv.address, srv.ready_s)
        driver = GrpcDriver(srv.address, 2)
        rng = np.random.default_rng(0)
        handler = in_process_servicer(store, version)
        runs = measure_cells(cells, table, driver, srv.pid, version, manifest.fingerprint,
                             args.rounds, args.seconds, (1, 2), rng, handler)
        out_cells, targets = [], []
        for c in cells:
            cell, cell_targets = judge_cell(c, {k: summarize(v) for k, v in runs[c.name].items()})
            out_cells.append(cell)
            targets += cell_targets
        result["cells"] = out_cells
        result["targets"] = targets
        result["server"] = {"pinned_cpus": [SERVER_CPU] if pinning else None,
                            "client_cpus": [CLIENT_CPU] if pinning else None,
                            "ready_s": round(srv.ready_s, 2), "memory": smaps_rollup(srv.pid)}
        missed = [t for t in targets if not t["met"]]
        if missed and not args.no_profile:
            result["profile"] = {}
            for c in [c for c in cells if c.batch == 4096]:
                reqs = [lookup_request(c, random_rows(rng, table.rows, c.batch), version,
                                       manifest.fingerprint).SerializeToString() for _ in range(8)]
                path = tmp / f"profile-{c.name}.txt"

                def load(reqs: list[bytes] = reqs, c: Cell = c) -> None:
                    driver.run(reqs, c.batch, 2, args.profile_seconds)

                log.info("profiling the server under %s, 2 callers", c.name)
                result["profile"][c.name] = {
                    "native": profile_server(srv.pid, args.profile_seconds, path, load, True),
                    "python_gil": profile_server(srv.pid, args.profile_seconds, path, load, False)}
        driver.close()
        sizes = [(0, 0), *((c.batch * 8, c.batch * (4 + args.dim // 2)) for c in cells
                           if c.mode == "packed")]
        log.info("floor: bare Python gRPC unary calls, response sizes %s", sizes)
        result["grpc_floor"] = measure_floor(tmp, sizes, args.seconds / 2, args.rounds,
                                             {SERVER_CPU} if pinning else None)
        if not args.no_workers and pinning:
            result["workers"] = compare_workers(args, store, version, manifest.fingerprint, table, srv,
                                                tmp, servers, rng)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # logs, profiles, and the table unless --table-dir
    result["host"] = {"cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": loadavg(),
                      "python": sys.version.split()[0], "torch": torch.__version__,
                      "grpc": grpc.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot_p1(result, args.out.with_suffix(".png"))
    print_summary(result)
    return 0


def compare_workers(args: argparse.Namespace, store: Path, version: str, fp: str, table: MappedTable,
                    w1: EmbeddingServer, tmp: Path, servers: list[EmbeddingServer],
                    rng: np.random.Generator) -> dict[str, Any]:
    """--workers 1 vs --workers 2, both unpinned (client too), interleaved, 2 and 4 callers."""
    pin(None)
    pin_process(w1.pid, None)
    w2 = EmbeddingServer(store, [f"{MODEL}/{version}"], tmp, name="w2", extra=["--workers", "2"])
    servers.append(w2.start())
    cells = [Cell(m, b) for m in MODES for b in (4096, 16384)]
    d1, d2 = GrpcDriver(w1.address, 4), GrpcDriver(w2.address, 4)
    # SO_REUSEPORT spreads connections by hash: count how many reached each worker process.
    per_worker = {str(pid): 0 for pid in child_pids(w2.pid)}
    out: dict[str, Any] = {"note": "server and client unpinned on the same 2 cores; rows/s is the "
                           "machine's total; rows_per_cpu_s divides by all server processes' CPU",
                           "cells": []}
    rounds = max(3, args.rounds - 2)
    runs: dict[str, dict[str, list[Run]]] = {c.name: {} for c in cells}
    reqs = {c.name: [lookup_request(c, random_rows(rng, table.rows, c.batch), version, fp)
                     .SerializeToString() for _ in range(8)] for c in cells}
    for c in cells:
        for d in (d1, d2):
            d.run(reqs[c.name], c.batch, 4, 0.15)
    cpu_before = {pid: cpu_seconds(int(pid)) for pid in per_worker}
    for _ in range(rounds):
        for c in cells:
            for label, d, srv in (("workers_1", d1, w1), ("workers_2", d2, w2)):
                for k in (2, 4):
                    runs[c.name].setdefault(f"{label}_callers_{k}", []).append(
                        d.run(reqs[c.name], c.batch, k, args.seconds / rounds, srv.pid))
    out["worker_cpu_s"] = {pid: round(cpu_seconds(int(pid)) - t, 2) for pid, t in cpu_before.items()}
    for c in cells:
        s = {k: summarize(v) for k, v in runs[c.name].items()}
        out["cells"].append({"mode": c.mode, "batch": c.batch, **s})
    d1.close()
    d2.close()
    return out


def plot_p1(result: dict[str, Any], path: Path) -> None:
    from loadtest.plotting import Panel, save_panels

    panels = []
    for mode in MODES:
        cells = [c for c in result["cells"] if c["mode"] == mode]
        labels = [str(c["batch"]) for c in cells]
        panels.append(Panel(
            f"{mode}: rows per CPU-second of the serving core", labels,
            {"in-process kernel": [c["in_process"]["rows_per_cpu_s"] for c in cells],
             "in-process servicer (no gRPC)": [c.get("handler", {}).get("rows_per_cpu_s") for c in cells],
             "gRPC server, 1 caller": [c["grpc_1"]["rows_per_cpu_s"] for c in cells],
             "gRPC server, 2 callers": [c["grpc_2"]["rows_per_cpu_s"] for c in cells]},
            ylabel="rows / CPU-s", log=True))
        panels.append(Panel(
            f"{mode}: gRPC / in-process", labels,
            {"per server core (CPU-normalized)": [c["ratio_cpu_best"] for c in cells],
             "wall-clock rows/s, 1 caller": [c["ratio_wall"]["1"] for c in cells],
             "wall-clock rows/s, 2 callers": [c["ratio_wall"]["2"] for c in cells]},
            ylabel="ratio", targets={"target 4096: 0.7x": 0.7, "target 16384: 0.85x": 0.85}))
    h = result["host"]
    save_panels(path, f"P1: {result['table']['rows'] / 1e6:g}M x {result['table']['dim']} INT4 table, "
                "loopback gRPC (server pinned to 1 core) vs in-process kernel", panels,
                note=f"loadavg start {h['loadavg_start']} end {h['loadavg_end']} (2-core machine "
                "shared with other jobs; compare ratios within this run only)")


def print_summary(result: dict[str, Any]) -> None:
    print(f"{'cell':>13} {'kernel r/cpu-s':>14} {'server r/cpu-s':>14} {'cpu ratio':>9} "
          f"{'gRPC2 r/s':>10} {'wall ratio':>10} {'p50 ms':>7} {'p99 ms':>7} {'ovh us':>7}")
    for c in result["cells"]:
        g = c["grpc_1"]
        print(f"{c['mode'] + '-' + str(c['batch']):>13} {c['in_process']['rows_per_cpu_s']:>14.3g} "
              f"{c['grpc_2']['rows_per_cpu_s']:>14.3g} {c['ratio_cpu_best']:>9.2f} "
              f"{c['grpc_2']['rows_per_s']:>10.3g} {c['ratio_wall_best']:>10.2f} "
              f"{g['p50_us'] / 1e3:>7.2f} {g['p99_us'] / 1e3:>7.2f} {c['server_overhead_us_per_call']:>7.0f}")
    for t in result["targets"]:
        print(f"  {t['name']}: {t['value']} vs {t['target']} -> {t.get('text')}")
    for size, v in result.get("grpc_floor", {}).items():
        if isinstance(v, dict):
            print(f"  bare gRPC call, {size}: " + ", ".join(
                f"{k}: p50 {x['p50_us']:.0f} us, server {x['server_cpu_us_per_call']} us CPU/call"
                for k, x in v.items()))
    for c in result.get("workers", {}).get("cells", []):
        print(f"  {c['mode']}-{c['batch']}: " + ", ".join(
            f"{k} {v['rows_per_s']:.3g} rows/s ({v.get('rows_per_cpu_s', 0):.3g}/server CPU-s)"
            for k, v in c.items() if k.startswith("workers_")))
    print(f"loadavg start {result['host']['loadavg_start']} end {result['host']['loadavg_end']}")


if __name__ == "__main__":
    sys.exit(main())
