"""P2 hybrid tax: the ranker on remote embedding shards vs the same ranker with --local-tables.

    python -m loadtest.bench.hybrid_tax --store demo_store
    python -m loadtest.bench.hybrid_tax --store demo_store --rounds 2 --round-s 1   # quick

The same offered load, open loop (Poisson arrivals at a fixed rate, send times fixed in
advance, latency from the scheduled send), to a ranker on two remote shards (A), the same
ranker with --local-tables (B), and A with --debug-serial-lookups (C). All three run side
by side (loadtest/bench/fleet.py) and take turns in rounds (A B C, B C A, C A B, ...), each
round replaying the same schedule and bodies, so drift on the shared machine hits all
three alike. The rate is a fraction (default 0.3) of the slowest config's one-at-a-time
service rate. Then the ranker's own Pipeline runs in this process against the same
shards, overlapped and serial lookups alternating batch by batch. Targets: remote/local
p50 <= 1.05x, p99 <= 1.10x. Result: loadtest/results/ranker_p2.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from loadtest.bench.fleet import (
    Fleet,
    check_scores_agree,
    closed,
    fleet,
    open_,
    parser,
    prepare,
    scrape,
    server_side,
)
from loadtest.bench.pipeline_load import Recorder, loaded_version
from loadtest.bench.plotting import Panel
from loadtest.harness.load import percentiles, schedule
from loadtest.harness.procfs import cpu_seconds
from ranker_server import codec
from ranker_server.device import Device
from ranker_server.pipeline import Pipeline, merge_requests, plan_lookups, stage_inputs
from ranker_server.remote_tables import RemoteTables

TARGETS = {"p50_ratio": 1.05, "p99_ratio": 1.10}
CONFIGS = ["remote", "local", "serial"]


def ratio_ci(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64], q: float,
             rng: np.random.Generator, n: int = 400) -> tuple[float, float]:
    """Bootstrap 95% interval of percentile_q(a) / percentile_q(b)."""
    ra = np.percentile(rng.choice(a, (n, a.size)), q, axis=1)
    rb = np.percentile(rng.choice(b, (n, b.size)), q, axis=1)
    lo, hi = np.percentile(ra / rb, [2.5, 97.5])
    return float(lo), float(hi)


def stage_window_us(vdir: Path, body: bytes) -> dict[str, float]:
    """What the overlap window holds on this machine: the ranker's own stage_inputs for one
    request, called directly and through the Device's staging thread."""
    dev = Device("cpu")
    lv = loaded_version(vdir, dev)
    decoded = codec.decode(codec.parse_body(body, "protobuf"), lv.schema, 1000)
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
    t0 = time.perf_counter()  # for scale: the work before the lookups fire (not overlappable)
    for _ in range(200):
        plan_lookups(lv, merge_requests(lv.schema, [decoded]))
    plan = (time.perf_counter() - t0) / 200
    dev.close()
    return {"stage_inputs_direct_us": direct * 1e6, "stage_inputs_via_thread_us": via_thread * 1e6,
            "plan_lookups_us": plan * 1e6}


def pipeline_overlap_ab(f: Fleet, vdir: Path, body: bytes, n: int = 300) -> dict[str, Any]:
    """The ranker's own Pipeline.run against the running shards, in this process, without
    HTTP or batcher: overlapped and serial lookups alternate batch by batch (one request
    per batch), so both see the same machine at the same moments."""
    async def run() -> dict[str, list[float]]:
        source = RemoteTables([[f.shards[f"shard{k}"].address] for k in range(2)], 5.0)
        dev = Device("cpu")
        lv = loaded_version(vdir, dev)
        decoded = codec.decode(codec.parse_body(body, "protobuf"), lv.schema, 1000)
        pipes = {"overlapped": Pipeline(dev, source, Recorder()),
                 "serial": Pipeline(dev, source, Recorder(), serial_lookups=True)}
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
    return {"batches_each": n, "serial": percentiles(a), "overlapped": percentiles(b),
            "serial_over_overlapped_p50": float(np.median(a) / np.median(b)),
            "serial_over_overlapped_p50_ci95": ratio_ci(a, b, 50, np.random.default_rng(1)),
            "median_paired_difference_us": float(np.median(a - b) * 1e6)}


def capacity(f: Fleet, bodies: Sequence[bytes], seconds: float) -> dict[str, Any]:
    """Closed loop at concurrency 1 (service time) and 8 (saturated), per config."""
    cap: dict[str, Any] = {}
    for c, s in f.rankers.items():
        one, many = closed(s, bodies, 1, seconds), closed(s, bodies, 8, seconds)
        cap[c] = {"conc1_requests_per_s": one.ok / one.wall_s,
                  "conc1_latency": percentiles(one.ok_latencies()),
                  "conc8_requests_per_s": many.ok / many.wall_s,
                  "conc8_latency": percentiles(many.ok_latencies()), "loadavg": os.getloadavg()}
    return cap


def rounds(f: Fleet, bodies: Sequence[bytes], rate: float, n_rounds: int, round_s: float
           ) -> tuple[list[dict[str, Any]], dict[str, list[float]], dict[str, Any]]:
    """Interleaved open-loop rounds; per round rows, pooled latencies, CPU/request and lags."""
    procs = f.pids()
    cpu_by: dict[str, dict[str, float]] = {c: dict.fromkeys(procs, 0.0) for c in CONFIGS}
    sent = dict.fromkeys(CONFIGS, 0)
    rows: list[dict[str, Any]] = []
    lat: dict[str, list[float]] = {c: [] for c in CONFIGS}
    svc: dict[str, list[float]] = {c: [] for c in CONFIGS}
    lag: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for r in range(n_rounds):
        offsets = schedule(rate, round_s, seed=1000 + r)
        order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
        row: dict[str, Any] = {"round": r, "order": order, "loadavg": os.getloadavg(),
                               "requests": int(offsets.size)}
        for c in order:
            cpu0 = {k: cpu_seconds(p) for k, p in procs.items()}
            res = open_(f.rankers[c], bodies, offsets)
            for k, p in procs.items():
                cpu_by[c][k] += cpu_seconds(p) - cpu0[k]
            sent[c] += len(res.status)
            lat[c] += res.ok_latencies().tolist()
            svc[c] += [v for v, s in zip(res.service_s, res.status, strict=True) if s == 200]
            lag[c] += res.send_lag_s
            row[c] = {**percentiles(res.ok_latencies()), "errors": len(res.status) - res.ok}
        for q in ("p50", "p99"):
            row[f"{q}_ratio_remote_local"] = row["remote"][f"{q}_ms"] / row["local"][f"{q}_ms"]
        rows.append(row)
    extra = {"cpu_ms_per_request": {c: {k: v / max(sent[c], 1) * 1000 for k, v in cpu_by[c].items()
                                        if v > 0} for c in CONFIGS},
             "service_from_actual_send": {c: percentiles(svc[c]) for c in CONFIGS},
             "send_lag": {c: percentiles(lag[c]) for c in CONFIGS}}
    return rows, lat, extra


def judge(result: dict[str, Any], lat: dict[str, list[float]]) -> dict[str, Any]:
    """Pooled and per-round ratios with bootstrap intervals; the verdict against the targets."""
    arr = {c: np.asarray(v) for c, v in lat.items()}
    rng = np.random.default_rng(0)
    result["latency"] = {c: {**percentiles(arr[c]), "n": int(arr[c].size)} for c in CONFIGS}
    ratios: dict[str, Any] = {}
    for a, b in (("remote", "local"), ("serial", "remote"), ("serial", "local")):
        la, lb = result["latency"][a], result["latency"][b]
        per = {q: [r[a][f"{q}_ms"] / r[b][f"{q}_ms"] for r in result["rounds"]] for q in ("p50", "p99")}
        ratios[f"{a}/{b}"] = {
            "p50": la["p50_ms"] / lb["p50_ms"], "p99": la["p99_ms"] / lb["p99_ms"],
            "p50_ci95": ratio_ci(arr[a], arr[b], 50, rng), "p99_ci95": ratio_ci(arr[a], arr[b], 99, rng),
            "p50_delta_ms": la["p50_ms"] - lb["p50_ms"],
            "per_round_p50": per["p50"], "per_round_p99": per["p99"],
            "median_of_round_ratios": {q: float(np.median(v)) for q, v in per.items()}}
    result["ratios"] = ratios
    hyb, med = ratios["remote/local"], ratios["remote/local"]["median_of_round_ratios"]
    # Met only if both the pooled ratio and the median of the per-round ratios meet it: one
    # burst of someone else's load in one round can swing a pooled p99 either way.
    return {"p50_ratio": hyb["p50"], "p50_target": TARGETS["p50_ratio"],
            "p50_ratio_median_of_rounds": med["p50"],
            "p50_met": max(hyb["p50"], med["p50"]) <= TARGETS["p50_ratio"],
            "p99_ratio": hyb["p99"], "p99_target": TARGETS["p99_ratio"],
            "p99_ratio_median_of_rounds": med["p99"],
            "p99_met": max(hyb["p99"], med["p99"]) <= TARGETS["p99_ratio"],
            "serial_over_remote_p50": ratios["serial/remote"]["p50"],
            "serial_over_remote_p50_ci95": ratios["serial/remote"]["p50_ci95"],
            "serial_measurably_slower_p50": ratios["serial/remote"]["p50_ci95"][0] > 1.0}


def panels(result: dict[str, Any]) -> list[Panel]:
    lat, rows = result["latency"], result["rounds"]
    qs = ("p50_ms", "p90_ms", "p99_ms")
    ab = result["in_process_pipeline_ab"]
    return [
        Panel(f"latency from scheduled send at {result['rate']['requests_per_s']:.0f} req/s (ms)",
              [q.removesuffix("_ms") for q in qs], {c: [lat[c][q] for q in qs] for c in CONFIGS},
              ylabel="ms", log=True),
        Panel("remote / local per round (configs interleaved)", [str(r["round"]) for r in rows],
              {"p50 ratio": [r["p50_ratio_remote_local"] for r in rows],
               "p99 ratio": [r["p99_ratio_remote_local"] for r in rows]}, ylabel="ratio",
              targets={"p50 target 1.05": TARGETS["p50_ratio"], "p99 target 1.10": TARGETS["p99_ratio"]},
              annotate=len(rows) <= 6),
        Panel("in-process Pipeline.run vs the same shards, one request per batch (ms)",
              ["p50", "p99"], {k: [ab[k]["p50_ms"], ab[k]["p99_ms"]] for k in ("overlapped", "serial")},
              ylabel="ms"),
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser("hybrid_tax", __doc__, "ranker_p2.json")
    p.add_argument("--rate", type=float, default=None, help="requests/s (default: measured)")
    p.add_argument("--load-fraction", type=float, default=0.3,
                   help="rate as a fraction of the slowest config's one-at-a-time service rate")
    p.add_argument("--rounds", type=int, default=10, help="rounds of interleaved configs")
    p.add_argument("--round-s", type=float, default=3.0, help="seconds per config per round")
    p.add_argument("--capacity-s", type=float, default=2.0, help="seconds per capacity probe")
    p.add_argument("--ab-batches", type=int, default=300, help="batches each in the in-process A/B")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    ready = prepare(args, "P2 hybrid tax", CONFIGS,
                    "local (--local-tables): same ranker, lookups without the network hop")
    if ready is None:
        return 2
    vdir, rec, bodies = ready
    res = rec.results
    with fleet(Path(args.store), CONFIGS) as f:
        res["startup_s"] = time.monotonic() - started
        res["sanity"] = check_scores_agree(f, bodies[0])
        for s in f.rankers.values():  # warm every code path (first batches are slow)
            closed(s, bodies, 4, 1.0)
        res["capacity"] = cap = capacity(f, bodies, args.capacity_s)
        # The slowest config's one-at-a-time service rate bounds its capacity from below:
        # offer a fraction of it, so latency, not queueing, is what gets compared.
        rate = args.rate or args.load_fraction * min(v["conc1_requests_per_s"] for v in cap.values())
        res["rate"] = {"requests_per_s": rate, "candidates_per_s": rate * args.candidates,
                       "utilization_vs_one_at_a_time_service_rate": {
                           c: rate / v["conc1_requests_per_s"] for c, v in cap.items()}}
        before = {c: scrape(s) for c, s in f.rankers.items()}
        budget = args.budget_s - (time.monotonic() - started) - 30
        n_rounds = max(1, min(args.rounds, int(budget // (len(CONFIGS) * (args.round_s + 0.5)))))
        res["rounds"], lat, extra = rounds(f, bodies, rate, n_rounds, args.round_s)
        res.update(extra)
        res["server_side"] = {c: server_side(before[c], scrape(s)) for c, s in f.rankers.items()}
        res["in_process_pipeline_ab"] = pipeline_overlap_ab(f, vdir, bodies[0], args.ab_batches)
    rec.verdict = judge(res, lat)
    res["overlap_window"] = {**stage_window_us(vdir, bodies[0]),
                             "remote_lookup_ms_mean": res["server_side"]["remote"]["lookup_ms"],
                             "serial_lookup_ms_mean": res["server_side"]["serial"]["lookup_ms"]}
    rec.write(args.out, panels(res), title="P2 hybrid tax: ranker on remote shards vs --local-tables",
              note=f"{args.candidates} cand/request, protobuf, open loop")
    print("\n".join(f"  {k}: {v}" for k, v in rec.verdict.items()))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
