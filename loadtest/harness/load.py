"""The HTTP/1.1 load generator of benchmarks and tests: open loop (fixed schedule) and closed loop.

Open loop: send times are computed before the run (Poisson or fixed inter-arrival) and
every request is sent at its scheduled time whether or not earlier ones have answered.

Latency, one definition everywhere (RunResult.latency_s): from the *scheduled* send time
to the last byte of the answer. A server (or a generator) that falls behind is charged
for it instead of silently slowing the offered load down (coordinated omission). In a
closed loop the schedule is "when the previous answer came", so the scheduled and the
actual send coincide. Beside it: `service_s`, from the actual send (what the server took,
without the generator's own lag), and `send_lag_s`, actual minus scheduled send.

The client is a bare asyncio keep-alive connection pool (no httpx): on a 2-core machine
the generator shares the CPU with the servers, so its own cost per request must be small
and, above all, the same for every configuration compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


class HttpError(Exception):
    """The connection failed or the server answered something this client cannot parse."""


class _Stale(Exception):
    """A reused keep-alive connection was closed by the server before it answered a byte."""


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    reused: bool = False
    idle_since: float = 0.0


_TRANSPORT = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)


class HttpPool:
    """Keep-alive HTTP/1.1 connections to one host:port; one request per connection at a time.

    uvicorn closes keep-alive connections idle for 5 s, and one it closes just as a
    request goes out fails with nothing answered. So connections idle for `max_idle_s`
    are dropped rather than reused, and a request on a reused connection that the server
    closed before answering a single byte is sent once more, on a fresh connection (it
    never reached the application). Any other fault is an HttpError.
    """

    def __init__(self, host: str, port: int, *, max_conns: int = 512,
                 max_idle_s: float = 3.0) -> None:
        self.host, self.port = host, port
        self.max_idle_s = max_idle_s
        self._idle: list[_Conn] = []
        self._open = 0
        self._slots = asyncio.Semaphore(max_conns)

    async def _connect(self) -> _Conn:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self._open += 1
        return _Conn(reader, writer)

    async def _take(self) -> _Conn:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < self.max_idle_s:
                return conn
            self._close(conn)
        return await self._connect()

    async def request(self, method: str, path: str, body: bytes = b"",
                      content_type: str = "application/octet-stream") -> tuple[int, bytes]:
        """(status, body) of one request; HttpError on transport or framing faults."""
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n")
        data = head.encode("ascii") + body
        async with self._slots:
            try:
                return await self._exchange(await self._take(), data)
            except _Stale:
                pass
            except OSError as e:  # connect() refused or unreachable
                raise HttpError(f"{type(e).__name__}: {e}") from None
            try:
                return await self._exchange(await self._connect(), data)
            except OSError as e:
                raise HttpError(f"{type(e).__name__}: {e}") from None

    async def _exchange(self, conn: _Conn, data: bytes) -> tuple[int, bytes]:
        try:
            conn.writer.write(data)
            raw = await conn.reader.readuntil(b"\r\n\r\n")
        except _TRANSPORT as e:
            self._close(conn)
            partial = e.partial if isinstance(e, asyncio.IncompleteReadError) else b""
            if conn.reused and not partial and not isinstance(e, asyncio.LimitOverrunError):
                raise _Stale from None
            raise HttpError(f"{type(e).__name__}: {e}") from None
        try:
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            if "content-length" not in headers:
                raise ValueError(f"response without Content-Length: {headers}")
            payload = await conn.reader.readexactly(int(headers["content-length"]))
        except (*_TRANSPORT, ValueError, IndexError) as e:
            self._close(conn)
            raise HttpError(f"{type(e).__name__}: {e}") from None
        if headers.get("connection", "").lower() == "close":
            self._close(conn)
        else:
            conn.reused, conn.idle_since = True, time.monotonic()
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


Label = Callable[[int, bytes], str]
"""(status, response body) -> a short label kept per request, e.g. the version that served it."""


@dataclass
class RunResult:
    """Per-request outcomes of one run: open loop in schedule order, closed loop in completion order.

    Times are seconds. `latency_s` is THE latency: from the scheduled send (open loop) or
    the send (closed loop, where the send is the schedule) to the end of the answer.
    """

    latency_s: list[float] = field(default_factory=list)  # from scheduled send (open) / send (closed)
    service_s: list[float] = field(default_factory=list)  # from the actual send
    send_lag_s: list[float] = field(default_factory=list)  # actual send - scheduled send
    status: list[int] = field(default_factory=list)  # -1: no HTTP answer (see `errors`)
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)  # one line per request with status -1
    due_s: list[float] = field(default_factory=list)  # scheduled (open) / actual (closed) send offset
    labels: list[str] = field(default_factory=list)  # label(status, body), or the error; only with `label`
    started_at: float = 0.0  # time.time() of offset 0, to line requests up with other clocks

    @property
    def ok(self) -> int:
        return sum(1 for s in self.status if s == 200)

    def ok_latencies(self) -> npt.NDArray[np.float64]:
        return np.array([lat for lat, s in zip(self.latency_s, self.status, strict=True)
                         if s == 200], dtype=np.float64)


async def _send(pool: HttpPool, path: str, body: bytes, content_type: str, timeout_s: float,
                res: RunResult, label: Label | None) -> tuple[int, str]:
    """(status, label) of one POST; a failure is status -1, recorded in res.errors."""
    try:
        status, payload = await asyncio.wait_for(
            pool.request("POST", path, body, content_type), timeout_s)
    except (HttpError, TimeoutError) as e:
        error = f"{type(e).__name__}: {e}"
        res.errors.append(error)
        return -1, error
    return status, label(status, payload) if label is not None else ""


async def open_loop(pool: HttpPool, path: str, bodies: Sequence[bytes], offsets: Sequence[float],
                    *, content_type: str, timeout_s: float = 10.0,
                    label: Label | None = None) -> RunResult:
    """POST bodies[i % len(bodies)] at offsets[i] whether or not earlier ones answered.

    latency_s[i] runs from the *scheduled* time start + offsets[i]: a server or generator
    that falls behind is charged for it (no coordinated omission); service_s[i] runs from
    the actual send, send_lag_s[i] is the difference.
    """
    loop = asyncio.get_running_loop()
    n = len(offsets)
    res = RunResult(latency_s=[math.nan] * n, service_s=[math.nan] * n, send_lag_s=[math.nan] * n,
                    status=[0] * n, due_s=[float(o) for o in offsets],
                    labels=[""] * n if label is not None else [])
    start = loop.time() + 0.02
    res.started_at = time.time() + 0.02

    async def one(i: int, due: float) -> None:
        sent = loop.time()
        res.send_lag_s[i] = sent - due
        status, tag = await _send(pool, path, bodies[i % len(bodies)], content_type, timeout_s,
                                  res, label)
        done = loop.time()
        res.latency_s[i], res.service_s[i], res.status[i] = done - due, done - sent, status
        if label is not None:
            res.labels[i] = tag

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
                      duration_s: float, content_type: str, timeout_s: float = 10.0,
                      max_requests: int | None = None, stop: Callable[[], bool] | None = None,
                      label: Label | None = None) -> RunResult:
    """`concurrency` workers, each sending its next request as soon as the last one answered.

    Ends after `duration_s`, `max_requests` sent, or once `stop()` is true (checked
    before each request), whichever comes first.
    """
    loop = asyncio.get_running_loop()
    res = RunResult(started_at=time.time())
    start = loop.time()
    stop_at = start + duration_s
    counter = iter(range(max_requests if max_requests is not None else 1 << 62))

    async def worker() -> None:
        while loop.time() < stop_at and not (stop is not None and stop()):
            i = next(counter, None)
            if i is None:
                return
            sent = loop.time()
            status, tag = await _send(pool, path, bodies[i % len(bodies)], content_type,
                                      timeout_s, res, label)
            lat = loop.time() - sent
            res.latency_s.append(lat)
            res.service_s.append(lat)
            res.send_lag_s.append(0.0)
            res.status.append(status)
            res.due_s.append(sent - start)
            if label is not None:
                res.labels.append(tag)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.wall_s = loop.time() - start
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
