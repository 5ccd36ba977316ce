"""P2 hybrid tax: a ranker on two remote embedding shards vs the same ranker with --local-tables.

    python -m loadtest.bench.hybrid_tax --store demo_store
    python -m loadtest.bench.hybrid_tax --store demo_store --rounds 2 --round-s 1 --hop-rounds 2   # quick

One request at a time (closed loop, concurrency 1), 200-candidate requests (JSON, as the
issue measured; --body protobuf), to a ranker on two remote shards (remote) and the same
ranker with --local-tables (local), both running side by side (loadtest/bench/fleet.py)
and taking turns in rounds (remote local, local remote, ...), so drift on the shared
machine hits both alike. Per config: latency p50/p99 and CPU per request of every server
process it uses (ranker + both shards, or the ranker alone), read from /proc.

Then, in this process against the same shards, the hop itself: RemoteTables.lookup of
the same requests' queries over the stream and the unary transport, next to the floor
for the same bytes (a bare grpcio stream per shard: loadtest/bench/hop_floor.py). Last,
py-spy on the remote ranker and on one shard under the same load: where the rest goes.

Targets (issue 10): remote/local p50 <= 1.2, CPU per request <= 1.3.
Result: loadtest/results/ranker_p2.{json,png}.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.bench import hop_floor
from loadtest.bench.fleet import (
    Fleet,
    check_scores_agree,
    fleet,
    parser,
    prepare,
    scrape,
    server_side,
)
from loadtest.bench.pipeline_load import loaded_version
from loadtest.bench.plotting import Panel
from loadtest.bench.profile import profile_ranker, profile_server
from loadtest.bench.workload import build_requests, encode_bodies
from loadtest.harness.load import HttpPool, RunResult, closed_loop, percentiles
from loadtest.harness.procfs import cpu_seconds
from ranker_server import codec
from ranker_server.device import Device
from ranker_server.pipeline import plan_lookups

TARGETS = {"p50_ratio": 1.2, "cpu_ratio": 1.3}
CONFIGS = ["remote", "local"]
CONTENT_TYPES = {"json": "application/json", "protobuf": "application/x-protobuf"}


def one_at_a_time(address: str, bodies: Sequence[bytes], seconds: float, content_type: str
                  ) -> RunResult:
    """Closed loop, one request in flight, for `seconds`."""
    host, port = address.rsplit(":", 1)

    async def run() -> RunResult:
        pool = HttpPool(host, int(port))
        try:
            return await closed_loop(pool, "/v1/rank", bodies, concurrency=1,
                                     duration_s=seconds, content_type=content_type)
        finally:
            await pool.close()

    return asyncio.run(run())


def config_pids(f: Fleet, config: str) -> dict[str, int]:
    """The server processes a config's requests use."""
    pids = {f"ranker_{config}": f.rankers[config].pid}
    if config == "remote":
        pids.update({k: s.pid for k, s in f.shards.items()})
    return pids


def rounds(f: Fleet, bodies: Sequence[bytes], content_type: str, n_rounds: int, round_s: float
           ) -> tuple[list[dict[str, Any]], dict[str, list[float]], dict[str, Any]]:
    """Interleaved one-at-a-time rounds: per round rows, pooled latencies, CPU per request."""
    lat: dict[str, list[float]] = {c: [] for c in CONFIGS}
    cpu: dict[str, dict[str, float]] = {c: dict.fromkeys(config_pids(f, c), 0.0) for c in CONFIGS}
    done = dict.fromkeys(CONFIGS, 0)
    rows: list[dict[str, Any]] = []
    for r in range(n_rounds):
        order = CONFIGS[r % 2:] + CONFIGS[:r % 2]
        row: dict[str, Any] = {"round": r, "order": order}
        for c in order:
            pids = config_pids(f, c)
            cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
            res = one_at_a_time(f.rankers[c].address, bodies, round_s, content_type)
            used = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
            for k, v in used.items():
                cpu[c][k] += v
            done[c] += len(res.status)
            lat[c] += res.ok_latencies().tolist()
            row[c] = {**percentiles(res.ok_latencies()), "errors": len(res.status) - res.ok,
                      "cpu_ms_per_request": sum(used.values()) / max(len(res.status), 1) * 1e3}
        row["p50_ratio"] = row["remote"]["p50_ms"] / row["local"]["p50_ms"]
        row["cpu_ratio"] = row["remote"]["cpu_ms_per_request"] / row["local"]["cpu_ms_per_request"]
        rows.append(row)
    per_request = {c: {k: v / max(done[c], 1) * 1e3 for k, v in cpu[c].items()} for c in CONFIGS}
    return rows, lat, {"cpu_ms_per_request": {c: {**v, "total": sum(v.values())}
                                              for c, v in per_request.items()},
                       "requests": done}


def hop_vs_floor(f: Fleet, vdir: Path, pb_bodies: Sequence[bytes], hop_rounds: int, calls: int
                 ) -> dict[str, Any]:
    """The hop (RemoteTables over each transport) and the floor for the same bytes."""
    dev = Device("cpu")
    lv = loaded_version(vdir, dev)
    batches = [plan_lookups(lv, codec.decode(codec.parse_body(b, "protobuf"), lv.schema, 1000)).queries
               for b in pb_bodies[:32]]
    requested = sum(q.rows.size for b in batches for q in b)
    unique = sum(np.unique(q.rows).size for b in batches for q in b)
    shards = [f.shards[f"shard{k}"] for k in range(2)]
    with tempfile.TemporaryDirectory(prefix="p2_floor_") as tmp:
        floor = hop_floor.start_floor(2, Path(tmp))
        try:
            out = asyncio.run(hop_floor.measure(
                lv, batches, [s.address for s in shards], [s.pid for s in shards], floor,
                rounds=hop_rounds, calls_per_block=calls))
        finally:
            floor.stop()
            dev.close()
    out["rows_per_request"] = {"requested": requested / len(batches), "unique": unique / len(batches)}
    return out


def profiles(f: Fleet, bodies: Sequence[bytes], content_type: str, seconds: float,
             out_dir: Path) -> dict[str, Any]:
    """py-spy of the remote ranker (all threads) and of shard 0 (GIL holder) under load."""
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            one_at_a_time(f.rankers["remote"].address, bodies, 1.0, content_type)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        ranker = profile_ranker(f.rankers["remote"].pid, seconds, out_dir / "p2_ranker.raw")
        shard = profile_server(f.shards["shard0"].pid, seconds, out_dir / "p2_shard0.raw",
                               lambda: time.sleep(seconds), native=False)
    finally:
        stop.set()
        worker.join(30)
    return {"ranker_remote": ranker, "shard0_gil": shard}


def judge(res: dict[str, Any], lat: dict[str, list[float]]) -> dict[str, Any]:
    arr = {c: np.asarray(v) for c, v in lat.items()}
    res["latency"] = {c: {**percentiles(arr[c]), "n": int(arr[c].size)} for c in CONFIGS}
    p50 = {c: res["latency"][c]["p50_ms"] for c in CONFIGS}
    cpu = {c: res["cpu_ms_per_request"][c]["total"] for c in CONFIGS}
    per_round = {k: float(np.median([r[k] for r in res["rounds"]])) for k in ("p50_ratio", "cpu_ratio")}
    hop = res["hop_vs_floor"]
    p50_ratio, cpu_ratio = p50["remote"] / p50["local"], cpu["remote"] / cpu["local"]
    return {"p50_ms": p50, "p50_ratio": p50_ratio, "p50_target": TARGETS["p50_ratio"],
            "p50_ratio_median_of_rounds": per_round["p50_ratio"],
            "p50_met": max(p50_ratio, per_round["p50_ratio"]) <= TARGETS["p50_ratio"],
            "cpu_ms_per_request": cpu, "cpu_ratio": cpu_ratio, "cpu_target": TARGETS["cpu_ratio"],
            "cpu_ratio_median_of_rounds": per_round["cpu_ratio"],
            "cpu_met": max(cpu_ratio, per_round["cpu_ratio"]) <= TARGETS["cpu_ratio"],
            "hop_us_end_to_end_p50": (p50["remote"] - p50["local"]) * 1e3,
            "hop_us_in_process_p50": {k: hop[k]["p50_us"] for k in ("hop_stream", "hop_unary")},
            "floor_us_p50_same_bytes": hop["floor_stream"]["p50_us"],
            "hop_cpu_us_per_lookup": {k: hop[k]["client_cpu_us_per_call"] + hop[k]["servers_cpu_us_per_call"]
                                      for k in ("hop_stream", "hop_unary", "floor_stream")}}


def panels(res: dict[str, Any]) -> list[Panel]:
    lat, rows, hop, cpu = res["latency"], res["rounds"], res["hop_vs_floor"], res["cpu_ms_per_request"]
    qs = ("p50_ms", "p90_ms", "p99_ms")
    kinds = ("hop_stream", "hop_unary", "floor_stream")
    return [
        Panel("latency, one request at a time (ms)", [q.removesuffix("_ms") for q in qs],
              {c: [lat[c][q] for q in qs] for c in CONFIGS}, ylabel="ms"),
        Panel("CPU per request, all server processes (ms)", CONFIGS,
              {"ranker": [cpu[c][f"ranker_{c}"] for c in CONFIGS],
               "embedding shards": [cpu[c]["total"] - cpu[c][f"ranker_{c}"] for c in CONFIGS],
               "total": [cpu[c]["total"] for c in CONFIGS]}, ylabel="ms"),
        Panel("remote / local per round (configs interleaved)", [str(r["round"]) for r in rows],
              {"p50 ratio": [r["p50_ratio"] for r in rows], "CPU ratio": [r["cpu_ratio"] for r in rows]},
              ylabel="ratio", targets={"p50 target 1.2": TARGETS["p50_ratio"],
                                       "CPU target 1.3": TARGETS["cpu_ratio"]},
              annotate=len(rows) <= 6),
        Panel("the hop in-process vs the bare grpcio floor, same bytes (µs per lookup)",
              ["p50 latency", "client CPU", "servers CPU"],
              {k: [hop[k]["p50_us"], hop[k]["client_cpu_us_per_call"],
                   hop[k]["servers_cpu_us_per_call"]] for k in kinds}, ylabel="µs"),
    ]


def parse_args(argv: Sequence[str] | None) -> Any:
    p = parser("hybrid_tax", __doc__, "ranker_p2.json")
    p.add_argument("--body", choices=sorted(CONTENT_TYPES), default="json", help="request body")
    p.add_argument("--rounds", type=int, default=10, help="rounds of interleaved configs")
    p.add_argument("--round-s", type=float, default=3.0, help="seconds per config per round")
    p.add_argument("--hop-rounds", type=int, default=6, help="blocks per kind, hop vs floor")
    p.add_argument("--hop-calls", type=int, default=300, help="lookups per block, hop vs floor")
    p.add_argument("--profile-s", type=float, default=8.0, help="py-spy seconds (0: none)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    ready = prepare(args, "P2 hybrid tax", CONFIGS,
                    "local (--local-tables): same ranker, lookups without the network hop")
    if ready is None:
        return 2
    vdir, rec, pb_bodies = ready
    bodies = pb_bodies if args.body == "protobuf" else encode_bodies(
        vdir, build_requests(vdir / "eval.jsonl", len(pb_bodies), args.candidates), "json")
    ctype = CONTENT_TYPES[args.body]
    res = rec.results
    res["body"] = args.body
    with fleet(Path(args.store), CONFIGS) as f:
        res["startup_s"] = time.monotonic() - started
        res["sanity"] = check_scores_agree(f, pb_bodies[0])
        for s in f.rankers.values():  # warm every code path (first batches are slow)
            one_at_a_time(s.address, bodies, 1.5, ctype)
        before = {c: scrape(s) for c, s in f.rankers.items()}
        res["rounds"], lat, extra = rounds(f, bodies, ctype, args.rounds, args.round_s)
        res.update(extra)
        res["server_side"] = {c: server_side(before[c], scrape(s)) for c, s in f.rankers.items()}
        after = scrape(f.rankers["remote"])
        res["lookup_rows"] = {k: after.get(f"ranker_lookup_rows_{k}_total{{}}", 0.0)
                              for k in ("requested", "unique")}
        res["hop_vs_floor"] = hop_vs_floor(f, vdir, pb_bodies, args.hop_rounds, args.hop_calls)
        if args.profile_s > 0:
            with tempfile.TemporaryDirectory(prefix="p2_pyspy_") as tmp:
                res["profiles"] = profiles(f, bodies, ctype, args.profile_s, Path(tmp))
    rec.verdict = judge(res, lat)
    rec.write(args.out, panels(res), title="P2 hybrid tax: ranker on remote shards vs --local-tables",
              note=f"{args.candidates} cand/request, {args.body}, one request at a time")
    print("\n".join(f"  {k}: {v}" for k, v in rec.verdict.items()))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
