"""Open-loop load from several generator processes: rates one Python process cannot send.

One asyncio process sends a few thousand requests/s at most; a GPU ranker takes more.
The schedule (loadtest.harness.load.schedule) is dealt round-robin to `procs` worker
processes, which all start it at the same wall-clock instant and run the ordinary
`open_loop` on their own keep-alive pools; their per-request results are put back in
schedule order. Latency keeps load.py's one definition (from the scheduled send), so a
generator process that falls behind is charged for it, never hidden.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from loadtest.harness.load import HttpPool, RunResult, open_loop

_LEAD_S = 0.3  # every worker is told the start this far ahead, so all begin together


@dataclass(frozen=True)
class _Part:
    host: str
    port: int
    path: str
    bodies: Sequence[bytes]
    offsets: list[float]
    content_type: str
    timeout_s: float
    start_at: float  # time.time() at which offset 0 falls


def _run_part(part: _Part) -> RunResult:
    async def run() -> RunResult:
        pool = HttpPool(part.host, part.port)
        try:
            await asyncio.sleep(max(0.0, part.start_at - time.time()))
            return await open_loop(pool, part.path, part.bodies, part.offsets,
                                   content_type=part.content_type, timeout_s=part.timeout_s)
        finally:
            await pool.close()

    return asyncio.run(run())


class LoadProcs:
    """A pool of `procs` generator processes (spawned once, reused for every run)."""

    def __init__(self, procs: int) -> None:
        self.procs = procs
        self._pool = ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"))

    def __enter__(self) -> LoadProcs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def open_loop(self, host: str, port: int, path: str, bodies: Sequence[bytes],
                  offsets: npt.NDArray[np.float64], *, content_type: str,
                  timeout_s: float = 10.0) -> RunResult:
        """loadtest.harness.load.open_loop over all processes; results in schedule order."""
        start_at = time.time() + _LEAD_S
        k = self.procs
        parts = [_Part(host, port, path, bodies, offsets[i::k].tolist(), content_type,
                       timeout_s, start_at) for i in range(k)]
        results = list(self._pool.map(_run_part, parts))
        n = len(offsets)
        out = RunResult(latency_s=[0.0] * n, service_s=[0.0] * n, send_lag_s=[0.0] * n,
                        status=[0] * n, due_s=[float(o) for o in offsets], started_at=start_at)
        for i, r in enumerate(results):
            for name in ("latency_s", "service_s", "send_lag_s", "status"):
                getattr(out, name)[i::k] = getattr(r, name)
            out.errors += r.errors
        out.wall_s = max(r.wall_s for r in results)
        return out
