"""Issue 15's miss-ratio curve: row cache hit ratio vs size, per policy, on day-1 traffic.

    python -m loadtest.bench.cache_mrc --store demo_store

An offline simulation over the real request stream: v2's eval requests (the demo's day-1
traffic) in their order, hashed to v1's table rows by the ranker's own plan_lookups,
`--batch-requests` requests per batch, each batch de-duplicated (unique_rows) and read
through ranker_server.row_cache.RowCache exactly as CachedTables does (read, then the
misses admitted with their real bytes). For each policy and each cache size (a share of
the table's bytes), the hit ratio of unique rows (what the wire carries) and of requested
rows (repeats within a batch included), over the whole stream and over its second half
(warm). `--passes` replays the day (a second pass is the same rows again: optimistic).
Result: loadtest/results/cache_mrc.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loadtest.bench.pipeline_load import loaded_version
from loadtest.bench.plotting import Panel
from loadtest.bench.record import RESULTS, BenchRecord
from loadtest.bench.workload import version_dir
from modelpack.lookup import TableQuery, unique_rows
from modelpack.requests import decode_request
from modelpack.scorer import TableReader
from ranker_server.cache_policy import POLICIES, Policy
from ranker_server.device import Device
from ranker_server.pipeline import merge_requests, plan_lookups
from ranker_server.row_cache import RowCache

SIZES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


def batches(store: Path, batch_requests: int) -> tuple[list[list[TableQuery]], Any]:
    """Day-1 traffic as the ranker's per-batch table queries over v1's rows."""
    device = Device("cpu")
    try:
        version = loaded_version(version_dir(store, "v1"), device)
    finally:
        device.close()
    lines = (version_dir(store, "v2") / "eval.jsonl").read_text().splitlines()
    reqs = [decode_request(version.schema, json.loads(line)) for line in lines if line.strip()]
    out = []
    for i in range(0, len(reqs), batch_requests):
        merged = merge_requests(version.schema, reqs[i:i + batch_requests])
        out.append(plan_lookups(version, merged).queries)
    return out, version


def simulate(stream: Sequence[list[TableQuery]], version: Any, readers: dict[str, TableReader],
             policy: Policy, capacity: int, passes: int) -> dict[str, Any]:
    cache = RowCache(capacity, policy, torch.device("cpu"))
    cache.open(version.fingerprint, "v1")
    half = len(stream) * passes // 2
    warm = {"unique_hits": 0, "unique": 0, "requested_hits": 0, "requested": 0}
    t0 = time.perf_counter()
    for n, queries in enumerate(q for _ in range(passes) for q in stream):
        for q in queries:
            unique, inverse = unique_rows(q.rows)
            counts = np.bincount(inverse, minlength=unique.size).astype(np.int64)
            width = version.tables[q.table].row_bytes
            hit, _ = cache.read(version.fingerprint, q.table, q.num_rows, unique, 0, counts, width)
            missing = unique[~hit]
            if missing.size:
                cache.admit(version.fingerprint, q.table, q.num_rows, missing,
                            torch.from_numpy(readers[q.table].gather(missing)), 0)
            if n >= half:
                warm["unique_hits"] += int(hit.sum())
                warm["unique"] += unique.size
                warm["requested_hits"] += int(counts[hit].sum())
                warm["requested"] += int(counts.sum())
    took = time.perf_counter() - t0
    st = cache.stats()["versions"][0]
    uh, um = st["unique_hits"], st["unique_misses"]
    rh, rm = st["requested_hits"], st["requested_misses"]
    return {"policy": policy, "capacity_bytes": capacity, "entries": st["entries"],
            "unique_hit_ratio": uh / max(1, uh + um),
            "requested_hit_ratio": rh / max(1, rh + rm),
            "warm_unique_hit_ratio": warm["unique_hits"] / max(1, warm["unique"]),
            "warm_requested_hit_ratio": warm["requested_hits"] / max(1, warm["requested"]),
            "evictions": st["evictions"], "wire_saved_bytes": st["wire_saved_bytes"],
            "seconds": round(took, 2), "us_per_batch": round(took / (len(stream) * passes) * 1e6, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.cache_mrc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=Path("demo_store"))
    p.add_argument("--batch-requests", type=int, default=4,
                   help="requests per batch (the batcher merges concurrent requests)")
    p.add_argument("--passes", type=int, default=1, help="times the day's stream is replayed")
    p.add_argument("--out", type=Path, default=RESULTS / "cache_mrc.json")
    args = p.parse_args(argv)
    stream, version = batches(args.store, args.batch_requests)
    readers = {t.name: TableReader(version.path, t) for t in version.manifest.tables}
    table_bytes = sum(t.rows * t.row_bytes for t in version.manifest.tables)
    distinct = len(np.unique(np.concatenate([q.rows for qs in stream for q in qs])))
    lookups = sum(np.unique(q.rows).size for qs in stream for q in qs) * args.passes
    ceiling = 1 - distinct / lookups  # an unbounded cache: only first reads miss
    rec = BenchRecord("cache_mrc", compared="row cache policies " + ", ".join(POLICIES) +
                      " at sizes " + ", ".join(f"{s:.0%}" for s in SIZES) + " of the table",
                      anchor="no cache (hit ratio 0)", device="cpu",
                      config={k: str(v) for k, v in vars(args).items()})
    rec.results.update({"batches": len(stream), "table_bytes": table_bytes,
                        "distinct_rows_in_stream": distinct, "unique_lookups": lookups,
                        "unique_hit_ratio_ceiling": ceiling,
                        "table_rows": sum(t.rows for t in version.manifest.tables)})
    runs = []
    for policy in POLICIES:
        for share in SIZES:
            r = simulate(stream, version, readers, policy, int(share * table_bytes), args.passes)
            r["share_of_table"] = share
            runs.append(r)
            print(f"{policy:8s} {share:5.0%}  unique hit {r['unique_hit_ratio']:.3f} "
                  f"(warm {r['warm_unique_hit_ratio']:.3f})  requested hit "
                  f"{r['requested_hit_ratio']:.3f}  {r['us_per_batch']} us/batch", flush=True)
    rec.results["runs"] = runs

    def col(policy: str, key: str) -> list[float | None]:
        return [r[key] for r in runs if r["policy"] == policy]

    def warm(pol: str, s: float) -> float:
        return float(next(r["warm_unique_hit_ratio"] for r in runs
                          if r["policy"] == pol and r["share_of_table"] == s))

    best = {s: "tie" if len({round(warm(pol, s), 4) for pol in POLICIES}) == 1
            else max(POLICIES, key=lambda pol: warm(pol, s)) for s in SIZES}
    rec.verdict = {f"warm_unique_hit_ratio_{pol}_{s:.0%}": round(warm(pol, s), 4)
                   for pol in POLICIES for s in (0.01, 0.05, 0.1, 0.2)}
    rec.verdict["unique_hit_ratio_ceiling"] = round(ceiling, 4)
    rec.verdict["best_policy_per_size"] = {f"{s:.0%}": b for s, b in best.items()}
    labels = [f"{s:.0%}" for s in SIZES]
    rec.write(args.out, [
        Panel("unique rows hit (warm: 2nd half of the stream)", labels,
              {pol: col(pol, "warm_unique_hit_ratio") for pol in POLICIES}, ylabel="hit ratio"),
        Panel("unique rows hit (whole stream, cold start)", labels,
              {pol: col(pol, "unique_hit_ratio") for pol in POLICIES}, ylabel="hit ratio",
              targets={"ceiling (unbounded cache)": ceiling}),
        Panel("requested rows hit (warm)", labels,
              {pol: col(pol, "warm_requested_hit_ratio") for pol in POLICIES}, ylabel="hit ratio"),
    ], title="Row cache hit ratio vs size (share of the table's bytes), day-1 traffic",
        note=f"{len(stream)} batches of {args.batch_requests} requests x {args.passes} passes")
    print(json.dumps(rec.verdict, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
