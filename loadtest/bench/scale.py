"""P3 (issue 3): a 450M-row x 32-dim INT4 table (9 GB) written, loaded, served, doubled.

    python -m loadtest.bench.scale                    # full scale: ~20 GB of disk, many minutes
    python -m loadtest.bench.scale --rows 2000000     # small scale, well under a minute

Steps, all in one run, in a temp store on the local disk that is deleted at the end
(try/finally; `--keep` keeps it):

1. check free disk (two versions of the big table plus a reference table);
2. write version `big1` and the reference table (`--ref-rows`, default 20M) with the
   streaming VersionWriter (progress bar; every block quantized by the writer; data from
   a pool of random blocks with a per-block offset), timing each;
3. measure sha256 throughput on the big file (what the server's verification costs), in
   one thread and in two threads over the two halves (what chunked digests would allow);
4. start `python -m embedding_server --preload bench/big1 --preload bench/ref` pinned to
   one core: time to SERVING, and the server's own load time per version from its log;
5. lookup rates, 4096-row INT4_PACKED and pooled (L=20, FP16), on the big table vs the
   reference table, interleaved rounds, through gRPC (2 callers, client on the other core)
   and in-process on the same mapped files;
6. the server's private memory from /proc/PID/smaps_rollup, with a per-mapping breakdown;
7. write `big2` (same size, another seed) while the server runs, load it with the admin
   LoadVersion RPC beside big1 while a stream of lookups keeps hitting big1, then
   memory and lookup rates again (big2 vs big1 vs reference).

Results: JSON (os.getloadavg() before/after and per round) + PNG.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loadtest.bench.grpc_driver import GrpcDriver, summarize, target
from loadtest.bench.lookup_harness import (
    CLIENT_CPU,
    MODEL,
    SERVER_CPU,
    TABLE,
    Cell,
    MappedTable,
    lookup_request,
    map_table,
    random_rows,
    start_server,
    write_random_version,
)
from loadtest.bench.record import RESULTS, BenchRecord
from loadtest.bench.scale_measure import (
    GB,
    admin_stub,
    compare_rates,
    hash_throughput,
    log_times,
    p3_panels,
    ratios,
)
from loadtest.harness.process import ServerProcess
from loadtest.harness.procfs import cpu_seconds, disk_read_bytes, pin, private_memory
from protos import embedding_pb2 as pb

log = logging.getLogger("bench")
TOKEN = "bench-scale-token"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=450_000_000, help="rows of the big table (default 450M)")
    p.add_argument("--dim", type=int, default=32, help="embedding dim (default 32)")
    p.add_argument("--ref-rows", type=int, default=None,
                   help="rows of the reference table (default min(20M, rows / 10))")
    p.add_argument("--batch", type=int, default=4096, help="rows per lookup (default 4096)")
    p.add_argument("--seconds", type=float, default=2.0, help="time per measurement, over all rounds")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dir", type=Path, default=None,
                   help="where the temp store goes (default: the system temp dir); must be local disk")
    p.add_argument("--keep", action="store_true", help="keep the temp store (default: delete it)")
    p.add_argument("--time-limit", type=float, default=90.0,
                   help="minutes; writing stops (and everything is cleaned up) past it (default 90)")
    p.add_argument("--no-second", action="store_true", help="skip the second big version")
    p.add_argument("--out", type=Path, default=RESULTS / "scale_p3.json",
                   help="result JSON; the PNG goes beside it")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- pieces


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    pinning = len(os.sched_getaffinity(0)) >= 2
    if pinning:
        pin({CLIENT_CPU})
    rows, dim = args.rows, args.dim
    ref_rows = args.ref_rows or max(1000, min(20_000_000, rows // 10))
    row_bytes = 4 + dim // 2
    big_bytes, ref_bytes = rows * row_bytes, ref_rows * row_bytes
    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.dir))
    store = work / "store"
    free = shutil.disk_usage(work).free
    need_one, need_two = big_bytes + ref_bytes + (1 << 30), 2 * big_bytes + ref_bytes + (1 << 30)
    second = not args.no_second and free >= need_two
    rec = BenchRecord("P3 scale: big INT4 table written, loaded, served, and a second version beside it",
                      compared=f"lookups on {rows:,}-row tables (big1, big2) through gRPC and in-process",
                      anchor=f"the same lookups on a {ref_rows:,}-row reference table in the same server",
                      device="cpu", config={k: str(v) for k, v in vars(args).items()})
    rec.host.update({"disk": str(work), "disk_free_GB_before": round(free / GB, 1),
                     "mem_total_GB": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GB, 1)})
    result = rec.results
    result.update({"table": {"rows": rows, "dim": dim, "bytes_per_version": big_bytes,
                             "ref_rows": ref_rows, "ref_bytes": ref_bytes}, "targets": []})
    if free < need_one:
        shutil.rmtree(work, ignore_errors=True)
        print(f"not enough disk at {work}: {free / GB:.1f} GB free, {need_one / GB:.1f} GB needed",
              file=sys.stderr)
        return 2
    if not second and not args.no_second:
        result["second_version"] = {"skipped": f"{free / GB:.1f} GB free < {need_two / GB:.1f} GB needed"}
    server: ServerProcess | None = None
    t_start = time.monotonic()
    deadline = t_start + args.time_limit * 60
    code = 0
    try:
        # ---- 2. write
        write: dict[str, Any] = {}
        m1, s1 = write_random_version(store, "big1", rows, dim, seed=1, deadline=deadline)
        write["big1"] = {"seconds": round(s1, 1), "rows_per_s": round(rows / s1),
                         "MB_per_s": round(big_bytes / s1 / 1e6, 1)}
        mref, sref = write_random_version(store, "ref", ref_rows, dim, seed=3, deadline=deadline)
        write["ref"] = {"seconds": round(sref, 1), "rows_per_s": round(ref_rows / sref)}
        result["write"] = write
        log.info("wrote big1 in %.1fs, ref in %.1fs", s1, sref)
        big_file = store / MODEL / "big1" / f"tables/{TABLE}/shard-0-of-1.bin"

        # ---- 3. hashing
        pin(None)  # both cores: the hashing threads inherit this thread's affinity
        result["hash"] = {"bytes": big_bytes, "one_thread": hash_throughput(big_file, 1),
                          "two_threads_over_halves": hash_throughput(big_file, 2),
                          "one_thread_again": hash_throughput(big_file, 1)}
        if pinning:
            pin({CLIENT_CPU})
        log.info("sha256: %s", result["hash"])

        # ---- 4. server
        (work / "token").write_text(TOKEN)
        budget = str(2 * big_bytes + ref_bytes + (1 << 30))
        spawn_wall = time.time()
        server = start_server(store, [f"{MODEL}/big1", f"{MODEL}/ref"], work, name="scale",
                              cpus={SERVER_CPU} if pinning else None, timeout_s=900,
                              extra=["--memory-budget", budget, "--admin-token-file",
                                     str(work / "token"), "--log-level", "INFO"])
        lt = log_times(server.log_path.read_text())
        big_load = lt["versions"].get(f"{MODEL}/big1", {}).get("load_s")
        startup = {"spawn_to_serving_s": round(server.ready_s, 2),
                   "spawn_to_listening_s (imports)": round(lt.get("listening", spawn_wall) - spawn_wall, 2),
                   "big1_load_s (verify + map)": big_load,
                   "ref_load_s": lt["versions"].get(f"{MODEL}/ref", {}).get("load_s"),
                   "big1_verify_GB_per_s": round(big_bytes / big_load / GB, 3) if big_load else None,
                   # CPU the server had used by SERVING (imports + hashing + mapping), and what it
                   # read from the disk rather than the page cache.
                   "server_cpu_s_at_serving": round(cpu_seconds(server.pid), 2),
                   "server_disk_read_GB_at_serving": round(disk_read_bytes(server.pid) / GB, 2)}
        result["startup"] = startup
        result["targets"].append(target("big1 time to READY in the server (verify + map), s",
                                        big_load, 10.0, False))
        result["targets"].append(target("spawn to SERVING incl. imports and the ref table, s",
                                        server.ready_s, 10.0, False))
        log.info("server ready: %s", startup)
        result["memory"] = {"after_ready": private_memory(server.pid)}

        # ---- 5. rates
        driver = GrpcDriver(server.address, 2)
        tables = {"big1": ("big1", map_table(store / MODEL / "big1", rows, dim)),
                  "ref": ("ref", map_table(store / MODEL / "ref", ref_rows, dim))}
        fps = {"big1": m1.fingerprint, "ref": mref.fingerprint}
        rng = np.random.default_rng(0)
        rates = compare_rates(driver, server.pid, tables, fps, args.batch, args.rounds, args.seconds, rng)
        for name, cell in rates["cells"].items():
            cell["ratio_big1_over_ref"] = r = ratios(cell, "big1", "ref")
            result["targets"].append(target(f"{name}: gRPC rows/s big1 / ref (wall, 2 callers)",
                                            r["grpc_wall"], 0.8, True))
            result["targets"].append(target(f"{name}: gRPC rows per server CPU-s big1 / ref",
                                            r["grpc_cpu"], 0.8, True))
        result["lookups"] = rates
        result["memory"]["after_lookups"] = mem = private_memory(server.pid)
        result["targets"].append(target("server private (non-file) memory with big1 + ref, MB",
                                        mem["private_non_file_MB"], 300.0, False))

        # ---- 7. second version
        if second:
            result["second_version"] = second_version(args, store, server, driver, tables, fps, rng,
                                                      result, deadline)
        driver.close()
    except Exception as e:  # keep what was measured; say what stopped the run
        log.exception("benchmark failed")
        result["error"] = f"{type(e).__name__}: {e}"
        code = 1
    finally:
        if server is not None:
            result.setdefault("server", {})["exit_code"] = server.stop()
            result["server"]["log_tail"] = server.log_tail(1500).splitlines()[-8:]
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        result["cleanup"] = {"deleted": not args.keep and not work.exists(), "path": str(work),
                             "disk_free_GB_after": round(shutil.disk_usage(work.parent).free / GB, 1)}
    result["total_seconds"] = round(time.monotonic() - t_start, 1)
    targets = result["targets"]
    rec.verdict = {"targets_met": sum(t["met"] for t in targets), "targets": len(targets),
                   "missed": [t["name"] for t in targets if not t["met"]]}
    rec.write(args.out, p3_panels(result),
              title=f"P3: {rows / 1e6:g}M x {dim} INT4 ({big_bytes / GB:.1f} GB per version)",
              note="2-core machine shared with other jobs; compare ratios within this run only.")
    print_summary(result, rec.host)
    return code


def second_version(args: argparse.Namespace, store: Path, server: ServerProcess, driver: GrpcDriver,
                   tables: dict[str, tuple[str, MappedTable]], fps: dict[str, str],
                   rng: np.random.Generator, result: dict[str, Any], deadline: float) -> dict[str, Any]:
    rows, dim = args.rows, args.dim
    out: dict[str, Any] = {}
    m2, s2 = write_random_version(store, "big2", rows, dim, seed=2, deadline=deadline)
    out["write"] = {"seconds": round(s2, 1), "rows_per_s": round(rows / s2),
                    "note": "written while the server held big1 and ref (idle)"}
    fps["big2"] = m2.fingerprint
    # A stream of lookups on big1 keeps going while big2 is verified and mapped.
    stop = threading.Event()
    c = Cell("packed", args.batch)
    raw = [lookup_request(c, random_rows(rng, rows, args.batch), "big1", fps["big1"]).SerializeToString()
           for _ in range(8)]
    stream: dict[str, Any] = {}

    def background() -> None:
        try:
            run = driver.run(raw, args.batch, 1, 3600.0, until=stop)
            stream.update(summarize([run]))
        except Exception as e:  # reported in the JSON
            stream["error"] = repr(e)

    t = threading.Thread(target=background, daemon=True)
    t.start()
    ch, stub = admin_stub(server.address)
    cpu0, io0 = cpu_seconds(server.pid), disk_read_bytes(server.pid)
    t0 = time.monotonic()
    info = stub.LoadVersion(pb.LoadVersionRequest(model=MODEL, version="big2"),
                            metadata=[("authorization", f"Bearer {TOKEN}")], timeout=900)
    load_rpc_s = time.monotonic() - t0
    cpu_load, io_load = cpu_seconds(server.pid) - cpu0, disk_read_bytes(server.pid) - io0
    stop.set()
    t.join(timeout=60)
    listing = stub.ListVersions(pb.ListVersionsRequest(), timeout=30)
    ch.close()
    lt = log_times(server.log_path.read_text())
    server_load = lt["versions"].get(f"{MODEL}/big2", {}).get("load_s")
    out["load"] = {"LoadVersion_rpc_s": round(load_rpc_s, 2), "server_load_s (verify + map)": server_load,
                   "state": pb.VersionState.Name(info.state), "bytes": info.bytes,
                   "listed": [f"{v.model}/{v.version} {pb.VersionState.Name(v.state)}"
                              for v in listing.versions],
                   "memory_used_GB": round(listing.memory_used_bytes / GB, 2),
                   "server_cpu_s_during_load (incl. the big1 stream)": round(cpu_load, 2),
                   "server_disk_read_GB_during_load": round(io_load / GB, 2)}
    out["big1_stream_during_load"] = {k: stream.get(k) for k in ("calls", "rows_per_s", "p50_us", "p99_us",
                                                                 "error") if k in stream}
    result["targets"].append(target("big2 LoadVersion beside big1 (RPC, verify + map), s",
                                    load_rpc_s, 10.0, False))
    out["memory_after_load"] = private_memory(server.pid)
    tables2 = {"big2": ("big2", map_table(store / MODEL / "big2", rows, dim)), **tables}
    rates = compare_rates(driver, server.pid, tables2, fps, args.batch, max(3, args.rounds - 2),
                          args.seconds, rng)
    for name, cell in rates["cells"].items():
        cell["ratio_big2_over_ref"] = r = ratios(cell, "big2", "ref")
        cell["ratio_big1_over_ref"] = ratios(cell, "big1", "ref")
        result["targets"].append(target(f"{name}: gRPC rows/s big2 / ref with two big versions loaded",
                                        r["grpc_wall"], 0.8, True))
    out["lookups"] = rates
    out["memory_after_lookups"] = mem = private_memory(server.pid)
    result["targets"].append(target("server private (non-file) memory with big1 + big2 + ref, MB",
                                    mem["private_non_file_MB"], 300.0, False))
    return out


def print_summary(result: dict[str, Any], host: dict[str, Any]) -> None:
    print(json.dumps({k: result.get(k) for k in ("write", "hash", "startup")}, indent=1))
    for t in result["targets"]:
        print(f"  {t['name']}: {t['value']} vs {t['target']} -> {t.get('text')}")
    print(f"loadavg start {host['loadavg_start']} end {host.get('loadavg_end')}; "
          f"total {result.get('total_seconds')}s; cleanup {result.get('cleanup')}")


if __name__ == "__main__":
    sys.exit(main())
