"""P5's correctness checks on the real servers: the device ranker's scores against a CPU
ranker's on the same shards (the demo eval set and mixed request sizes), and the latency
of the first requests after a ranker reported ready."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.bench.fleet import PROTOBUF, Fleet
from loadtest.bench.workload import encode_bodies, mixed_requests
from loadtest.harness.load import HttpPool, percentiles
from loadtest.harness.process import ServerProcess
from modelpack.train import auc
from protos import ranker_pb2

PARITY_TOLERANCE = 2e-3
AUC_TOLERANCE = 1e-3


async def _post_all(s: ServerProcess, bodies: Sequence[bytes], concurrency: int
                    ) -> list[np.ndarray]:
    """Every body's scores from one ranker (`concurrency` at a time), in body order."""
    pool = HttpPool("127.0.0.1", s.port)
    out: list[np.ndarray] = [np.empty(0)] * len(bodies)
    todo = iter(range(len(bodies)))

    async def worker() -> None:
        for i in todo:
            status, payload = await pool.request("POST", "/v1/rank", bodies[i], PROTOBUF)
            if status != 200:
                raise RuntimeError(f"{s.name}: HTTP {status}: {payload[:300]!r}")
            out[i] = np.frombuffer(ranker_pb2.RankResponse.FromString(payload).scores, "<f4")

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await pool.close()
    return out


def eval_parity(f: Fleet, vdir: Path, n: int) -> dict[str, Any]:
    """The eval set scored by the device ranker and by the CPU ranker, and both AUCs."""
    evals = [json.loads(x) for x in (vdir / "eval.jsonl").read_text().splitlines()[:n]]
    labels = np.concatenate([np.asarray(r["labels"], dtype=np.float64) for r in evals])
    bodies = encode_bodies(vdir, [{k: v for k, v in r.items() if k != "labels"} for r in evals],
                           "protobuf")
    dev = np.concatenate(asyncio.run(_post_all(f.rankers["remote"], bodies, 32)))
    cpu = np.concatenate(asyncio.run(_post_all(f.rankers["remote_cpu"], bodies, 32)))
    auc_dev, auc_cpu = auc(labels, dev), auc(labels, cpu)
    diff = float(np.abs(dev - cpu).max())
    return {"requests": len(evals), "candidates": int(labels.size),
            "max_abs_score_diff": diff, "auc_device": auc_dev, "auc_cpu": auc_cpu,
            "auc_diff": abs(auc_dev - auc_cpu),
            "ok": diff <= PARITY_TOLERANCE and abs(auc_dev - auc_cpu) <= AUC_TOLERANCE}


def mixed_parity(f: Fleet, vdir: Path, n: int) -> dict[str, Any]:
    """Requests of 1..1000 candidates, 64 at a time (batches of every shape, several in
    flight), through the device ranker and the CPU ranker: the largest score difference."""
    bodies = encode_bodies(vdir, mixed_requests(vdir / "eval.jsonl", n, 1000, seed=7), "protobuf")
    dev = asyncio.run(_post_all(f.rankers["remote"], bodies, 64))
    cpu = asyncio.run(_post_all(f.rankers["remote_cpu"], bodies, 64))
    diff = max(float(np.abs(a - b).max()) for a, b in zip(dev, cpu, strict=True))
    return {"requests": n, "candidates": int(sum(a.size for a in dev)),
            "max_abs_score_diff": diff, "ok": diff <= PARITY_TOLERANCE}


def cold_start(s: ServerProcess, bodies: Sequence[bytes], n: int = 200) -> dict[str, Any]:
    """Latencies of the first `n` requests to a ranker that just reported ready, 8 at a time."""
    async def run() -> list[float]:
        pool = HttpPool("127.0.0.1", s.port)
        lat: list[float] = []
        todo = iter(range(n))

        async def worker() -> None:
            for i in todo:
                t0 = time.perf_counter()
                status, _ = await pool.request("POST", "/v1/rank", bodies[i % len(bodies)],
                                               PROTOBUF)
                lat.append(time.perf_counter() - t0 if status == 200 else math.inf)

        try:
            await asyncio.gather(*(worker() for _ in range(8)))
        finally:
            await pool.close()
        return lat

    lat = asyncio.run(run())
    return {"requests": n, "failed": sum(1 for x in lat if math.isinf(x)), "first_ms": lat[0] * 1e3,
            **percentiles([x for x in lat if math.isfinite(x)])}
