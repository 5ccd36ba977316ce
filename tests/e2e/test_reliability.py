"""Reliability figures on the real stack (2 shards, shard 0 with two replicas, rankers, the
controller), each test printing its figure:

R4: a v2 with one flipped byte in a table file: the rollout is refused when the shards
    load it (checksums), rolled back, v1 serves on, 0 failed requests, no traffic ever
    on the bad version, the fleet back on v1 alone.
R5: 2x the measured capacity for 20 s (open loop): the ranker sheds with 429 instead of
    queueing without bound, the p99 of the admitted requests stays within 3x the p99 at
    steady full load, and within 5 s of the end of the overload it is back to normal.
R2: two replicas of shard 0 under load, one SIGKILLed: 0 failed requests.

Bounded: each test runs for well under a minute on 2 cores; R2 runs last (it kills a
replica of the module's stack).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvloop

from deploy_controller import cli
from loadtest.harness.load import HttpPool, RunResult, closed_loop, open_loop
from loadtest.harness.probes import LOOPBACK, metric_sum
from loadtest.harness.process import ServerProcess
from modelpack.manifest import read_manifest
from ranker_server.codec import encode_request
from tests.stack import Load, Stack, corrupt_copy, start_ranker, start_stack

pytestmark = pytest.mark.slow

GATES = ("--gate-interval-s", "0.5", "--gate-min-requests", "10", "--gate-p99-slack-s", "0.5",
         "--retry-backoff-s", "0.2")


@pytest.fixture(scope="module")
def stack(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    d = tmp_path_factory.mktemp("reliability")
    with start_stack(store, d, replicas=(2, 1), gates=GATES,
                     shard_extra=("--metrics-port", "0")) as s:
        yield s


# ------------------------------------------------------------------ R4


def test_r4_flipped_byte_is_refused_at_load_and_v1_serves_on(stack: Stack) -> None:
    table = corrupt_copy(stack.store, "v2", "v2flip", shard_file="shard-0-of-", flip=0xFF,
                         where=0.25)
    stack.assert_consistent("v1")
    mism0 = stack.mismatches()
    ctl = stack.controller("ctl_r4", stack.dir / "r4.sqlite").start().wait_ready()
    try:
        with Load(stack) as load:
            time.sleep(0.5)
            t0 = time.time()
            code = cli.main(["rollout", "ads_ctr", "v2flip", "--canary", "50,100", "--bake", "2",
                             "--poll", "0.5", "--controller", f"http://{ctl.address}",
                             "--token-file", str(stack.token)])
            refused_after = time.time() - t0
            time.sleep(0.5)
        with httpx.Client(base_url=f"http://{ctl.address}") as c:
            rid = c.get("/v1/history").json()["rollouts"][0]["id"]
            r = c.get(f"/v1/rollouts/{rid}").json()
    finally:
        ctl.stop()
    assert code == 1, ctl.log_tail()  # deployctl: rolled back
    assert r["status"] == "rolled_back" and r["reason_code"] == "shard_load_failed", r["reason"]
    failed = [e for e in r["events"] if e["event"] == "end" and e["outcome"] == "failed"]
    assert [e["step"] for e in failed] == ["load_embeddings"], failed
    assert not any(e["step"].startswith("shift") for e in r["events"]), "traffic was moved"
    assert re.search(r"sha256|checksum|corrupt", r["reason"], re.I), r["reason"]
    assert load.failures() == [], load.failures()[:5]
    assert {x.version for x in load.results} == {"v1"}
    assert stack.mismatches() == mism0
    stack.assert_consistent("v1")
    print(f"\nR4: one byte (x ^ 0xFF) of {table.relative_to(stack.store)} flipped: rollout to "
          f"v2flip refused at load_embeddings, rolled back in {refused_after:.1f} s "
          f"({r['reason'][:120]}...); {len(load.results)} requests meanwhile, 0 failed, "
          f"all answered by v1, 0 mismatches; fleet on v1 alone again")


# ------------------------------------------------------------------ R5

QUEUE = 32  # the overload ranker's --max-queue
# R5_REQUESTS=small (by hand): the demo's 16-candidate JSON requests instead, where the
# event loop, not the queue, is the bottleneck: requests wait unread in their sockets
# however short the queue, so that ranker also sheds while its loop runs LOOP_LAG_MS late.
# Two back-to-back pairs on 2 loaded cores, without -> with: admitted p99 1.5 s -> 0.85 s
# and 3.0 s -> 0.57 s, the 429s' p50 62 -> 17 ms and 203 -> 7 ms; yet 2-12x steady, as the
# generator itself then lags its schedule by 0.2-0.4 s (p99): not a reliable bound here.
SMALL = os.environ.get("R5_REQUESTS", "large") == "small"
LOOP_LAG_MS = 20
CANDIDATES = 16 if SMALL else 1000  # per request; 1000 (the max): work >> a 429's cost
CONTENT_TYPE = "application/json" if SMALL else "application/x-protobuf"


def _bodies(stack: Stack) -> list[bytes]:
    """Protobuf rank requests (the ads backend's format) of CANDIDATES candidates each,
    tiled from the eval set's candidates under its users; or the eval set's own JSON."""
    reqs = stack.requests
    if SMALL:
        assert {len(r["candidates"]) for r in reqs} == {CANDIDATES}
        return [json.dumps({**r, "timeout_ms": 10_000}).encode() for r in reqs]
    schema = read_manifest(stack.store / "ads_ctr" / "v1").schema
    pool = [c for r in reqs for c in r["candidates"]]
    return [encode_request({**reqs[i], "timeout_ms": 10_000,
                            "candidates": [pool[(i * CANDIDATES + 7 * j) % len(pool)]
                                           for j in range(CANDIDATES)]}, schema)
            for i in range(8)]


def _window(res: RunResult, lo: float = -math.inf, hi: float = math.inf) -> list[int]:
    """Indices of the requests due in [lo, hi) seconds from the run's start."""
    return [i for i, due in enumerate(res.due_s) if lo <= due < hi]


def _p99(res: RunResult, idx: list[int], status: int = 200, q: float = 99) -> float:
    """p99 (ms) of the service time (from the actual send) of the admitted requests (or
    of another status, at another percentile)."""
    ok = [res.service_s[i] for i in idx if res.status[i] == status]
    return float(np.percentile(ok, q)) * 1000 if ok else math.nan


def _count(res: RunResult, idx: list[int], status: int) -> int:
    return sum(res.status[i] == status for i in idx)


def _schedule(rate: float, seconds: float, start: float, rng: np.random.Generator) -> list[float]:
    """Poisson arrivals at `rate`/s in [start, start + seconds)."""
    t, out = start, list[float]()
    while True:
        t += rng.exponential(1.0 / rate)
        if t >= start + seconds:
            return out
        out.append(t)


@pytest.fixture(scope="module")
def overload_ranker(stack: Stack) -> Iterator[ServerProcess]:
    r = start_ranker(stack.store, stack.dir, stack.token, stack.replicas, "ranker_r5",
                     "--max-queue", str(QUEUE),
                     *(("--shed-loop-lag-ms", str(LOOP_LAG_MS)) if SMALL else ()))
    r.start().wait_ready()
    yield r
    r.stop()


@dataclass
class Overload:
    """One R5 measurement and its verdict."""

    cap: float
    steady_p99: float
    offered: float
    during: int
    admitted: int
    shed: int
    over_p99: float
    recovered_s: float
    late_429: int
    errors: Counter[str]
    half_load_p99: float
    shed_p50: float
    shed_p99: float
    send_lag_p99: float  # the generator's own lag behind its schedule, for the reader

    def problems(self) -> list[str]:
        out = []
        if self.errors:
            out.append(f"requests failed otherwise than with 429: {dict(self.errors)}")
        if self.shed <= 0.2 * self.during:
            out.append(f"only {self.shed} of {self.during} shed")
        # Without shedding the queue would grow by about `cap` requests a second for 20 s and
        # the admitted p99 would reach tens of seconds (~50x steady). 3x leaves room for the
        # CPU the 429s and the generator take on 2 shared cores (seen: 1.4x-2.7x).
        if not self.over_p99 <= 3 * self.steady_p99:
            out.append(f"admitted p99 {self.over_p99:.1f} ms > 3x steady {self.steady_p99:.1f} ms")
        if not self.recovered_s <= 5:
            out.append(f"not back to normal within 5 s ({self.recovered_s} s)")
        if self.late_429:
            out.append(f"{self.late_429} 429s after recovering")
        return out

    def figure(self) -> str:
        return (f"capacity {self.cap:.0f} req/s of {CANDIDATES} candidates (p99 {self.steady_p99:.1f}"
                f" ms at that steady full load, {self.half_load_p99:.1f} ms at half of it); "
                f"offered {self.offered:.0f} req/s for {OVER_S:.0f} s: {self.shed} shed with 429 "
                f"({self.shed / max(self.during, 1):.0%}; p50 {self.shed_p50:.1f} ms, p99 "
                f"{self.shed_p99:.1f} ms), {self.admitted} admitted "
                f"({self.admitted / OVER_S:.0f}/s, {self.admitted / OVER_S / self.cap:.0%} of "
                f"capacity) with p99 {self.over_p99:.1f} ms = "
                f"{self.over_p99 / self.steady_p99:.2f}x steady; back to normal "
                f"{self.recovered_s:.0f} s after the overload; generator send lag p99 "
                f"{self.send_lag_p99:.1f} ms")


LEAD_S, OVER_S, TAIL_S = 2.0, 20.0, 8.0


def measure_overload(port: int, bodies: list[bytes]) -> Overload:
    async def run() -> tuple[RunResult, RunResult]:
        pool = HttpPool(LOOPBACK, port)
        try:
            await closed_loop(pool, "/v1/rank", bodies, concurrency=QUEUE, duration_s=2.0,
                              content_type=CONTENT_TYPE, timeout_s=30)  # warm up
            # Steady full load: QUEUE clients back to back, which the queue always admits.
            steady = await closed_loop(pool, "/v1/rank", bodies, concurrency=QUEUE,
                                       duration_s=5.0, content_type=CONTENT_TYPE, timeout_s=30)
            cap = steady.ok / 5.0
            rng = np.random.default_rng(5)
            offsets = (_schedule(cap / 2, LEAD_S, 0.0, rng)
                       + _schedule(2 * cap, OVER_S, LEAD_S, rng)
                       + _schedule(cap / 2, TAIL_S, LEAD_S + OVER_S, rng))
            return steady, await open_loop(pool, "/v1/rank", bodies, offsets,
                                           content_type=CONTENT_TYPE, timeout_s=30)
        finally:
            await pool.close()

    # The generator on uvloop too: at ~2000 requests/s its own CPU, on the cores the ranker
    # and the shards use, is part of what the measurement has to leave out.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        steady, shots = runner.run(run())
    cap = steady.ok / 5.0
    steady_p99 = _p99(steady, _window(steady))
    end = LEAD_S + OVER_S
    during = _window(shots, LEAD_S, end)
    # Recovery: the first 1 s window after the overload in which every request was admitted
    # with a p99 within 2x steady; from then on, no more 429s.
    recovered = math.inf
    for k in range(int(TAIL_S)):
        w = _window(shots, end + k, end + k + 1)
        if w and _count(shots, w, 200) == len(w) and _p99(shots, w) <= 2 * steady_p99:
            recovered = float(k)
            break
    errors = Counter(steady.errors + shots.errors) + Counter(
        f"HTTP {s}" for s in steady.status + shots.status if s not in (200, 429, -1))
    half = _window(shots, hi=LEAD_S) + _window(shots, lo=end + max(recovered, 1.0))
    return Overload(cap, steady_p99, 2 * cap, len(during), _count(shots, during, 200),
                    _count(shots, during, 429), _p99(shots, during), recovered,
                    _count(shots, _window(shots, lo=end + recovered), 429), errors,
                    _p99(shots, half), _p99(shots, during, 429, 50), _p99(shots, during, 429),
                    float(np.percentile([shots.send_lag_s[i] for i in during], 99)) * 1000)


def test_r5_twice_capacity_sheds_with_429_keeps_admitted_p99_and_recovers(
        stack: Stack, overload_ranker: ServerProcess) -> None:
    """Capacity and steady: QUEUE clients back to back (the most the ranker takes without a
    429), their throughput and p99. Then 2x that rate, open loop (Poisson), for 20 s.

    By Little's law an admitted request waits for at most (QUEUE queued + the requests of
    the batches in flight) / throughput, so shedding at the queue keeps the ranker at the
    operating point of steady full load instead of letting the queue grow: the admitted
    p99 stays near the steady p99 while everything beyond the queue gets a cheap 429.
    Requests carry 1000 candidates, as ranking requests do, so a 429 costs the ranker a
    small fraction of a scored request; it is decided from the headers alone, before the
    body is read, routed or parsed (api.serve_rank, on uvloop + httptools). The figure
    also gives how fast the 429s came (p50, p99). For the demo's small requests, see
    R5_REQUESTS above.

    The p99s are of the service time (RunResult.service_s, from each request's actual
    send), not of the latency from the schedule: a generator starved of CPU by its
    neighbours is not charged to the server. On a shared machine a noisy neighbour
    can spoil a 40 s measurement: a second attempt is made before failing; both print.
    """
    bodies = _bodies(stack)
    attempts: list[Overload] = []
    for _ in range(2):
        attempts.append(measure_overload(overload_ranker.port, bodies))
        print(f"\nR5: {attempts[-1].figure()}" + "".join(
            f"\n    NOT MET: {p}" for p in attempts[-1].problems()))
        if not attempts[-1].problems():
            break
    assert not attempts[-1].problems(), attempts[-1].problems()


# ------------------------------------------------------------------ R2 (last: kills a replica)


def test_r2_sigkill_one_of_two_replicas_under_load_fails_no_request(stack: Stack) -> None:
    a, b = stack.replicas[0]
    assert a.metrics_port and b.metrics_port

    def lookups(s: ServerProcess) -> float:
        return metric_sum(f"{LOOPBACK}:{s.metrics_port}", "embedding_lookup_duration_seconds_count")

    # A generous deadline: the figure is about the failover, not about a busy machine.
    with Load(stack, threads=2, extra={"timeout_ms": 5000}) as load:
        time.sleep(2.0)
        before = (lookups(a), lookups(b))
        killed_at = time.time()
        a.send(signal.SIGKILL)
        assert a.proc is not None
        a.proc.wait(10)
        time.sleep(4.0)
        b_after = lookups(b)
    after = [x for x in load.results if x.t0 > killed_at]
    around = [x.t1 - x.t0 for x in load.results if killed_at - 1 < x.t0 < killed_at + 1]
    print(f"\nR2: shard 0 replicas served {before[0]:.0f} and {before[1]:.0f} lookups before "
          f"the SIGKILL of one; {len(load.results)} requests in all, {len(after)} after the "
          f"kill, {len(load.failures())} failed; slowest request within 1 s of the kill "
          f"{max(around) * 1000:.0f} ms; the survivor served {b_after - before[1]:.0f} more")
    assert before[0] > 0 and before[1] > 0, before  # both replicas were in use
    assert load.failures() == [], load.failures()[:5]
    assert len(after) > 50
    assert b_after > before[1]
    assert {x.version for x in load.results} == {"v1"}
