"""P5 on the real servers: `ranker-server --device cuda` on two CPU embedding shards, loaded
with protobuf 200-candidate requests by several load-generator processes.

    python -m loadtest.bench.gpu_servers --store demo_store            # needs a CUDA device
    python -m loadtest.bench.gpu_servers --store demo_store --device cpu --rates 50,100  # dry run

In one run (servers: loadtest.bench.fleet; load: loadtest.harness.multiload):
- parity: the demo eval set through the GPU ranker and a CPU ranker on the same shards:
  max |score difference| (<= 2e-3) and both AUCs (within 1e-3);
- cold start: the first requests to the GPU ranker once it reported ready;
- P5: open-loop steps at rising request rates; the headline is the highest offered rate
  whose p99 <= 20 ms (with >= 99 % answered 200), in candidates/s; GPU utilization
  sampled throughout; the ranker profiled with py-spy at the best rate (what limits it);
- the overlap and the hybrid tax at a moderate load: remote shards vs
  --debug-serial-lookups vs --local-tables, in interleaved rounds;
- anchors in the same run: the bare dense forward on the device at the ranker's batch
  sizes, host -> device copy bandwidth (pinned vs pageable).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.bench import gpu_anchors
from loadtest.bench.fleet import PROTOBUF, Fleet, fleet, scrape, server_side
from loadtest.bench.gpu_parity import cold_start, eval_parity, mixed_parity
from loadtest.bench.plotting import Panel
from loadtest.bench.profile import profile_ranker
from loadtest.bench.record import RESULTS, BenchRecord
from loadtest.bench.workload import protobuf_bodies, version_dir
from loadtest.harness.load import percentiles, schedule
from loadtest.harness.multiload import LoadProcs
from loadtest.harness.probes import http_ready
from loadtest.harness.process import ServerProcess

TARGET_CANDIDATES_PER_S = 1_000_000
TARGET_P99_MS = 20.0
ROW_BYTES = 20  # the demo's INT4 rows: dim 32 -> 16 bytes of nibbles + fp16 scale and bias


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.gpu_servers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=Path("demo_store"), help="store with ads_ctr/v1")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="the rankers' device (cpu: a dry run of the driver, not a P5 figure)")
    p.add_argument("--candidates", type=int, default=200, help="candidates per request")
    p.add_argument("--rates", default="250,500,1000,1500,2000,3000,4000,5000,6000",
                   help="open-loop request rates (req/s) tried in order")
    p.add_argument("--step-s", type=float, default=3.0, help="seconds per open-loop step")
    p.add_argument("--load-procs", type=int, default=6, help="load-generator processes")
    p.add_argument("--max-batch-candidates", type=int, default=8192,
                   help="the rankers' --max-batch-candidates")
    p.add_argument("--overlap-rate", type=float, default=None,
                   help="req/s of the overlap / hybrid-tax rounds (default: 40%% of the best)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved overlap rounds")
    p.add_argument("--round-s", type=float, default=3.0, help="seconds per config per round")
    p.add_argument("--eval-requests", type=int, default=4000, help="eval requests for parity")
    p.add_argument("--mixed-requests", type=int, default=1000,
                   help="requests of 1..1000 candidates for the mixed-size parity check")
    p.add_argument("--profile-s", type=float, default=5.0, help="py-spy seconds (0: none)")
    p.add_argument("--workers", default="2,4,8",
                   help="--workers values tried after the single process (empty: none)")
    p.add_argument("--log-dir", type=Path, default=None, help="keep the servers' logs here")
    p.add_argument("--out", type=Path, default=None,
                   help="result JSON (default loadtest/results/gpu_p5_servers_<device>.json)")
    return p.parse_args(argv)


def step(load: LoadProcs, s: ServerProcess, bodies: Sequence[bytes], rate: float, seconds: float,
         util: gpu_anchors.UtilSampler | None, cands: int, seed: int = 0,
         admin_port: int | None = None) -> dict[str, Any]:
    """One open-loop step on one ranker: client percentiles, server stage means, GPU use.
    `admin_port`: scrape /metrics there (a --workers ranker: every worker's samples)."""
    metrics_at = f"127.0.0.1:{admin_port or s.port}"
    offsets = schedule(rate, seconds, seed=seed)
    before, t0 = scrape(metrics_at), time.time()
    res = load.open_loop("127.0.0.1", s.port, "/v1/rank", bodies, offsets, content_type=PROTOBUF)
    t1, after = time.time(), scrape(metrics_at)
    ok = res.ok
    out: dict[str, Any] = {
        "offered_requests_per_s": rate, "offered_candidates_per_s": rate * cands,
        "requests": len(offsets), "ok": ok, "ok_share": ok / max(len(offsets), 1),
        "candidates_per_s": ok * cands / max(res.wall_s, 1e-9), **percentiles(res.ok_latencies()),
        "send_lag_p99_ms": float(np.percentile(res.send_lag_s, 99) * 1e3),
        "errors": sorted(set(res.errors))[:5], "server": server_side(before, after)}
    rows = {k: sum(after[m] - before.get(m, 0.0) for m in after
                   if m.startswith(f"ranker_lookup_rows_{k}_total")) / max(t1 - t0, 1e-9)
            for k in ("requested", "unique")}
    out["lookup_rows_per_s"] = rows
    # What crosses to the device: every requested row (INT4, expanded on the host) plus
    # the dense inputs and the candidate -> user index (~20 bytes per candidate).
    out["h2d_MB_per_s_estimate"] = (rows["requested"] * ROW_BYTES
                                    + out["candidates_per_s"] * 20) / 1e6
    if util is not None:
        out["gpu"] = util.between(t0, t1)
    return out


def good(x: dict[str, Any]) -> bool:
    return bool(x["p99_ms"] <= TARGET_P99_MS and x["ok_share"] >= 0.99)


def p5_steps(load: LoadProcs, s: ServerProcess, bodies: Sequence[bytes], args: argparse.Namespace,
             util: gpu_anchors.UtilSampler | None, admin_port: int | None = None
             ) -> list[dict[str, Any]]:
    """Rising rates until two steps in a row miss the p99 target (or all are done)."""
    steps: list[dict[str, Any]] = []
    misses = 0
    for i, rate in enumerate(float(r) for r in args.rates.split(",")):
        steps.append(step(load, s, bodies, rate, args.step_s, util, args.candidates, seed=i,
                          admin_port=admin_port))
        x = steps[-1]
        print(f"  {s.name} {rate:7.0f} req/s: p50 {x['p50_ms']:7.2f} p99 {x['p99_ms']:8.2f} ms "
              f"ok {x['ok_share']:.3f} {x['candidates_per_s']:>10,.0f} cand/s "
              f"batch {x['server']['mean_batch_candidates']:.0f} "
              f"gpu {x.get('gpu', {}).get('gpu_util_pct')}", flush=True)
        misses = 0 if good(x) else misses + 1
        if misses == 2:
            break
    return steps


def best_rate(steps: list[dict[str, Any]]) -> float:
    return max((x["offered_requests_per_s"] for x in steps if good(x)), default=0.0)


def overlap_rounds(load: LoadProcs, f: Fleet, bodies: Sequence[bytes], rate: float,
                   args: argparse.Namespace) -> dict[str, Any]:
    """remote vs serial vs local at one rate, interleaved; latencies pooled over rounds."""
    configs = ["remote", "serial", "local"]
    per: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for c in configs:
            per[c].append(step(load, f.rankers[c], bodies, rate, args.round_s, None,
                               args.candidates, seed=100 + r))
    out: dict[str, Any] = {"rate_requests_per_s": rate, "rounds": args.rounds}
    for c in configs:
        out[c] = {k: float(np.median([x[k] for x in per[c]]))
                  for k in ("p50_ms", "p99_ms", "ok_share")}
        out[c]["server_lookup_ms"] = float(np.median([x["server"]["lookup_ms"] for x in per[c]]))
        out[c]["server_forward_ms"] = float(np.median([x["server"]["device_forward_ms"]
                                                       for x in per[c]]))
    for q in ("p50_ms", "p99_ms"):
        out[f"serial_over_overlapped_{q}"] = out["serial"][q] / out["remote"][q]
        out[f"remote_over_local_{q}"] = out["remote"][q] / out["local"][q]
    return out


def profile_at(load: LoadProcs, s: ServerProcess, bodies: Sequence[bytes], rate: float,
               seconds: float, raw: Path) -> dict[str, Any]:
    """py-spy the ranker while an open-loop run at `rate` keeps it busy."""
    t = threading.Thread(target=load.open_loop, args=("127.0.0.1", s.port, "/v1/rank", bodies,
                                                      schedule(rate, seconds + 2)),
                         kwargs={"content_type": PROTOBUF}, daemon=True)
    t.start()
    time.sleep(0.5)
    try:
        return profile_ranker(s.pid, seconds, raw)
    finally:
        t.join()


def group_steps(load: LoadProcs, f: Fleet, bodies: Sequence[bytes], args: argparse.Namespace,
                util: gpu_anchors.UtilSampler | None, workers: int, log_dir: Path
                ) -> dict[str, Any]:
    """P5 steps on one ranker of `workers` processes (--workers) on the same shards."""
    token = log_dir / "group.token"
    token.write_text("bench")
    shards = ",".join(f.shards[f"shard{k}"].address for k in range(2))
    g = ServerProcess.module(
        "ranker_server", "--store", str(args.store), "--model", "ads_ctr", "--version", "v1",
        "--device", args.device, "--embedding-shards", shards, "--workers", str(workers),
        "--admin-port", "0", "--admin-token-file", str(token), "--log-level", "warning",
        "--max-batch-candidates", str(args.max_batch_candidates), log_dir=log_dir,
        name=f"ranker_group{workers}",
        ready=lambda s: http_ready(f"127.0.0.1:{s.admin_port}"))
    try:
        g.start().wait_ready(timeout=180)
        out: dict[str, Any] = {"workers": workers, "startup_s": round(g.ready_s, 2)}
        out["steps"] = p5_steps(load, g, bodies, args, util, admin_port=g.admin_port)
        out["best_requests_per_s"] = best_rate(out["steps"])
        out["best_candidates_per_s"] = out["best_requests_per_s"] * args.candidates
        return out
    except Exception as e:  # a failed group run is recorded, the rest of the run goes on
        return {"workers": workers, "error": f"{type(e).__name__}: {e}", "log": g.log_tail(3000)}
    finally:
        g.stop()


def measure(args: argparse.Namespace, vdir: Path, out: dict[str, Any]) -> None:
    """Fills `out` step by step, so a run cut short still leaves what it measured."""
    bodies = protobuf_bodies(vdir, 256, args.candidates)
    out["candidates"] = args.candidates
    configs = ["remote", "local", "serial", "remote_cpu"]
    cuda = args.device == "cuda"
    with LoadProcs(args.load_procs) as load, \
            fleet(args.store, configs, device=args.device, log_dir=args.log_dir,
                  ranker_args=["--max-batch-candidates", str(args.max_batch_candidates)]) as f, \
            (gpu_anchors.UtilSampler() if cuda else _Null()) as util:
        out["startup_s"] = {n: round(s.ready_s, 2) for n, s in {**f.shards, **f.rankers}.items()}
        out["cold_start"] = cold_start(f.rankers["remote"], bodies)
        print(f"cold start: {json.dumps(out['cold_start'])}", flush=True)
        out["parity"] = eval_parity(f, vdir, args.eval_requests)
        out["parity_mixed_sizes"] = mixed_parity(f, vdir, args.mixed_requests)
        print(f"parity: {json.dumps(out['parity'])} {json.dumps(out['parity_mixed_sizes'])}",
              flush=True)
        out["p5_single_process"] = p5_steps(load, f.rankers["remote"], bodies, args,
                                            util if cuda else None)
        best = best_rate(out["p5_single_process"])
        rate = args.overlap_rate or max(0.4 * best, float(args.rates.split(",")[0]))
        out["overlap_and_hybrid_tax"] = overlap_rounds(load, f, bodies, rate, args)
        print(f"overlap: {json.dumps(out['overlap_and_hybrid_tax'])}", flush=True)
        if args.profile_s > 0:
            raw = (args.log_dir or Path("/tmp")) / "p5_ranker_profile.txt"
            out["profile_at_best_rate"] = profile_at(load, f.rankers["remote"], bodies,
                                                     best or rate, args.profile_s, raw)
        for name in ("local", "serial", "remote_cpu"):  # the GPU's other tenants go first
            f.rankers[name].stop()
        out["p5_workers"] = [group_steps(load, f, bodies, args, util if cuda else None, n,
                                         args.log_dir or Path(tempfile.mkdtemp()))
                             for n in (int(x) for x in args.workers.split(",") if x)]
    if cuda:
        batches = sorted({200, 1000, 4096, args.max_batch_candidates, *(
            int(x["server"]["mean_batch_candidates"]) for x in out["p5_single_process"]
            if x["server"]["mean_batch_candidates"] == x["server"]["mean_batch_candidates"])})
        out["anchor_raw_forward"] = gpu_anchors.raw_forward(vdir, [b for b in batches if b > 0])
        out["h2d_bandwidth"] = gpu_anchors.h2d_bandwidth()


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def verdict(r: dict[str, Any], cands: int) -> dict[str, Any]:
    single = best_rate(r["p5_single_process"]) * cands
    per_workers = {g["workers"]: g.get("best_candidates_per_s", 0.0) for g in r["p5_workers"]}
    best = max([single, *per_workers.values()])
    return {"single_process_candidates_per_s_at_p99_le_20ms": single,
            "candidates_per_s_at_p99_le_20ms_by_workers": per_workers,
            "best_candidates_per_s_at_p99_le_20ms": best,
            "ratio_vs_target": best / TARGET_CANDIDATES_PER_S,
            "met": best >= TARGET_CANDIDATES_PER_S,
            "parity_ok": r["parity"]["ok"] and r["parity_mixed_sizes"]["ok"],
            "target": {"candidates_per_s": TARGET_CANDIDATES_PER_S, "p99_ms": TARGET_P99_MS}}


def panels(r: dict[str, Any]) -> list[Panel]:
    steps = r["p5_single_process"]
    labels = [f"{x['offered_candidates_per_s'] / 1e3:.0f}k" for x in steps]
    ov = r["overlap_and_hybrid_tax"]
    cfgs = ["remote", "serial", "local"]
    return [
        Panel("1 ranker process: latency by offered candidates/s", labels,
              {"p50 ms": [x["p50_ms"] for x in steps], "p99 ms": [x["p99_ms"] for x in steps]},
              ylabel="ms", log=True, targets={"p99 target 20 ms": TARGET_P99_MS}),
        Panel("1 ranker process: answered candidates/s", labels,
              {"candidates/s": [x["candidates_per_s"] for x in steps]}, ylabel="candidates/s",
              log=True, targets={"target 1M": TARGET_CANDIDATES_PER_S}),
        Panel(f"overlap and hybrid tax at {ov['rate_requests_per_s']:.0f} req/s", cfgs,
              {"p50 ms": [ov[c]["p50_ms"] for c in cfgs], "p99 ms": [ov[c]["p99_ms"] for c in cfgs]},
              ylabel="ms"),
        Panel("GPU utilization by step (%)", labels,
              {"gpu": [(x.get("gpu") or {}).get("gpu_util_pct") for x in steps]}, ylabel="%"),
        Panel("candidates/s at p99 <= 20 ms by ranker processes", ["1"] + [
            str(g["workers"]) for g in r["p5_workers"]],
              {"candidates/s": [best_rate(steps) * r["candidates"]] + [
                  g.get("best_candidates_per_s", 0.0) for g in r["p5_workers"]]},
              ylabel="candidates/s", targets={"target 1M": TARGET_CANDIDATES_PER_S}),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    vdir = version_dir(args.store)
    if not (vdir / "eval.jsonl").is_file():
        print(f"no demo model in {args.store}; build it with "
              f"`python -m modelpack demo --store {args.store}`", file=sys.stderr)
        return 2
    info = gpu_anchors.device_info()
    if args.device == "cuda" and not info["cuda_available"]:
        print(f"gpu_servers: skipped: torch {info['torch']} sees no CUDA device "
              "(--device cpu runs the driver on the CPU)")
        return 0
    rec = BenchRecord("P5 real servers on one device",
                      compared="ranker-server processes on the device over 2 CPU embedding "
                               "shards, open-loop protobuf load from several processes",
                      anchor=f"target {TARGET_CANDIDATES_PER_S:,} candidates/s at p99 <= "
                             f"{TARGET_P99_MS} ms; bare dense forward and H2D copies on the "
                             "device; a CPU ranker's scores",
                      device=json.dumps(info), config={k: str(v) for k, v in vars(args).items()})
    rec.results["device_info"] = info
    out = args.out or RESULTS / f"gpu_p5_servers_{args.device}.json"
    # SIGTERM (a `timeout` around the run) unwinds: servers stopped, partial results written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        measure(args, vdir, rec.results)
    finally:
        complete = "overlap_and_hybrid_tax" in rec.results and "p5_workers" in rec.results
        rec.verdict = verdict(rec.results, args.candidates) if complete else {"incomplete": True}
        rec.write(out, panels(rec.results) if complete else (),
                  title=f"P5 real servers: {info.get('gpu', 'cpu')}",
                  note=f"{args.candidates} cand/request protobuf, {args.load_procs} load procs, "
                       f"batches <= {args.max_batch_candidates}")
    print(json.dumps(rec.verdict), f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
