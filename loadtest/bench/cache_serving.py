"""Issue 15's P2 and P4 with the row cache on vs off, in the same run, on day-1 traffic.

    python -m loadtest.bench.cache_serving --store demo_store
    python -m loadtest.bench.cache_serving --store demo_store --rounds 2 --round-s 2 --windows 1

Processes (loadtest/bench/fleet.py): two embedding shards over ads_ctr/v1, a ranker on
them without the cache (`remote`), a ranker on the same shards with --cache-bytes set to
`--cache-share` of the table's bytes (`cached`), and a --local-tables ranker (`local`, the
P2 anchor: no hop at all). Requests: `--candidates`-candidate requests drawn from v2's
eval set (the demo's day-1 traffic), protobuf; each config continues the stream where
its last round stopped, so the cached ranker sees the day go by rather than one replay.

- P2 (hybrid tax): one request at a time, configs interleaved in rounds; p50/p99 per
  config, the hop's share of latency ((p50 - p50 local) / p50), and CPU per request of
  the ranker and of the shards.
- P4 (serving tax's load): closed loop at `--concurrency`, remote and cached
  interleaved in windows; candidates/s and the embedding tier's CPU per ranking request
  (both shards' utime + stime / answered requests), the ranker's beside it.

The cached ranker's hit ratios come from its /metrics (ranker_cache_rows_total), read
between scrapes. Result: loadtest/results/cache_serving.{json,png}.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.bench.fleet import PROTOBUF, Fleet, check_scores_agree, closed, fleet, parser, scrape
from loadtest.bench.hybrid_tax import one_at_a_time
from loadtest.bench.plotting import Panel
from loadtest.bench.record import BenchRecord
from loadtest.bench.workload import build_requests, encode_bodies, version_dir
from loadtest.harness.load import percentiles
from loadtest.harness.probes import http_ready
from loadtest.harness.process import ServerProcess, start_all, stop_all
from loadtest.harness.procfs import cpu_seconds
from modelpack.manifest import read_manifest

CONFIGS = ("remote", "cached", "local")


class Stream:
    """Day-1 bodies, one cursor per config: each run goes on where that config stopped."""

    def __init__(self, bodies: list[bytes]) -> None:
        self.bodies = bodies
        self.at = dict.fromkeys(CONFIGS, 0)

    def next(self, config: str) -> list[bytes]:
        k = self.at[config] % len(self.bodies)
        return self.bodies[k:] + self.bodies[:k]

    def sent(self, config: str, n: int) -> None:
        self.at[config] += n


def hit_ratios(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    def d(kind: str, result: str) -> float:
        key = f"ranker_cache_rows_total{{result={result},rows={kind},version=v1}}"
        return after.get(key, 0.0) - before.get(key, 0.0)
    out = {f"{k}_hit_ratio": d(k, "hit") / max(1.0, d(k, "hit") + d(k, "miss"))
           for k in ("requested", "unique")}
    skipped = "ranker_cache_lookups_skipped_total{version=v1}"
    out["lookups_skipped"] = after.get(skipped, 0.0) - before.get(skipped, 0.0)
    return out


def measure(procs: dict[str, ServerProcess], shards: dict[str, int], stream: Stream,
            configs: Sequence[str], seconds: float, concurrency: int) -> dict[str, dict[str, Any]]:
    """One run per config in `configs` order: latency, CPU per request, hit ratios."""
    out: dict[str, dict[str, Any]] = {}
    for c in configs:
        pids = {"ranker": procs[c].pid, **({} if c == "local" else shards)}
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        m0 = scrape(procs[c]) if c == "cached" else {}
        bodies = stream.next(c)
        res = (one_at_a_time(procs[c].address, bodies, seconds, PROTOBUF) if concurrency == 1
               else closed(procs[c], bodies, concurrency, seconds))
        n = max(len(res.status), 1)
        stream.sent(c, len(res.status))
        used = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
        out[c] = {"latencies": res.ok_latencies().tolist(), "requests": len(res.status),
                  "errors": len(res.status) - res.ok, "wall_s": res.wall_s,
                  "ranker_cpu_ms_per_request": used["ranker"] / n * 1e3,
                  "shards_cpu_ms_per_request": sum(v for k, v in used.items() if k != "ranker")
                  / n * 1e3}
        if c == "cached":
            out[c].update(hit_ratios(m0, scrape(procs[c])))
    return out


def pooled(runs: list[dict[str, dict[str, Any]]], configs: Sequence[str], candidates: int
           ) -> dict[str, dict[str, Any]]:
    out = {}
    for c in configs:
        rs = [r[c] for r in runs]
        req = sum(r["requests"] for r in rs)
        lat = np.concatenate([np.asarray(r["latencies"]) for r in rs])
        out[c] = {**percentiles(lat), "requests": req, "errors": sum(r["errors"] for r in rs),
                  "candidates_per_s": req * candidates / max(1e-9, sum(r["wall_s"] for r in rs)),
                  **{k: float(np.median([r[k] for r in rs]))
                     for k in ("ranker_cpu_ms_per_request", "shards_cpu_ms_per_request")}}
        if c == "cached":
            out[c].update({k: float(np.median([r[k] for r in rs]))
                           for k in ("requested_hit_ratio", "unique_hit_ratio")})
            out[c]["lookups_skipped"] = sum(r["lookups_skipped"] for r in rs)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("cache_serving", __doc__, "cache_serving.json")
    p.add_argument("--cache-share", type=float, default=0.2,
                   help="cache size as a share of the table's bytes")
    p.add_argument("--rounds", type=int, default=4, help="P2 rounds (configs interleaved)")
    p.add_argument("--round-s", type=float, default=4.0, help="seconds per config per P2 round")
    p.add_argument("--windows", type=int, default=3, help="P4 windows per config")
    p.add_argument("--window-s", type=float, default=5.0, help="seconds per P4 window")
    p.add_argument("--concurrency", type=int, default=16, help="P4 closed-loop clients")
    p.add_argument("--warmup-s", type=float, default=3.0, help="load per config before measuring")
    args = p.parse_args(argv)
    store = Path(args.store)
    v1, v2 = version_dir(store, "v1"), version_dir(store, "v2")
    if not (v2 / "eval.jsonl").is_file():
        print(f"no demo model in {store}; build it with `python -m modelpack demo --store {store}`",
              file=sys.stderr)
        return 1
    bodies = encode_bodies(v1, build_requests(v2 / "eval.jsonl", 2000, args.candidates, seed=1),
                           "protobuf")
    table_bytes = sum(t.rows * t.row_bytes for t in read_manifest(v1).tables)
    cache_bytes = int(args.cache_share * table_bytes)
    rec = BenchRecord("cache_serving", compared="ranker + 2 remote shards with the row cache "
                      f"({cache_bytes} bytes, {args.cache_share:.0%} of the table) vs without, "
                      "vs --local-tables", anchor="the same ranker without the cache (and "
                      "--local-tables for the hop's share)", device="cpu",
                      config={k: str(v) for k, v in vars(args).items()})
    stream = Stream(bodies)
    with fleet(store, ["remote", "local"]) as f:
        procs = {**f.rankers, "cached": _cached_ranker(f, store, cache_bytes)}
        try:
            rec.results["parity"] = check_scores_agree(
                Fleet(f.shards, {c: procs[c] for c in ("remote", "cached")}), bodies[0])
            shards = {k: s.pid for k, s in f.shards.items()}
            measure(procs, shards, stream, CONFIGS, args.warmup_s, 1)
            p2 = [measure(procs, shards, stream, CONFIGS[r % 3:] + CONFIGS[:r % 3],
                          args.round_s, 1) for r in range(args.rounds)]
            p4 = [measure(procs, shards, stream, ("remote", "cached")[w % 2:] +
                          ("remote", "cached")[:w % 2], args.window_s, args.concurrency)
                  for w in range(args.windows)]
            rec.results["cache_after"] = {k: v for k, v in scrape(procs["cached"]).items()
                                          if k.startswith("ranker_cache_")}
        finally:
            stop_all([procs["cached"]])
    res2, res4 = pooled(p2, CONFIGS, args.candidates), pooled(p4, ("remote", "cached"),
                                                               args.candidates)
    rec.results.update({"p2": res2, "p4": res4, "bodies": len(bodies),
                        "p2_rounds": [{c: {k: v for k, v in r[c].items() if k != "latencies"}
                                       for c in r} for r in p2]})
    share = {c: (res2[c]["p50_ms"] - res2["local"]["p50_ms"]) / res2[c]["p50_ms"]
             for c in ("remote", "cached")}
    rec.verdict = {
        "p2_p50_ms": {c: round(res2[c]["p50_ms"], 3) for c in CONFIGS},
        "p2_p50_ratio_vs_local": {c: round(res2[c]["p50_ms"] / res2["local"]["p50_ms"], 3)
                                  for c in ("remote", "cached")},
        "p2_hop_share_of_latency": {c: round(v, 3) for c, v in share.items()},
        "p2_cached_over_uncached_p50": round(res2["cached"]["p50_ms"] / res2["remote"]["p50_ms"], 3),
        "p4_shards_cpu_ms_per_request": {c: round(res4[c]["shards_cpu_ms_per_request"], 3)
                                         for c in ("remote", "cached")},
        "p4_shards_cpu_cached_over_uncached": round(
            res4["cached"]["shards_cpu_ms_per_request"]
            / max(1e-9, res4["remote"]["shards_cpu_ms_per_request"]), 3),
        "p4_candidates_per_s": {c: round(res4[c]["candidates_per_s"]) for c in ("remote", "cached")},
        "p4_ranker_cpu_ms_per_request": {c: round(res4[c]["ranker_cpu_ms_per_request"], 3)
                                         for c in ("remote", "cached")},
        "hit_ratio_unique_p2_p4": [round(res2["cached"]["unique_hit_ratio"], 3),
                                   round(res4["cached"]["unique_hit_ratio"], 3)],
        "errors": sum(r["errors"] for r in (*res2.values(), *res4.values())),
    }
    qs = ("p50_ms", "p90_ms", "p99_ms")
    rec.write(args.out, [
        Panel("P2: one request at a time (ms)", [q.removesuffix("_ms") for q in qs],
              {c: [res2[c][q] for q in qs] for c in CONFIGS}, ylabel="ms"),
        Panel("P2: the hop's share of p50 latency", ["remote", "cached"],
              {"hop share": [share["remote"], share["cached"]]}, ylabel="share"),
        Panel(f"P4: CPU per ranking request, closed loop x{args.concurrency} (ms)",
              ["remote", "cached"],
              {"embedding shards": [res4[c]["shards_cpu_ms_per_request"] for c in ("remote", "cached")],
               "ranker": [res4[c]["ranker_cpu_ms_per_request"] for c in ("remote", "cached")]},
              ylabel="ms"),
        Panel("P4: candidates/s", ["remote", "cached"],
              {"candidates/s": [res4[c]["candidates_per_s"] for c in ("remote", "cached")]},
              ylabel="candidates/s"),
    ], title=f"Row cache on vs off ({args.cache_share:.0%} of the table), day-1 traffic",
        note=f"unique hit ratio P2 {res2['cached']['unique_hit_ratio']:.2f}, "
             f"P4 {res4['cached']['unique_hit_ratio']:.2f}")
    print(rec.verdict)
    return 0


def _cached_ranker(f: Fleet, store: Path, cache_bytes: int) -> ServerProcess:
    """A ranker like the fleet's `remote`, on the same shards, with the row cache."""
    log_dir = f.rankers["remote"].log_path.parent  # the fleet's: removed with it
    (s,) = start_all([ServerProcess.module(
        "ranker_server", "--store", str(store), "--model", "ads_ctr", "--version", "v1",
        "--device", "cpu", "--log-level", "warning",
        "--embedding-shards", ",".join(f.shards[f"shard{k}"].address for k in range(2)),
        "--cache-bytes", str(cache_bytes), log_dir=log_dir, name="ranker_cached",
        ready=http_ready)])
    return s


if __name__ == "__main__":
    raise SystemExit(main())
