"""A small HTTP/1.1 load generator: open loop (fixed schedule) and closed loop (fixed concurrency).

Open loop: send times are computed before the run (Poisson or fixed inter-arrival) and
every request is sent at its scheduled time whether or not earlier ones have answered;
latency is measured from the *scheduled* send time, so a server (or a generator) that
falls behind is charged for it instead of silently slowing the offered load down
(coordinated omission). The actual send lag is recorded beside it.

The client is a bare asyncio keep-alive connection pool (no httpx): on a 2-core machine
the generator shares the CPU with the servers, so its own cost per request must be small
and, above all, the same for every configuration compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


class HttpError(Exception):
    """The connection failed or the server answered something this client cannot parse."""


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


class HttpPool:
    """Keep-alive HTTP/1.1 connections to one host:port; one request per connection at a time."""

    def __init__(self, host: str, port: int, *, max_conns: int = 512) -> None:
        self.host, self.port = host, port
        self._idle: list[_Conn] = []
        self._open = 0
        self._slots = asyncio.Semaphore(max_conns)

    async def _connect(self) -> _Conn:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self._open += 1
        return _Conn(reader, writer)

    async def request(self, method: str, path: str, body: bytes = b"",
                      content_type: str = "application/octet-stream") -> tuple[int, bytes]:
        """(status, body) of one request; HttpError on transport or framing faults."""
        async with self._slots:
            conn = self._idle.pop() if self._idle else await self._connect()
            head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                    f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n")
            try:
                conn.writer.write(head.encode("ascii") + body)
                raw = await conn.reader.readuntil(b"\r\n\r\n")
                lines = raw.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ", 2)[1])
                headers = {k.strip().lower(): v.strip()
                           for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                if "content-length" not in headers:
                    raise HttpError(f"response without Content-Length: {headers}")
                payload = await conn.reader.readexactly(int(headers["content-length"]))
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError, IndexError) as e:
                self._close(conn)
                raise HttpError(f"{type(e).__name__}: {e}") from None
            if headers.get("connection", "").lower() == "close":
                self._close(conn)
            else:
                self._idle.append(conn)
            return status, payload

    def _close(self, conn: _Conn) -> None:
        conn.writer.close()
        self._open -= 1

    async def close(self) -> None:
        for c in self._idle:
            c.writer.close()
        for c in self._idle:
            with contextlib.suppress(OSError):
                await c.writer.wait_closed()
        self._idle.clear()


def schedule(rate: float, duration_s: float, *, poisson: bool = True, seed: int = 0
             ) -> npt.NDArray[np.float64]:
    """Send offsets (seconds from the start) of an open-loop run at `rate` requests/s."""
    n = max(1, math.floor(rate * duration_s))
    if not poisson:
        return np.arange(n, dtype=np.float64) / rate
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    offsets: npt.NDArray[np.float64] = np.cumsum(gaps) - gaps[0]
    return offsets


@dataclass
class RunResult:
    """Per-request outcomes of one run, in send order."""

    latency_s: list[float] = field(default_factory=list)  # from scheduled send (open) / send (closed)
    service_s: list[float] = field(default_factory=list)  # from the actual send
    send_lag_s: list[float] = field(default_factory=list)  # actual send - scheduled send
    status: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return sum(1 for s in self.status if s == 200)

    def ok_latencies(self) -> npt.NDArray[np.float64]:
        return np.array([lat for lat, s in zip(self.latency_s, self.status, strict=True)
                         if s == 200], dtype=np.float64)


async def open_loop(pool: HttpPool, path: str, bodies: Sequence[bytes], offsets: Sequence[float],
                    *, content_type: str, timeout_s: float = 10.0) -> RunResult:
    """Send bodies[i % len(bodies)] at offsets[i]; latency from the scheduled time."""
    loop = asyncio.get_running_loop()
    n = len(offsets)
    res = RunResult(latency_s=[math.nan] * n, service_s=[math.nan] * n, send_lag_s=[math.nan] * n,
                    status=[0] * n)
    start = loop.time() + 0.02

    async def one(i: int, due: float) -> None:
        sent = loop.time()
        res.send_lag_s[i] = sent - due
        try:
            status, _ = await asyncio.wait_for(
                pool.request("POST", path, bodies[i % len(bodies)], content_type), timeout_s)
        except (HttpError, TimeoutError) as e:
            status = -1
            res.errors.append(f"{type(e).__name__}: {e}")
        done = loop.time()
        res.latency_s[i], res.service_s[i], res.status[i] = done - due, done - sent, status

    tasks: list[asyncio.Task[None]] = []
    for i, off in enumerate(offsets):
        due = start + float(off)
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    res.wall_s = loop.time() - start
    return res


async def closed_loop(pool: HttpPool, path: str, bodies: Sequence[bytes], *, concurrency: int,
                      duration_s: float, content_type: str, timeout_s: float = 10.0) -> RunResult:
    """`concurrency` workers, each sending its next request as soon as the last one answered."""
    loop = asyncio.get_running_loop()
    res = RunResult()
    stop_at = loop.time() + duration_s
    counter = iter(range(1 << 62))

    async def worker() -> None:
        while loop.time() < stop_at:
            i = next(counter)
            sent = loop.time()
            try:
                status, _ = await asyncio.wait_for(
                    pool.request("POST", path, bodies[i % len(bodies)], content_type), timeout_s)
            except (HttpError, TimeoutError) as e:
                status = -1
                res.errors.append(f"{type(e).__name__}: {e}")
            lat = loop.time() - sent
            res.latency_s.append(lat)
            res.service_s.append(lat)
            res.send_lag_s.append(0.0)
            res.status.append(status)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.wall_s = time.perf_counter() - t0
    return res


def percentiles(values: npt.NDArray[np.float64] | Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9/mean/max in milliseconds (NaN-free input; empty -> NaNs)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {k: math.nan for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "mean_ms", "max_ms")}
    p50, p90, p99, p999 = np.percentile(a, [50, 90, 99, 99.9]) * 1000
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "p999_ms": float(p999), "mean_ms": float(a.mean() * 1000),
            "max_ms": float(a.max() * 1000)}
