"""Shared harness of the embedding benchmarks (P1, P3): machine probes, random INT4
tables, a real server process, request builders, anchor and gRPC drivers, stats.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
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
RESULTS = Path(__file__).resolve().parents[1] / "results"
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



def target(name: str, value: float | None, goal: float, higher_is_better: bool) -> dict[str, Any]:
    if value is None:
        return {"name": name, "value": None, "target": goal, "met": False}
    met = value >= goal if higher_is_better else value <= goal
    # Relative distance from the target, positive when met: +0.15 = 15% to spare.
    margin = value / goal - 1 if higher_is_better else 1 - value / goal
    return {"name": name, "value": round(value, 4), "target": goal, "met": met,
            "kind": ">=" if higher_is_better else "<=", "margin": round(margin, 4),
            "text": f"{'met' if met else 'MISSED'} by {abs(margin) * 100:.0f}%"}
