"""Load on the ranker's own Pipeline, in-process: an eager dynamic batcher over fixed arrivals.

What the server does between the HTTP handler and the response, minus HTTP: decode each
body with ranker_server.codec as it arrives (on the event loop, as the handler does),
take every arrived request up to `max_batch_candidates` into one batch as soon as a
batch slot is free (`in_flight` batches at once, so batch k+1's lookups and staging
overlap batch k's forward), run `Pipeline.run`, encode one response per request.
Latency runs from each request's *scheduled* arrival, so queueing is charged.
The pipeline's metrics go to a `Recorder` (plain sample lists, no prometheus).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from modelpack.dense import load_dense
from modelpack.manifest import read_manifest
from modelpack.requests import DecodedRequest, Envelope
from ranker_server import codec
from ranker_server.device import Device
from ranker_server.pipeline import Pipeline, forward, merge_requests, plan_lookups, stage_inputs, stage_rows
from ranker_server.versions import LoadedVersion


def loaded_version(vdir: Path, device: Device) -> LoadedVersion:
    """A version's manifest and dense model on `device`, as the ranker's lifecycle loads it."""
    m = read_manifest(vdir)
    return LoadedVersion(m, vdir, device.place_module(
        load_dense(vdir / m.dense.path, m.dense.architecture, m.dense.config)))


class Samples:
    """An Observer (ranker_server.pipeline) that keeps every value."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, amount: float) -> None:
        self.values.append(amount)


@dataclass
class Recorder:
    """PipelineMetrics for a benchmark, plus the two stages the driver itself runs."""

    lookup_duration: Samples = field(default_factory=Samples)
    forward_duration: Samples = field(default_factory=Samples)
    batch_candidates: Samples = field(default_factory=Samples)
    decode: Samples = field(default_factory=Samples)  # per request
    respond: Samples = field(default_factory=Samples)  # per batch

    def reset(self) -> None:
        for samples in (self.lookup_duration, self.forward_duration, self.batch_candidates,
                        self.decode, self.respond):
            samples.values.clear()

    def per_request_us(self, requests: int) -> dict[str, float]:
        """Seconds summed per stage, per request (stages overlap: they need not add up)."""
        n = max(requests, 1)
        return {k: sum(getattr(self, k).values) / n * 1e6
                for k in ("decode", "lookup_duration", "forward_duration", "respond")}


@dataclass
class Decoded:
    envelope: Envelope
    features: DecodedRequest


@dataclass
class Served:
    """One version behind one pipeline, and the bodies to send it."""

    pipeline: Pipeline
    version: LoadedVersion
    kind: codec.BodyKind
    bodies: Sequence[bytes]
    max_batch_candidates: int
    in_flight: int = 2
    timeout_s: float = 30.0
    metrics: Recorder = field(default_factory=Recorder)

    def decode(self, body: bytes) -> Decoded:
        parsed = codec.parse_body(body, self.kind)
        return Decoded(parsed.envelope, codec.decode(parsed, self.version.schema, 1 << 20))

    def respond(self, request: Decoded, scores: npt.NDArray[np.float32]) -> bytes:
        env = request.envelope
        return codec.encode_response(self.kind, env.request_id, env.model, self.version.version,
                                     scores)[0]


@dataclass
class StepResult:
    mode: str  # "saturation" | "open"
    offered_rps: float
    requests: int
    candidates: int
    wall_s: float
    latencies_s: npt.NDArray[np.float64] = field(repr=False)
    mean_batch_candidates: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_s * 1000
        p50, p99 = np.percentile(lat, [50, 99]) if lat.size else (math.nan, math.nan)
        per_req = self.candidates / max(self.requests, 1)
        return {"mode": self.mode, "offered_requests_per_s": self.offered_rps,
                "offered_candidates_per_s": self.offered_rps * per_req,
                "requests": self.requests, "candidates": self.candidates, "wall_s": self.wall_s,
                "candidates_per_s": self.candidates / self.wall_s,
                "p50_ms": float(p50), "p99_ms": float(p99),
                "mean_batch_candidates": self.mean_batch_candidates}


async def serve(s: Served, arrivals: npt.NDArray[np.float64], mode: str, offered_rps: float
                ) -> StepResult:
    """Serve `arrivals.size` requests arriving at `arrivals` (seconds from the start)."""
    n = arrivals.size
    done = np.full(n, np.nan)
    pending: deque[tuple[int, Decoded]] = deque()
    arrived = asyncio.Event()
    slots = asyncio.Semaphore(s.in_flight)
    tasks: list[asyncio.Task[None]] = []
    batch_sizes: list[int] = []
    t0 = time.perf_counter() + 0.01

    async def produce() -> None:
        for i, at in enumerate(arrivals):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            a = time.perf_counter()
            pending.append((i, s.decode(s.bodies[i % len(s.bodies)])))
            s.metrics.decode.observe(time.perf_counter() - a)
            arrived.set()
            if delay <= 0:  # a backlog: let the batcher take what has arrived so far
                await asyncio.sleep(0)

    async def run_batch(items: list[tuple[int, Decoded]]) -> None:
        try:
            reqs = [d for _, d in items]
            scores = await s.pipeline.run(s.version, [d.features for d in reqs], s.timeout_s)
            a = time.perf_counter()
            for d, sc in zip(reqs, scores, strict=True):
                s.respond(d, sc)
            now = time.perf_counter()
            s.metrics.respond.observe(now - a)
            done[[i for i, _ in items]] = now - t0
        finally:
            slots.release()

    producer = asyncio.create_task(produce())
    taken = 0
    while taken < n:
        if not pending:
            arrived.clear()
            await arrived.wait()
            continue
        await slots.acquire()
        batch = [pending.popleft()]
        cands = batch[0][1].features.num_candidates
        while pending and cands + pending[0][1].features.num_candidates <= s.max_batch_candidates:
            batch.append(pending.popleft())
            cands += batch[-1][1].features.num_candidates
        taken += len(batch)
        batch_sizes.append(cands)
        tasks.append(asyncio.create_task(run_batch(batch)))
    await producer
    await asyncio.gather(*tasks)
    cands_total = int(sum(batch_sizes))
    return StepResult(mode, offered_rps, n, cands_total, float(np.nanmax(done) - arrivals[0]),
                      done - arrivals, float(np.mean(batch_sizes)))


async def stage_costs(s: Served, sizes: dict[str, int], repeats: int) -> dict[str, Any]:
    """Per-request cost of each pipeline stage with nothing else running (no overlap): the
    pipeline's own functions called one after the other on the threads the server uses.
    `min` is the cost of the work (as timeit reports); `median` adds the machine's noise."""
    p, v = s.pipeline, s.version
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in sizes}
    for _ in range(repeats):
        for label, k in sizes.items():
            a = time.perf_counter()
            decoded = [s.decode(b) for b in s.bodies[:k]]
            reqs = [d.features for d in decoded]
            b = time.perf_counter()
            merged = merge_requests(v.schema, reqs)
            plan = plan_lookups(v, merged)
            c = time.perf_counter()
            packed = await p.source.lookup(v, plan.queries, s.timeout_s)
            d = time.perf_counter()
            staged = await p.device.stage(stage_inputs, p.device, reqs, merged)
            rows_on_device = await p.device.stage(stage_rows, p.device, v, plan, packed)
            e = time.perf_counter()
            scores = await p.device.compute(forward, v, staged, rows_on_device)
            f = time.perf_counter()
            bounds = np.cumsum([0] + [r.num_candidates for r in reqs])
            for r, lo, hi in zip(decoded, bounds[:-1], bounds[1:], strict=True):
                s.respond(r, scores[lo:hi])
            g = time.perf_counter()
            t = {"decode": b - a, "merge_plan": c - b, "lookup": d - c, "stage": e - d,
                 "forward": f - e, "respond": g - f}
            rows[label].append({key: val / len(reqs) * 1e6 for key, val in t.items()})
    return {label: {"requests": sizes[label],
                    "min_us": {key: float(min(r[key] for r in rs)) for key in rs[0]},
                    "median_us": {key: float(np.median([r[key] for r in rs])) for key in rs[0]}}
            for label, rs in rows.items()}
