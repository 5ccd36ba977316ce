"""Closed-loop lookup drivers of the embedding benchmarks: the in-process anchor, raw-bytes
gRPC callers, the bare-gRPC floor, and the statistics and target judgements of their runs.
"""

from __future__ import annotations

import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from loadtest.bench.lookup_harness import taskset
from loadtest.harness.procfs import cpu_seconds, loadavg

METHOD = "/hybrid.embedding.v1.EmbeddingService/Lookup"
STREAM_METHOD = "/hybrid.embedding.v1.EmbeddingService/LookupStream"


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


class StreamCall:
    """One long-lived bidi stream used closed-loop: send one request, wait for its answer."""

    def __init__(self, channel: grpc.Channel, method: str) -> None:
        self._q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        call = channel.stream_stream(method, request_serializer=None, response_deserializer=None)
        self._responses = call(iter(self._q.get, None))

    def __call__(self, raw: bytes, timeout: float = 30.0) -> bytes:
        self._q.put(raw)
        out: bytes = next(self._responses)
        return out

    def close(self) -> None:
        self._q.put(None)  # half-close: the server ends the stream with OK


class GrpcDriver:
    """Closed-loop callers over their own channels (own TCP connections), raw bytes in/out;
    with `stream` each caller sends its requests on one long-lived bidi stream."""

    def __init__(self, address: str, callers: int, method: str = METHOD, stream: bool = False) -> None:
        opts = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1),
                ("grpc.max_send_message_length", -1)]
        self.channels = [grpc.insecure_channel(address, options=opts) for _ in range(callers)]
        for ch in self.channels:  # connect now, not inside a timed run
            grpc.channel_ready_future(ch).result(timeout=30)
        self.streams = [StreamCall(ch, method) for ch in self.channels] if stream else []
        self.calls: list[Callable[..., bytes]] = (
            list(self.streams) if stream else
            [ch.unary_unary(method, request_serializer=None, response_deserializer=None)
             for ch in self.channels])

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
        for st in self.streams:
            st.close()
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


FLOOR_SERVER = """
import sys, threading, grpc
from concurrent.futures import ThreadPoolExecutor
sizes = {}
def handle(req, ctx):  # request = b"<answer size>;" + padding; answer that many bytes, prebuilt
    n = int(req.split(b";", 1)[0] or b"0")
    if n not in sizes:
        sizes[n] = bytes(n)
    return sizes[n]
def stream(it, ctx):
    for req in it:
        yield handle(req, ctx)
h = grpc.method_handlers_generic_handler("floor.Floor", {
    "Echo": grpc.unary_unary_rpc_method_handler(handle),
    "EchoStream": grpc.stream_stream_rpc_method_handler(stream)})
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
    """The bare Python gRPC call on this machine (same sync server type, same pinning, no
    protobuf, no lookup), unary and as one message each way on a long-lived bidi stream:
    server CPU and latency per call for each (request bytes, answer bytes) pair."""
    port_file = log_dir / "floor.port"
    argv = taskset(cpus, [sys.executable, "-c", FLOOR_SERVER, str(port_file)])
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out: dict[str, Any] = {}
    try:
        t0 = time.monotonic()
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() - t0 > 60:
                return {"error": "floor server did not start"}
            time.sleep(0.02)
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        drivers = {"unary": GrpcDriver(address, 2, "/floor.Floor/Echo"),
                   "stream": GrpcDriver(address, 2, "/floor.Floor/EchoStream", stream=True)}
        for req_bytes, size in sizes:
            head = f"{size};".encode()
            req = [head + bytes(max(req_bytes - len(head), 0))]
            runs: dict[str, list[Run]] = {}
            for d in drivers.values():
                d.run(req, 0, 2, 0.1)
            for _ in range(rounds):
                for kind, d in drivers.items():
                    for k in (1, 2):
                        runs.setdefault(f"{kind}_callers_{k}", []).append(
                            d.run(req, 0, k, seconds / rounds, proc.pid))
            key = f"request {len(req[0])} B, answer {size} B"
            out[key] = {}
            for name, rs in runs.items():
                sm = summarize(rs)
                out[key][name] = {
                    "calls_per_s": round(sum(r.calls for r in rs) / sum(r.wall_s for r in rs)),
                    "p50_us": round(sm["p50_us"], 1), "p99_us": round(sm["p99_us"], 1),
                    "server_cpu_us_per_call": sm.get("cpu_us_per_call")}
        for d in drivers.values():
            d.close()
    finally:
        proc.kill()
        proc.wait()
    return out
