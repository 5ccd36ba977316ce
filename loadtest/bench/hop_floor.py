"""The lookup hop against the transport floor, from the ranker's side, in one process.

The hop: RemoteTables.lookup, exactly as the ranker calls it (the batch's queries from
plan_lookups, de-duplicated, one lookup per shard, answers checked and expanded), over
each transport. The floor: a bare grpcio server per shard (the P1 floor server from
grpc_driver: no protobuf, no lookup, prebuilt answers) and a bare grpc.aio client
writing one message and reading one answer on a long-lived stream per shard, both
shards at once: the same request and answer bytes per shard as the hop's, nothing else.

Kinds take turns in blocks (rotating order), each block timing every call and reading
the CPU of this process (the client) and of the servers it talks to from /proc.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np

from embedding_server.client import split_query
from loadtest.bench.grpc_driver import FLOOR_SERVER
from loadtest.harness.load import percentiles
from loadtest.harness.procfs import cpu_seconds, self_cpu_seconds
from modelpack.lookup import TableQuery, unique_rows
from protos import embedding_pb2 as pb
from ranker_server.remote_tables import RemoteTables
from ranker_server.versions import LoadedVersion

_FLOOR_METHOD = "/floor.Floor/EchoStream"


@dataclass
class Floor:
    """The bare grpcio servers, one per shard."""

    procs: list[subprocess.Popen[bytes]]
    addresses: list[str]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def start_floor(n: int, log_dir: Path) -> Floor:
    """`n` floor servers on free loopback ports (sync grpc.server, like the shards)."""
    files = [log_dir / f"floor{k}.port" for k in range(n)]
    procs = [subprocess.Popen([sys.executable, "-c", FLOOR_SERVER, str(f)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for f in files]
    floor = Floor(procs, [])
    deadline = time.monotonic() + 60
    while not all(f.exists() for f in files):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            floor.stop()
            raise RuntimeError("floor servers did not start")
        time.sleep(0.02)
    floor.addresses = [f"127.0.0.1:{f.read_text().strip()}" for f in files]
    return floor


def wire_sizes(lv: LoadedVersion, queries: Sequence[TableQuery], shards: int
               ) -> list[tuple[int, int]]:
    """(request bytes, answer bytes) per shard of the hop's lookup of `queries`."""
    m = lv.manifest
    split = [split_query(TableQuery(q.table, q.num_rows, q.dim, unique_rows(q.rows)[0]), shards)
             for q in queries]  # the client's own split of the de-duplicated rows
    out = []
    for k in range(shards):
        tables = [parts[k].request for parts in split]
        req = pb.LookupRequest(model=m.model, version=m.version, fingerprint=m.fingerprint,
                               tables=tables, id=1 << 40, timeout_s=1.0)
        results = [pb.TableResult(table=t.table, dim=q.dim, count=len(t.rows) // 8,
                                  data=bytes(len(t.rows) // 8 * (4 + q.dim // 2)))
                   for t, q in zip(tables, queries, strict=True)]
        ans = pb.LookupResponse(model=m.model, version=m.version, fingerprint=m.fingerprint,
                                shard=k, num_shards=shards, results=results, id=1 << 40)
        out.append((req.ByteSize(), ans.ByteSize()))
    return out


class FloorClient:
    """One long-lived raw-bytes stream per floor server; `call` = one message each way on each."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self.channels = [grpc.aio.insecure_channel(a) for a in addresses]
        self.calls = [c.stream_stream(_FLOOR_METHOD)() for c in self.channels]

    async def call(self, requests: Sequence[bytes]) -> None:
        async def one(call: Any, req: bytes) -> None:
            await call.write(req)
            await call.read()

        await asyncio.gather(*(one(c, r) for c, r in zip(self.calls, requests, strict=True)))

    async def close(self) -> None:
        for c in self.calls:
            c.cancel()
        await asyncio.gather(*(c.close() for c in self.channels))


def floor_request(sizes: tuple[int, int]) -> bytes:
    """The floor server's request: b'<answer bytes>;' padded to the hop's request size."""
    head = f"{sizes[1]};".encode()
    return head + bytes(max(sizes[0] - len(head), 0))


async def measure(lv: LoadedVersion, batches: Sequence[Sequence[TableQuery]],
                  shard_addresses: Sequence[str], shard_pids: Sequence[int], floor: Floor,
                  *, rounds: int, calls_per_block: int) -> dict[str, Any]:
    """Per kind (hop over stream, hop over unary, floor): p50/p99 per call and CPU per call
    of the client (this process) and the servers, over `rounds` blocks each."""
    sources = {t: RemoteTables([[a] for a in shard_addresses], 5.0, transport=t)
               for t in ("stream", "unary")}
    floor_client = FloorClient(floor.addresses)
    floor_reqs = [[floor_request(s) for s in wire_sizes(lv, b, len(shard_addresses))]
                  for b in batches]
    kinds: dict[str, tuple[Callable[[int], Awaitable[Any]], Sequence[int]]] = {
        f"hop_{t}": ((lambda i, s=s: s.lookup(lv, batches[i % len(batches)], 5.0)),  # type: ignore[misc]
                     shard_pids) for t, s in sources.items()}
    kinds["floor_stream"] = (lambda i: floor_client.call(floor_reqs[i % len(batches)]), floor.pids)
    lat: dict[str, list[float]] = {k: [] for k in kinds}
    cpu = {k: {"client_s": 0.0, "servers_s": 0.0, "calls": 0} for k in kinds}
    try:
        for fn, _ in kinds.values():  # open streams and channels, warm every path
            for i in range(50):
                await fn(i)
        names = list(kinds)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                fn, pids = kinds[name]
                c0, s0 = self_cpu_seconds(), sum(cpu_seconds(p) for p in pids)
                for i in range(calls_per_block):
                    t0 = time.perf_counter()
                    await fn(i)
                    lat[name].append(time.perf_counter() - t0)
                cpu[name]["client_s"] += self_cpu_seconds() - c0
                cpu[name]["servers_s"] += sum(cpu_seconds(p) for p in pids) - s0
                cpu[name]["calls"] += calls_per_block
    finally:
        await floor_client.close()
        for s in sources.values():
            await s.close()
    out: dict[str, Any] = {}
    for name in kinds:
        n = max(int(cpu[name]["calls"]), 1)
        out[name] = {**percentiles(lat[name]), "p50_us": float(np.median(lat[name]) * 1e6),
                     "client_cpu_us_per_call": cpu[name]["client_s"] / n * 1e6,
                     "servers_cpu_us_per_call": cpu[name]["servers_s"] / n * 1e6, "calls": n}
    sizes = [wire_sizes(lv, b, len(shard_addresses)) for b in batches]
    out["wire_bytes_per_shard_mean"] = {
        "request": float(np.mean([s[0] for per in sizes for s in per])),
        "answer": float(np.mean([s[1] for per in sizes for s in per]))}
    return out
