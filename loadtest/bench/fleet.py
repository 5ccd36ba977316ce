"""The ranker benchmarks' processes (P2, P4): two embedding shards and one ranker per config.

Every process is a real `python -m embedding_server` / `python -m ranker_server --device
cpu` on a free loopback port (loadtest.harness.process), stopped (SIGTERM, then SIGKILL)
however the benchmark ends. Also here: load on one ranker through the shared HTTP load
generator, and the ranker's own histograms read from /metrics between two scrapes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import math
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
from prometheus_client.parser import text_string_to_metric_families

from loadtest.bench.record import RESULTS, BenchRecord
from loadtest.bench.workload import protobuf_bodies, version_dir
from loadtest.harness.load import HttpPool, RunResult, closed_loop, open_loop
from loadtest.harness.probes import http_ready
from loadtest.harness.process import ServerProcess, start_all, stop_all
from protos import ranker_pb2

PROTOBUF = "application/x-protobuf"
CONFIG_LABELS = {
    "remote": "ranker + 2 remote embedding shards",
    "local": "ranker --local-tables",
    "serial": "ranker + 2 remote shards, --debug-serial-lookups",
    "remote_1thread": "ranker + 2 remote shards, all three with OMP_NUM_THREADS=1",
    "remote_cpu": "ranker on the CPU + 2 remote shards (the reference on a GPU machine)",
}


@dataclass
class Fleet:
    shards: dict[str, ServerProcess]  # shard0, shard1 (+ shard0_omp1, shard1_omp1)
    rankers: dict[str, ServerProcess]  # by config

    def pids(self) -> dict[str, int]:
        return {**{k: s.pid for k, s in self.shards.items()},
                **{f"ranker_{c}": s.pid for c, s in self.rankers.items()}, "bench": os.getpid()}


def parser(prog: str, doc: str | None, result: str) -> argparse.ArgumentParser:
    """The options every ranker benchmark has; the driver adds its own."""
    p = argparse.ArgumentParser(prog=f"python -m loadtest.bench.{prog}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="demo_store", help="model store with ads_ctr/v1")
    p.add_argument("--candidates", type=int, default=200, help="candidates per request")
    p.add_argument("--budget-s", type=float, default=170.0,
                   help="the run is cut to stay under this many seconds")
    p.add_argument("--out", type=Path, default=RESULTS / result, help="result JSON; PNG beside")
    return p


def prepare(args: argparse.Namespace, name: str, configs: Sequence[str], anchor: str
            ) -> tuple[Path, BenchRecord, list[bytes]] | None:
    """A P2/P4 run's version dir, result record and request bodies; None (said why) without
    a demo model. SIGTERM becomes SystemExit, so the fleet's `finally` stops the servers."""
    vdir = version_dir(args.store)
    if not (vdir / "eval.jsonl").is_file():
        print(f"no demo model in {args.store!r}; build it with "
              f"`python -m modelpack demo --store {args.store}`", file=sys.stderr)
        return None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rec = BenchRecord(name, compared=", ".join(f"{c}: {CONFIG_LABELS[c]}" for c in configs),
                      anchor=anchor, device="cpu", config={k: str(v) for k, v in vars(args).items()})
    rec.results.update({"candidates_per_request": args.candidates, "body": "protobuf",
                        "configs": {c: CONFIG_LABELS[c] for c in configs}})
    return vdir, rec, protobuf_bodies(vdir, 256, args.candidates)


@contextlib.contextmanager
def fleet(store: Path, configs: Sequence[str], device: str = "cpu",
          log_dir: Path | None = None, ranker_args: Sequence[str] = ()) -> Iterator[Fleet]:
    """Two embedding shards (two more with OMP_NUM_THREADS=1 if a config wants them) and one
    ranker per config on `device` (`remote_cpu` always on the CPU), logging to `log_dir` (a
    temp dir, removed after, by default), each ranker with `ranker_args` added; every
    process is stopped on exit."""
    started: list[ServerProcess] = []
    omp1 = {"OMP_NUM_THREADS": "1"}
    keep_logs = log_dir is not None
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="bench_fleet_"))
    try:
        sets = {"": None, **({"_omp1": omp1} if "remote_1thread" in configs else {})}
        shards = {f"shard{k}{suffix}": ServerProcess.module(
            "embedding_server", "--store", str(store), "--shard", str(k), "--num-shards", "2",
            "--preload", "ads_ctr/v1", "--log-level", "WARNING", log_dir=log_dir,
            name=f"shard{k}{suffix}", env=env) for suffix, env in sets.items() for k in range(2)}
        started += start_all(shards.values())

        def targets(suffix: str) -> str:
            return ",".join(shards[f"shard{k}{suffix}"].address for k in range(2))

        mode_args = {"remote": lambda: ["--embedding-shards", targets("")],
                     "local": lambda: ["--local-tables"],
                     "serial": lambda: ["--embedding-shards", targets(""), "--debug-serial-lookups"],
                     "remote_1thread": lambda: ["--embedding-shards", targets("_omp1")],
                     "remote_cpu": lambda: ["--embedding-shards", targets("")]}
        rankers = start_all([ServerProcess.module(
            "ranker_server", "--store", str(store), "--model", "ads_ctr", "--version", "v1",
            "--device", "cpu" if c == "remote_cpu" else device, "--log-level", "warning",
            *mode_args[c](), *ranker_args,
            log_dir=log_dir, name=f"ranker_{c}", ready=http_ready,
            env=omp1 if c == "remote_1thread" else None) for c in configs])
        started += rankers
        yield Fleet(shards, dict(zip(configs, rankers, strict=True)))
    finally:
        stop_all(started)
        if not keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)


def scrape(s: ServerProcess | str) -> dict[str, float]:
    """Every sample of the ranker's /metrics (a process, or host:port) as 'name{k=v,...}' -> value."""
    text = httpx.get(f"http://{s if isinstance(s, str) else s.address}/metrics", timeout=5).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(smp.labels.items()))
            out[f"{smp.name}{{{labels}}}"] = float(smp.value)
    return out


def hist_delta(before: dict[str, float], after: dict[str, float], name: str) -> dict[str, Any]:
    """count, sum, mean and per-bucket counts of histogram `name` between two scrapes."""
    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    count = sum(d(k) for k in after if k.startswith(name + "_count{"))
    total = sum(d(k) for k in after if k.startswith(name + "_sum{"))
    buckets: dict[str, float] = collections.defaultdict(float)
    for k in after:
        if k.startswith(name + "_bucket{"):
            le = next(p.split("=", 1)[1] for p in k[len(name) + 8:-1].split(",")
                      if p.startswith("le="))
            buckets[le] += d(k)
    return {"count": count, "sum": total, "mean": total / count if count else math.nan,
            "cumulative_buckets": dict(buckets)}


def server_side(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The ranker's own stage means (ms) and batch sizes between two scrapes."""
    names = {"lookup_ms": "ranker_lookup_duration_seconds",
             "device_forward_ms": "ranker_device_forward_seconds",
             "queue_wait_ms": "ranker_queue_wait_seconds",
             "request_ms": "ranker_request_duration_seconds"}
    out: dict[str, Any] = {k: hist_delta(before, after, v)["mean"] * 1000 for k, v in names.items()}
    bc = hist_delta(before, after, "ranker_batch_candidates")
    out["batches"], out["mean_batch_candidates"] = bc["count"], bc["mean"]
    out["batch_candidates_cumulative_buckets"] = bc["cumulative_buckets"]
    return out


def check_scores_agree(f: Fleet, body: bytes) -> dict[str, Any]:
    """Every ranker config must give the same scores for the same body (sanity)."""
    scores = {}
    for name, s in f.rankers.items():
        r = httpx.post(f"http://{s.address}/v1/rank", content=body,
                       headers={"content-type": PROTOBUF}, timeout=30)
        r.raise_for_status()
        scores[name] = np.frombuffer(ranker_pb2.RankResponse.FromString(r.content).scores, "<f4")
    first = next(iter(scores.values()))
    return {"candidates": int(first.size),
            "max_abs_diff_between_configs": float(max(np.abs(v - first).max()
                                                      for v in scores.values()))}


async def _closed(s: ServerProcess, bodies: Sequence[bytes], concurrency: int, seconds: float
                  ) -> RunResult:
    pool = HttpPool("127.0.0.1", s.port)
    try:
        return await closed_loop(pool, "/v1/rank", bodies, concurrency=concurrency,
                                 duration_s=seconds, content_type=PROTOBUF)
    finally:
        await pool.close()


async def _open(s: ServerProcess, bodies: Sequence[bytes], offsets: npt.NDArray[np.float64]
                ) -> RunResult:
    pool = HttpPool("127.0.0.1", s.port)
    try:
        return await open_loop(pool, "/v1/rank", bodies, offsets.tolist(), content_type=PROTOBUF)
    finally:
        await pool.close()


def closed(s: ServerProcess, bodies: Sequence[bytes], concurrency: int, seconds: float
           ) -> RunResult:
    """Closed-loop load (`concurrency` clients) on one ranker for `seconds`."""
    return asyncio.run(_closed(s, bodies, concurrency, seconds))


def open_(s: ServerProcess, bodies: Sequence[bytes], offsets: npt.NDArray[np.float64]
          ) -> RunResult:
    """Open-loop load on one ranker: request i sent at offsets[i] seconds."""
    return asyncio.run(_open(s, bodies, offsets))
