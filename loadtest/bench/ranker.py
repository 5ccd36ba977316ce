"""P2 hybrid tax and P4 serving tax of the ranker, against real processes on loopback.

    python -m loadtest.bench.ranker p2 --store demo_store   # remote shards vs --local-tables
    python -m loadtest.bench.ranker p4 --store demo_store   # end to end vs raw dense forward

Both start two embedding shards (`python -m embedding_server`, 2 of 2, v1 preloaded) and
the rankers they compare (`python -m ranker_server --device cpu`) on free ports, send
200-candidate protobuf requests built from the version's eval.jsonl, and stop every
process they started (SIGTERM, then SIGKILL) however they end. Results go to
loadtest/results/ranker_p2.{json,png} and ranker_p4.{json,png}. The machine is shared:
each result records os.getloadavg(), and only ratios measured within one run are
compared.

P2 (issue 4): the same offered load, open loop (Poisson arrivals at a fixed rate, send
times fixed in advance, latency from the scheduled send), to a ranker on remote shards
(A), the same ranker with --local-tables (B), and A with --debug-serial-lookups (C).
All three run side by side and take turns in rounds (A B C, B C A, C A B, ...), each
round replaying the same schedule and bodies, so drift on the shared machine hits all
three alike. The rate is a fraction (default 0.3) of the lowest measured capacity.

P4: closed loop with enough concurrency to fill batches; candidates/s end to end vs
the raw dense forward (modelpack.dense.load_dense) of the same model at the batch size
the batcher actually formed (mean of the ranker's `ranker_batch_candidates` histogram
over the measured window). Configs (remote, local, and remote with OMP_NUM_THREADS=1 in
ranker and shards) take turns in short windows, each followed at once by the raw forward,
and per-process CPU time gives a contention-robust CPU-efficiency ratio beside the
wall-clock one. Then py-spy samples the remote ranker under the same load; its samples
are grouped by pipeline stage and the top frames go into the result.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
from prometheus_client.parser import text_string_to_metric_families

from loadtest.bench.workload import build_requests
from loadtest.harness.load import HttpPool, RunResult, closed_loop, open_loop, percentiles, schedule
from loadtest.harness.process import ServerProcess, start_all, stop_all
from modelpack.manifest import read_manifest

RESULTS = Path(__file__).resolve().parents[1] / "results"
PROTOBUF = "application/x-protobuf"
P2_TARGETS = {"p50_ratio": 1.05, "p99_ratio": 1.10}
P4_TARGET = 0.7
CONFIG_LABELS = {
    "remote": "ranker + 2 remote embedding shards",
    "local": "ranker --local-tables",
    "serial": "ranker + 2 remote shards, --debug-serial-lookups",
    "remote_1thread": "ranker + 2 remote shards, all three with OMP_NUM_THREADS=1",
}


# --------------------------------------------------------------------------------------
# Processes


def _ready(s: ServerProcess) -> bool:
    try:
        return httpx.get(f"http://{s.address}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Fleet:
    shards: dict[str, ServerProcess]  # shard0, shard1 (+ shard0_omp1, shard1_omp1)
    rankers: dict[str, ServerProcess]  # by config

    def pids(self) -> dict[str, int]:
        return {**{k: s.pid for k, s in self.shards.items()},
                **{f"ranker_{c}": s.pid for c, s in self.rankers.items()}, "bench": os.getpid()}


@contextlib.contextmanager
def fleet(store: Path, configs: Sequence[str], log_dir: Path) -> Iterator[Fleet]:
    """Two embedding shards (two more with OMP_NUM_THREADS=1 if a config wants them) and one
    ranker per config; every process is stopped on exit."""
    started: list[ServerProcess] = []
    omp1 = {"OMP_NUM_THREADS": "1"}
    try:
        sets = {"": None, **({"_omp1": omp1} if "remote_1thread" in configs else {})}
        shards = {f"shard{k}{suffix}": ServerProcess.module(
            "embedding_server", "--store", str(store), "--shard", str(k), "--num-shards", "2",
            "--preload", "ads_ctr/v1", "--log-level", "WARNING", log_dir=log_dir,
            name=f"shard{k}{suffix}", env=env) for suffix, env in sets.items() for k in range(2)}
        started += start_all(shards.values())
        targets = ",".join(shards[f"shard{k}"].address for k in range(2))
        targets1 = ",".join(shards[f"shard{k}_omp1"].address for k in range(2)) \
            if "_omp1" in sets else ""
        mode_args = {"remote": ["--embedding-shards", targets], "local": ["--local-tables"],
                     "serial": ["--embedding-shards", targets, "--debug-serial-lookups"],
                     "remote_1thread": ["--embedding-shards", targets1]}
        rankers = start_all([ServerProcess.module(
            "ranker_server", "--store", str(store), "--model", "ads_ctr", "--version", "v1",
            "--device", "cpu", "--log-level", "warning", *mode_args[c],
            log_dir=log_dir, name=f"ranker_{c}", ready=_ready,
            env=omp1 if c == "remote_1thread" else None) for c in configs])
        started += rankers
        yield Fleet(shards, dict(zip(configs, rankers, strict=True)))
    finally:
        stop_all(started)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------
# Metrics


def scrape(s: ServerProcess) -> dict[str, float]:
    """Every sample of the ranker's /metrics as 'name{k=v,...}' -> value."""
    text = httpx.get(f"http://{s.address}/metrics", timeout=5).text
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
    names = {"lookup_ms": "ranker_lookup_duration_seconds",
             "device_forward_ms": "ranker_device_forward_seconds",
             "queue_wait_ms": "ranker_queue_wait_seconds",
             "request_ms": "ranker_request_duration_seconds"}
    out: dict[str, Any] = {k: hist_delta(before, after, v)["mean"] * 1000 for k, v in names.items()}
    bc = hist_delta(before, after, "ranker_batch_candidates")
    out["batches"], out["mean_batch_candidates"] = bc["count"], bc["mean"]
    out["batch_candidates_cumulative_buckets"] = bc["cumulative_buckets"]
    return out


# --------------------------------------------------------------------------------------
# Requests


def protobuf_bodies(vdir: Path, n: int, candidates: int) -> tuple[list[bytes], int]:
    from ranker_server.codec import encode_request

    schema = read_manifest(vdir).schema
    reqs = build_requests(vdir / "eval.jsonl", n, candidates)
    return [encode_request(r, schema) for r in reqs], candidates


def check_scores_agree(f: Fleet, body: bytes) -> dict[str, Any]:
    """Every ranker config must give the same scores for the same body (sanity)."""
    from protos import ranker_pb2

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
    return asyncio.run(_closed(s, bodies, concurrency, seconds))


# --------------------------------------------------------------------------------------
# P2


def _ratio_ci(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64], q: float,
              rng: np.random.Generator, n: int = 400) -> tuple[float, float]:
    """Bootstrap 95% interval of percentile_q(a) / percentile_q(b)."""
    ra = np.percentile(rng.choice(a, (n, a.size)), q, axis=1)
    rb = np.percentile(rng.choice(b, (n, b.size)), q, axis=1)
    lo, hi = np.percentile(ra / rb, [2.5, 97.5])
    return float(lo), float(hi)


def stage_window_us(vdir: Path, body: bytes) -> dict[str, float]:
    """What the overlap window holds on this machine: the ranker's own stage_inputs for one
    200-candidate request, called directly and through the Device's staging thread."""
    from modelpack.dense import load_dense
    from ranker_server import codec
    from ranker_server.device import Device
    from ranker_server.pipeline import merge_requests, plan_lookups, stage_inputs
    from ranker_server.versions import LoadedVersion

    m = read_manifest(vdir)
    decoded = codec.decode(codec.parse_body(body, "protobuf"), m.schema, 1000)
    dev = Device("cpu")
    reps = 2000
    t0 = time.perf_counter()
    for _ in range(reps):
        stage_inputs(dev, [decoded], decoded)
    direct = (time.perf_counter() - t0) / reps

    async def hops() -> float:
        await dev.stage(stage_inputs, dev, [decoded], decoded)
        t = time.perf_counter()
        for _ in range(reps):
            await dev.stage(stage_inputs, dev, [decoded], decoded)
        return (time.perf_counter() - t) / reps

    via_thread = asyncio.run(hops())
    # For scale: what the pipeline does before the lookups fire (not overlappable).
    lv = LoadedVersion(m, vdir, load_dense(vdir / m.dense.path, m.dense.architecture,
                                           m.dense.config))
    t0 = time.perf_counter()
    for _ in range(200):
        plan_lookups(lv, merge_requests(m.schema, [decoded]))
    plan = (time.perf_counter() - t0) / 200
    dev.close()
    return {"stage_inputs_direct_us": direct * 1e6, "stage_inputs_via_thread_us": via_thread * 1e6,
            "plan_lookups_us": plan * 1e6}


def pipeline_overlap_ab(shards: Sequence[ServerProcess], vdir: Path, body: bytes,
                        n: int = 300) -> dict[str, Any]:
    """The ranker's own Pipeline.run against the running shards, in this process, without
    HTTP or batcher: overlapped and serial lookups alternate batch by batch (one
    200-candidate request per batch), so both see the same machine at the same moments."""
    from modelpack.dense import load_dense
    from ranker_server import codec
    from ranker_server.device import Device
    from ranker_server.metrics import Metrics
    from ranker_server.pipeline import Pipeline
    from ranker_server.remote_tables import RemoteTables
    from ranker_server.versions import LoadedVersion

    m = read_manifest(vdir)
    decoded = codec.decode(codec.parse_body(body, "protobuf"), m.schema, 1000)
    lv = LoadedVersion(m, vdir, load_dense(vdir / m.dense.path, m.dense.architecture,
                                           m.dense.config).eval())

    async def run() -> dict[str, list[float]]:
        source = RemoteTables([[s.address] for s in shards], 5.0)
        dev = Device("cpu")
        pipes = {"overlapped": Pipeline(dev, source, Metrics()),
                 "serial": Pipeline(dev, source, Metrics(), serial_lookups=True)}
        times: dict[str, list[float]] = {k: [] for k in pipes}
        try:
            for i in range(n + 20):
                for name in (["overlapped", "serial"] if i % 2 else ["serial", "overlapped"]):
                    t0 = time.perf_counter()
                    await pipes[name].run(lv, [decoded], 5.0)
                    if i >= 20:  # warm-up
                        times[name].append(time.perf_counter() - t0)
        finally:
            await source.close()
            dev.close()
        return times

    t = asyncio.run(run())
    a, b = np.asarray(t["serial"]), np.asarray(t["overlapped"])
    rng = np.random.default_rng(1)
    return {"batches_each": n, "serial": percentiles(a), "overlapped": percentiles(b),
            "serial_over_overlapped_p50": float(np.median(a) / np.median(b)),
            "serial_over_overlapped_p50_ci95": _ratio_ci(a, b, 50, rng),
            "median_paired_difference_us": float(np.median(a - b) * 1e6)}


def run_p2(args: argparse.Namespace, png: Path) -> dict[str, Any]:
    started = time.monotonic()
    vdir = Path(args.store) / "ads_ctr" / "v1"
    bodies, cands = protobuf_bodies(vdir, 256, args.candidates)
    configs = ["remote", "local", "serial"]
    log_dir = Path(tempfile.mkdtemp(prefix="bench_p2_"))
    result: dict[str, Any] = {"benchmark": "P2 hybrid tax", "loadavg_start": os.getloadavg(),
                              "cpu_count": os.cpu_count(), "candidates_per_request": cands,
                              "body": "protobuf (application/x-protobuf)",
                              "configs": {c: CONFIG_LABELS[c] for c in configs}}
    with fleet(Path(args.store), configs, log_dir) as f:
        result["startup_s"] = time.monotonic() - started
        result["sanity"] = check_scores_agree(f, bodies[0])
        for s in f.rankers.values():  # warm every code path (first batches are slow)
            closed(s, bodies, 4, 1.0)
        # Capacity first: closed loop at concurrency 1 (service time) and 8 (saturated).
        cap: dict[str, Any] = {}
        for c in configs:
            one = closed(f.rankers[c], bodies, 1, args.capacity_s)
            many = closed(f.rankers[c], bodies, 8, args.capacity_s)
            cap[c] = {"conc1_requests_per_s": one.ok / one.wall_s,
                      "conc1_latency": percentiles(one.ok_latencies()),
                      "conc8_requests_per_s": many.ok / many.wall_s,
                      "conc8_latency": percentiles(many.ok_latencies()),
                      "loadavg": os.getloadavg()}
        # The slowest config's one-at-a-time service rate is a lower bound on its capacity
        # (batching only raises it): offer a fraction of that, so every config idles most
        # of the time and latency, not queueing, is what gets compared.
        service_rate = min(v["conc1_requests_per_s"] for v in cap.values())
        rate = args.rate or args.load_fraction * service_rate
        result["capacity"] = cap
        result["rate"] = {
            "requests_per_s": rate, "candidates_per_s": rate * cands,
            "arrivals": "Poisson, same seeded schedule for every config within a round",
            "chosen_as": f"{args.load_fraction} x the lowest one-at-a-time service rate"
                         if not args.rate else "given with --rate",
            "utilization_vs_one_at_a_time_service_rate": {
                c: rate / v["conc1_requests_per_s"] for c, v in cap.items()},
            "fraction_of_saturated_capacity_conc8": {
                c: rate / v["conc8_requests_per_s"] for c, v in cap.items()}}
        before = {c: scrape(s) for c, s in f.rankers.items()}
        procs = f.pids()
        cpu_by: dict[str, dict[str, float]] = {c: dict.fromkeys(procs, 0.0) for c in configs}
        sent: dict[str, int] = dict.fromkeys(configs, 0)
        rounds: list[dict[str, Any]] = []
        lat: dict[str, list[float]] = {c: [] for c in configs}
        svc: dict[str, list[float]] = {c: [] for c in configs}
        lag: dict[str, list[float]] = {c: [] for c in configs}
        budget = args.budget_s - (time.monotonic() - started) - 30
        per_round = len(configs) * (args.round_s + 0.5)
        n_rounds = max(1, min(args.rounds, int(budget // per_round)))
        for r in range(n_rounds):
            offsets = schedule(rate, args.round_s, seed=1000 + r)
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            row: dict[str, Any] = {"round": r, "order": order, "loadavg": os.getloadavg(),
                                   "requests": int(offsets.size)}
            for c in order:
                cpu0 = {k: cpu_seconds(p) for k, p in procs.items()}
                res = asyncio.run(_open(f.rankers[c], bodies, offsets))
                for k, p in procs.items():
                    cpu_by[c][k] += cpu_seconds(p) - cpu0[k]
                sent[c] += len(res.status)
                ok = res.ok_latencies()
                lat[c] += ok.tolist()
                svc[c] += [v for v, s in zip(res.service_s, res.status, strict=True) if s == 200]
                lag[c] += res.send_lag_s
                row[c] = {**percentiles(ok), "errors": len(res.status) - res.ok}
            row["p50_ratio_remote_local"] = row["remote"]["p50_ms"] / row["local"]["p50_ms"]
            row["p99_ratio_remote_local"] = row["remote"]["p99_ms"] / row["local"]["p99_ms"]
            rounds.append(row)
        result["rounds"] = rounds
        result["rounds_planned"], result["round_s"] = args.rounds, args.round_s
        after = {c: scrape(s) for c, s in f.rankers.items()}
        result["server_side"] = {c: server_side(before[c], after[c]) for c in configs}
        result["in_process_pipeline_ab"] = pipeline_overlap_ab(
            [f.shards["shard0"], f.shards["shard1"]], vdir, bodies[0])
        result["cpu_ms_per_request"] = {
            c: {k: v / max(sent[c], 1) * 1000 for k, v in cpu_by[c].items() if v > 0}
            for c in configs}
    shutil.rmtree(log_dir, ignore_errors=True)
    arr = {c: np.asarray(v) for c, v in lat.items()}
    rng = np.random.default_rng(0)
    result["latency"] = {c: {**percentiles(arr[c]), "n": int(arr[c].size),
                             "service_from_actual_send": percentiles(svc[c]),
                             "send_lag": percentiles(lag[c])} for c in configs}
    ratios: dict[str, Any] = {}
    for a, b in (("remote", "local"), ("serial", "remote"), ("serial", "local")):
        la, lb = result["latency"][a], result["latency"][b]
        ratios[f"{a}/{b}"] = {
            "p50": la["p50_ms"] / lb["p50_ms"], "p99": la["p99_ms"] / lb["p99_ms"],
            "p50_ci95": _ratio_ci(arr[a], arr[b], 50, rng),
            "p99_ci95": _ratio_ci(arr[a], arr[b], 99, rng),
            "p50_delta_ms": la["p50_ms"] - lb["p50_ms"],
            "per_round_p50": [r[a]["p50_ms"] / r[b]["p50_ms"] for r in rounds],
            "per_round_p99": [r[a]["p99_ms"] / r[b]["p99_ms"] for r in rounds]}
        ratios[f"{a}/{b}"]["median_of_round_ratios"] = {
            "p50": float(np.median(ratios[f"{a}/{b}"]["per_round_p50"])),
            "p99": float(np.median(ratios[f"{a}/{b}"]["per_round_p99"]))}
    result["ratios"] = ratios
    hyb = ratios["remote/local"]
    med = hyb["median_of_round_ratios"]
    # Met only if both the pooled ratio and the median of the per-round ratios meet it: one
    # burst of someone else's load in one round can swing a pooled p99 either way.
    result["verdict"] = {
        "p50_ratio": hyb["p50"], "p50_target": P2_TARGETS["p50_ratio"],
        "p50_ratio_median_of_rounds": med["p50"],
        "p50_met": max(hyb["p50"], med["p50"]) <= P2_TARGETS["p50_ratio"],
        "p99_ratio": hyb["p99"], "p99_target": P2_TARGETS["p99_ratio"],
        "p99_ratio_median_of_rounds": med["p99"],
        "p99_met": max(hyb["p99"], med["p99"]) <= P2_TARGETS["p99_ratio"],
        "serial_over_remote_p50": ratios["serial/remote"]["p50"],
        "serial_over_remote_p50_ci95": ratios["serial/remote"]["p50_ci95"],
        "serial_measurably_slower_p50": ratios["serial/remote"]["p50_ci95"][0] > 1.0,
    }
    result["overlap_window"] = {
        **stage_window_us(vdir, bodies[0]),
        "remote_lookup_ms_mean": result["server_side"]["remote"]["lookup_ms"],
        "serial_lookup_ms_mean": result["server_side"]["serial"]["lookup_ms"],
        "note": ("with overlap, stage_inputs (dense matrix + candidate->user index to the device) "
                 "runs on the staging thread while the lookups fly; --debug-serial-lookups runs "
                 "it after they land. The most the overlap can save per batch is "
                 "min(stage time incl. thread hop, lookup time)."),
    }
    result["loadavg_end"] = os.getloadavg()
    result["duration_s"] = time.monotonic() - started
    plot_p2(png, result, lat)
    return result


def plot_p2(path: Path, result: dict[str, Any], lat: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for c, v in lat.items():
        a = np.sort(np.asarray(v)) * 1000
        ax1.plot(a, np.arange(1, a.size + 1) / a.size, label=f"{c}: {CONFIG_LABELS[c]}")
    ax1.set_xscale("log")
    ax1.set_xlabel("latency from scheduled send (ms)")
    ax1.set_ylabel("fraction of requests")
    rate = result["rate"]
    ax1.set_title(f"P2 latency CDF at {rate['requests_per_s']:.0f} req/s "
                  f"({rate['candidates_per_s']:.0f} cand/s), 200 cand/request", fontsize=9)
    ax1.axhline(0.5, color="gray", lw=0.5)
    ax1.axhline(0.99, color="gray", lw=0.5)
    ax1.legend(fontsize=7)
    ax1.grid(True, which="both", alpha=0.3)
    rounds = result["rounds"]
    x = np.arange(len(rounds))
    for c, mk in zip(lat, "os^", strict=False):
        ax2.plot(x, [r[c]["p50_ms"] for r in rounds], mk + "-", label=f"{c} p50")
        ax2.plot(x, [r[c]["p99_ms"] for r in rounds], mk + "--", alpha=0.6, label=f"{c} p99")
    v = result["verdict"]
    ax2.set_title(f"per round; pooled remote/local p50 {v['p50_ratio']:.3f} (target <= 1.05), "
                  f"p99 {v['p99_ratio']:.3f} (<= 1.10)", fontsize=9)
    ax2.set_xlabel("round (configs interleaved, order rotated)")
    ax2.set_ylabel("ms")
    ax2.set_yscale("log")
    ax2.legend(fontsize=7, ncol=3)
    ax2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# P4


def raw_dense_forward(vdir: Path, batch: int, seconds: float = 1.5, threads: int | None = None
                      ) -> dict[str, Any]:
    """Candidates/s of the bare dense model at `batch` candidates per forward (median).

    It runs on a fresh thread, as the ranker's forward runs on its compute thread: on this
    machine torch's OpenMP forward on the *main* thread is 10-40x slower than on any other
    thread whenever the cores are contended (measured; see README_ranker.md), which would
    make the reference, and so the ratio, meaningless.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    default_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="raw-forward") as pool:
            return pool.submit(_raw_forward, vdir, batch, seconds).result()
    finally:
        torch.set_num_threads(default_threads)


def _raw_forward(vdir: Path, batch: int, seconds: float) -> dict[str, Any]:
    import torch

    from modelpack.dense import load_dense

    m = read_manifest(vdir)
    cfg = m.dense.config
    model = load_dense(vdir / m.dense.path, m.dense.architecture, cfg).eval()
    g = torch.Generator().manual_seed(0)
    sparse = torch.randn((batch, int(cfg["num_sparse"]), int(cfg["embedding_dim"])),  # type: ignore[call-overload]
                         generator=g)
    dense = torch.randn((batch, int(cfg["num_dense"])), generator=g)  # type: ignore[call-overload]
    with torch.inference_mode():
        for _ in range(3):
            model(sparse, dense)
        times = []
        cpu0 = time.process_time()  # this process does nothing else meanwhile
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            model(sparse, dense)
            times.append(time.perf_counter() - t0)
        cpu = time.process_time() - cpu0
    t = np.asarray(times)
    return {"batch": batch, "forwards": int(t.size), "median_ms": float(np.median(t) * 1000),
            "mean_ms": float(t.mean() * 1000), "candidates_per_s": batch / float(np.median(t)),
            "cpu_ms_per_1k_candidates": cpu / (t.size * batch) * 1e6,
            "torch_threads": torch.get_num_threads()}


# Leaf frames where a thread only waits (py-spy's idle detection misses these).
_IDLE_LEAVES = ("_worker (concurrent/futures/thread.py", "Thread.run (threading.py",
                "EpollSelector.select (selectors.py", "Condition.wait (threading.py",
                "Event.wait (threading.py")
# Where a sample's time goes: the first category (in this order) any of its frames matches.
_CATEGORIES = (
    ("dequantize + pool + dense forward (compute thread)", ("forward (ranker_server/pipeline.py",)),
    ("stage dense inputs (stage thread)", ("stage_inputs (ranker_server/pipeline.py",)),
    ("protobuf decode + validate (codec)", ("(ranker_server/codec.py",)),
    ("hash IDs / plan rows / merge", ("plan_lookups (", "merge_requests (")),
    ("gRPC lookup client", ("(embedding_server/client.py", "(grpc/", "(ranker_server/sources.py")),
    ("batcher + pipeline glue", ("(ranker_server/batcher.py", "(ranker_server/pipeline.py")),
    ("metrics", ("(prometheus_client/",)),
    ("rank handler (api.py, own lines)", ("rank (ranker_server/api.py",)),
    ("HTTP server + ASGI framework (uvicorn, h11, starlette, fastapi)",
     ("(uvicorn/", "(h11/", "(starlette/", "(fastapi/")),
    ("asyncio event loop", ("(asyncio/",)),
)


def categorize(frames: Sequence[str]) -> str:
    if frames[-1].startswith(_IDLE_LEAVES):
        return "idle (waiting for work)"
    for name, needles in _CATEGORIES:
        if any(n in fr for fr in frames for n in needles):
            return name
    return "other"


def pyspy_top(pid: int, seconds: float, svg: Path) -> dict[str, Any]:
    """Sample `pid` with py-spy (raw collapsed stacks, per thread); top frames by self and
    inclusive share of the samples. Also writes a flame graph to `svg`."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    raw = svg.with_suffix(".txt")
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100",
           "--threads", "--format", "raw", "--output", str(raw)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if proc.returncode != 0 or not raw.exists():
        return {"error": f"py-spy failed ({proc.returncode}): {proc.stderr[-800:]}"}
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    cats: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        frames = stack.split(";")
        total += count
        threads[frames[0]] += count
        cats[categorize(frames[1:])] += count
        self_c[frames[-1]] += count
        for fr in set(frames[1:]):
            incl[fr] += count
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # the flame graph is a bonus
        subprocess.run([exe, "record", "--pid", str(pid), "--duration", "3", "--rate", "100",
                        "--output", str(svg)], capture_output=True, timeout=60)

    def top(c: collections.Counter[str], k: int = 20) -> list[dict[str, Any]]:
        return [{"frame": f, "share": n / total} for f, n in c.most_common(k)]

    busy = total - cats["idle (waiting for work)"]
    return {"samples": total, "rate_hz": 100, "seconds": seconds,
            "categories": top(cats, 20),
            "categories_share_of_busy": {k: n / busy for k, n in cats.most_common()
                                         if not k.startswith("idle")},
            "threads": top(threads, 8), "top_self": top(self_c, 25), "top_inclusive": top(incl, 40),
            "flamegraph_svg": str(svg), "raw_stacks": str(raw)}


def p4_window(s: ServerProcess, procs: dict[str, int], bodies: Sequence[bytes], cands: int,
              args: argparse.Namespace, vdir: Path, cycle: int) -> dict[str, Any]:
    """One closed-loop window on ranker `s`, then the raw forward at the batch it formed."""
    before, t_cpu, load0 = scrape(s), {k: cpu_seconds(p) for k, p in procs.items()}, os.getloadavg()
    res = closed(s, bodies, args.concurrency, args.window_s)
    after = scrape(s)
    cpu = {k: cpu_seconds(p) - t_cpu[k] for k, p in procs.items()}
    side = server_side(before, after)
    batch = max(1, round(side["mean_batch_candidates"]))
    # With one and two torch threads: the reference is the faster, i.e. the best the bare
    # model does on this machine right now.
    raw = {str(t): raw_dense_forward(vdir, batch, seconds=args.raw_s, threads=t) for t in (1, 2)}
    best = max(r["candidates_per_s"] for r in raw.values())
    cps = res.ok * cands / res.wall_s
    dev = side["mean_batch_candidates"] / (side["device_forward_ms"] / 1000)
    return {"cycle": cycle, "requests": res.ok, "errors": len(res.status) - res.ok,
            "wall_s": res.wall_s, "candidates_per_s": cps,
            "latency": percentiles(res.ok_latencies()), "server_side": side,
            "mean_batch_candidates": side["mean_batch_candidates"],
            "device_stage_candidates_per_s": dev, "cpu_s_per_process": cpu,
            "raw_dense_forward": raw, "raw_best_candidates_per_s": best,
            "raw_best_cpu_ms_per_1k_candidates": min(
                r["cpu_ms_per_1k_candidates"] for r in raw.values()),
            "ratio_vs_raw_dense": cps / best, "loadavg_before": load0,
            "loadavg_after": os.getloadavg()}


def run_p4(args: argparse.Namespace, png: Path) -> dict[str, Any]:
    started = time.monotonic()
    vdir = Path(args.store) / "ads_ctr" / "v1"
    bodies, cands = protobuf_bodies(vdir, 256, args.candidates)
    configs = ["remote", "local", "remote_1thread"]
    log_dir = Path(tempfile.mkdtemp(prefix="bench_p4_"))
    result: dict[str, Any] = {"benchmark": "P4 serving tax", "loadavg_start": os.getloadavg(),
                              "cpu_count": os.cpu_count(), "candidates_per_request": cands,
                              "concurrency": args.concurrency, "body": "protobuf",
                              "configs": {c: CONFIG_LABELS[c] for c in configs}}
    windows: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    with fleet(Path(args.store), configs, log_dir) as f:
        result["startup_s"] = time.monotonic() - started
        procs = f.pids()
        for c in configs:
            closed(f.rankers[c], bodies, args.concurrency, 1.5)  # warm up
        # The shared machine drifts by multiples within a minute, so every window of end-to-end
        # load is followed at once by the raw forward at the batch size that window formed,
        # and the configs take turns.
        per_cycle = len(configs) * (args.window_s + 2 * args.raw_s + 1.5)
        left = args.budget_s - (time.monotonic() - started) - args.profile * (args.profile_s + 12)
        cycles = max(1, min(args.cycles, int(left // per_cycle)))
        result["cycles"] = cycles
        for cycle in range(cycles):
            for c in configs:
                windows[c].append(p4_window(f.rankers[c], procs, bodies, cands, args, vdir, cycle))
        if args.profile:
            pid = f.rankers["remote"].pid
            svg = Path(tempfile.gettempdir()) / "ranker_p4_profile.svg"

            async def load_and_profile() -> tuple[RunResult, dict[str, Any]]:
                pool = HttpPool("127.0.0.1", f.rankers["remote"].port)
                load = asyncio.create_task(closed_loop(
                    pool, "/v1/rank", bodies, concurrency=args.concurrency,
                    duration_s=args.profile_s + 5, content_type=PROTOBUF))
                await asyncio.sleep(0.5)
                prof = await asyncio.to_thread(pyspy_top, pid, args.profile_s, svg)
                res = await load
                await pool.close()
                return res, prof

            _, result["profile_remote_ranker"] = asyncio.run(load_and_profile())
    shutil.rmtree(log_dir, ignore_errors=True)
    e2e: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    for c in configs:
        ws = windows[c]
        wall = sum(w["wall_s"] for w in ws)
        ok = sum(w["requests"] for w in ws)
        cpu = {k: sum(w["cpu_s_per_process"][k] for w in ws) for k in procs}
        e2e[c] = {
            "candidates_per_s": ok * cands / wall, "requests": ok,
            "errors": sum(w["errors"] for w in ws), "wall_s": wall,
            "mean_batch_candidates": float(np.mean([w["mean_batch_candidates"] for w in ws])),
            "ranker_device_stage_candidates_per_s": float(np.median(
                [w["device_stage_candidates_per_s"] for w in ws])),
            "cpu_ms_per_1k_candidates": {k: v / (ok * cands) * 1e6 for k, v in cpu.items()},
            "cores_busy": sum(cpu.values()) / wall,
            "ratio_vs_raw_dense": float(np.median([w["ratio_vs_raw_dense"] for w in ws])),
            "device_stage_ratio_vs_raw_dense": float(np.median(
                [w["device_stage_candidates_per_s"] / w["raw_best_candidates_per_s"] for w in ws])),
            "windows": ws}
        raw[c] = {"candidates_per_s_median_of_windows": float(np.median(
            [w["raw_best_candidates_per_s"] for w in ws])),
            "cpu_ms_per_1k_candidates_median_of_windows": float(np.median(
                [w["raw_best_cpu_ms_per_1k_candidates"] for w in ws])),
            "batch": round(e2e[c]["mean_batch_candidates"])}
        # Contention-robust view: CPU time per candidate (servers only, not the load
        # generator) vs the bare forward's. On a CPU-bound box throughput goes as its inverse.
        serving_cpu = sum(v for k, v in e2e[c]["cpu_ms_per_1k_candidates"].items() if k != "bench")
        e2e[c]["serving_cpu_ms_per_1k_candidates"] = serving_cpu
        e2e[c]["cpu_efficiency_vs_raw_dense"] = (
            raw[c]["cpu_ms_per_1k_candidates_median_of_windows"] / serving_cpu)
    result["end_to_end"] = e2e
    result["raw_dense_forward"] = raw
    result["verdict"] = {c: {"ratio_median_of_windows": e2e[c]["ratio_vs_raw_dense"],
                             "target": P4_TARGET, "met": e2e[c]["ratio_vs_raw_dense"] >= P4_TARGET,
                             "shortfall_factor": P4_TARGET / e2e[c]["ratio_vs_raw_dense"],
                             "end_to_end_candidates_per_s": e2e[c]["candidates_per_s"],
                             "raw_dense_candidates_per_s": raw[c]["candidates_per_s_median_of_windows"],
                             "cpu_efficiency_vs_raw_dense": e2e[c]["cpu_efficiency_vs_raw_dense"]}
                         for c in configs}
    result["loadavg_end"] = os.getloadavg()
    result["duration_s"] = time.monotonic() - started
    plot_p4(png, result)
    return result


def plot_p4(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e2e, raw = result["end_to_end"], result["raw_dense_forward"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1.7, 1]})
    labels, vals = [], []
    for c in e2e:
        b = raw[c]["batch"]
        labels += [f"raw\nb={b}", f"device\n{c}", f"e2e\n{c}"]
        vals += [raw[c]["candidates_per_s_median_of_windows"],
                 e2e[c]["ranker_device_stage_candidates_per_s"], e2e[c]["candidates_per_s"]]
    bars = ax1.bar(range(len(vals)), [v / 1e3 for v in vals],
                   color=["#999", "#69c", "#c63"] * len(e2e))
    for bar, v in zip(bars, vals, strict=True):
        ax1.annotate(f"{v / 1e3:.0f}k", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                     ha="center", va="bottom", fontsize=7)
    ax1.set_xticks(range(len(vals)), labels, fontsize=7, rotation=30)
    ax1.set_ylabel("thousand candidates/s")
    ax1.set_yscale("log")
    ratios = ", ".join(f"{c} {e2e[c]['ratio_vs_raw_dense']:.3f}x" for c in e2e)
    ax1.set_title(f"P4 end to end / raw dense: {ratios} (target >= 0.7x)", fontsize=9)
    procs = sorted({k for c in e2e for k in e2e[c]["cpu_ms_per_1k_candidates"]})
    bottom = np.zeros(len(e2e))
    for k in procs:
        v = np.array([e2e[c]["cpu_ms_per_1k_candidates"][k] for c in e2e])
        if v.max() < 0.05:
            continue
        ax2.bar(list(e2e), v, bottom=bottom, label=k)
        bottom += v
    ax2.set_ylabel("CPU ms per 1000 candidates")
    ax2.set_title("where the 2 cores go (per process, closed loop)", fontsize=9)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_ranker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    for name in ("p2", "p4"):
        s = sub.add_parser(name)
        s.add_argument("--store", default="demo_store", help="model store with ads_ctr/v1")
        s.add_argument("--candidates", type=int, default=200, help="candidates per request")
        s.add_argument("--out", default=None, help=f"result JSON (default results/ranker_{name}.json)")
    p2 = sub.choices["p2"]
    p2.add_argument("--rate", type=float, default=None, help="requests/s (default: measured)")
    p2.add_argument("--load-fraction", type=float, default=0.3,
                    help="rate as a fraction of the slowest config's one-at-a-time service rate")
    p2.add_argument("--rounds", type=int, default=10, help="rounds of interleaved configs")
    p2.add_argument("--round-s", type=float, default=3.0, help="seconds per config per round")
    p2.add_argument("--capacity-s", type=float, default=2.0, help="seconds per capacity probe")
    p2.add_argument("--budget-s", type=float, default=170.0,
                    help="rounds are cut to keep the whole run under this many seconds")
    p4 = sub.choices["p4"]
    p4.add_argument("--concurrency", type=int, default=32, help="closed-loop clients")
    p4.add_argument("--cycles", type=int, default=3, help="windows per config (interleaved)")
    p4.add_argument("--window-s", type=float, default=3.0, help="seconds per closed-loop window")
    p4.add_argument("--raw-s", type=float, default=0.7,
                    help="seconds per raw-forward measurement (per thread setting)")
    p4.add_argument("--budget-s", type=float, default=170.0,
                    help="windows are cut to keep the whole run under this many seconds")
    p4.add_argument("--no-profile", dest="profile", action="store_false",
                    help="skip the py-spy profile of the remote ranker")
    p4.add_argument("--profile-s", type=float, default=8.0, help="py-spy sampling seconds")
    args = p.parse_args(argv)
    if not (Path(args.store) / "ads_ctr" / "v1" / "eval.jsonl").is_file():
        print(f"bench_ranker: no demo model in {args.store!r}; build it with "
              f"`python -m modelpack demo --store {args.store}`", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the servers
    out = Path(args.out) if args.out else RESULTS / f"ranker_{args.bench}.json"
    png = out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = run_p2(args, png) if args.bench == "p2" else run_p4(args, png)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(json.dumps(result["verdict"], indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
