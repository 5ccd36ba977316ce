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
import hashlib
import json
import logging
import os
import re
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from loadtest.bench.lookup_harness import (
    CLIENT_CPU,
    MODEL,
    RESULTS,
    SERVER_CPU,
    TABLE,
    Cell,
    EmbeddingServer,
    GrpcDriver,
    MappedTable,
    Run,
    anchor_call,
    check_answer,
    cpu_seconds,
    loadavg,
    lookup_request,
    map_table,
    pin,
    random_rows,
    run_anchor,
    smaps_rollup,
    summarize,
    target,
    write_random_version,
)
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg

log = logging.getLogger("bench")
GB = 1e9
TOKEN = "bench-scale-token"
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_scale", description=__doc__.split("\n\n")[0])
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


def hash_throughput(path: Path, threads: int, chunk: int = 8 << 20) -> dict[str, float | None]:
    """sha256 over `threads` contiguous parts of the file at once (threads=1: the whole file,
    as the server's verification does it); GB/s of file bytes."""
    size = path.stat().st_size
    bounds = [size * i // threads for i in range(threads + 1)]

    def part(i: int) -> str:
        h = hashlib.sha256()
        with open(path, "rb", buffering=0) as f:
            f.seek(bounds[i])
            left = bounds[i + 1] - bounds[i]
            buf = bytearray(chunk)
            view = memoryview(buf)
            while left > 0:
                n = f.readinto(view[:min(chunk, left)])
                if not n:
                    break
                h.update(view[:n])
                left -= n
        return h.hexdigest()

    io0, cpu0 = disk_read_bytes(os.getpid()), _self_cpu()
    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(part, range(threads)))
    dt = time.monotonic() - t0
    cpu = _self_cpu() - cpu0
    return {"threads": threads, "seconds": round(dt, 2), "GB_per_s": round(size / dt / GB, 3),
            "cpu_s": round(cpu, 2), "GB_per_cpu_s": round(size / cpu / GB, 3) if cpu > 0 else None,
            "read_from_disk_GB": round((disk_read_bytes(os.getpid()) - io0) / GB, 2)}


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def disk_read_bytes(pid: int) -> int:
    """Bytes `pid` made the storage layer read (page-cache hits do not count)."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def log_times(log_text: str) -> dict[str, Any]:
    """Wall-clock times of the server's milestones, from its log."""
    out: dict[str, Any] = {"versions": {}}
    for line in log_text.splitlines():
        m = _LOG_TIME.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if "listening on" in line and "listening" not in out:
            out["listening"] = t
        if (r := re.search(r"version (\S+) READY in ([\d.]+)s", line)):
            out["versions"][r.group(1)] = {"at": t, "load_s": float(r.group(2))}
        if line.rstrip().endswith("SERVING") and "serving" not in out:
            out["serving"] = t
    return out


def private_memory(pid: int) -> dict[str, Any]:
    """smaps_rollup in MB, the non-file-backed private figure, and where it lives."""
    roll = smaps_rollup(pid)
    mb = {k: round(v / 1e6, 1) for k, v in roll.items()
          if k in ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Anonymous", "Shared_Clean",
                   "Pss_Anon", "Pss_File")}
    anon: dict[str, int] = {}
    dirty: dict[str, int] = {}
    name = "?"
    try:
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split(maxsplit=5)
                name = Path(parts[5]).name if len(parts) > 5 else "[anon]"
            elif line.startswith("Anonymous:"):
                anon[name] = anon.get(name, 0) + int(line.split()[1]) * 1024
            elif line.startswith("Private_Dirty:"):
                dirty[name] = dirty.get(name, 0) + int(line.split()[1]) * 1024
    except OSError:
        pass
    # Anonymous pages are (nearly all) private dirty too: per mapping, the larger of the two.
    per = {n: max(anon.get(n, 0), dirty.get(n, 0)) for n in {*anon, *dirty}}
    top = sorted(per.items(), key=lambda kv: -kv[1])[:8]
    private = max(roll.get("Private_Dirty", 0), roll.get("Anonymous", 0))
    return {"private_non_file_MB": round(private / 1e6, 1), "smaps_rollup_MB": mb,
            "largest_private_mappings_MB": {k: round(v / 1e6, 1) for k, v in top}}


def compare_rates(driver: GrpcDriver, server_pid: int, tables: dict[str, tuple[str, MappedTable]],
                  fingerprints: dict[str, str], batch: int, rounds: int, seconds: float,
                  rng: np.random.Generator) -> dict[str, Any]:
    """For each mode: gRPC (2 callers) and in-process rates per table, rounds interleaved."""
    cells = [Cell("packed", batch), Cell("pooled", batch)]
    runs: dict[str, list[Run]] = {}
    plans = {}
    for c in cells:
        for label, (version, table) in tables.items():
            rows = [random_rows(rng, table.rows, batch) for _ in range(16)]
            raw = [lookup_request(c, r, version, fingerprints[label]).SerializeToString() for r in rows]
            check_answer(c, table, rows[0], driver.call(raw[0]), version)
            fns = [anchor_call(c, table)(r) for r in rows]
            plans[(c.name, label)] = (raw, fns)
    # Warm-up: page faults of first touches (random rows of a 9 GB mapping touch new pages).
    warm: dict[str, Any] = {}
    for (name, label), (raw, fns) in plans.items():
        run = driver.run(raw, batch, 2, max(1.0, seconds / 2), server_pid)
        warm[f"{name} {label}"] = round(run.rows_per_s)
        pin({SERVER_CPU})
        run_anchor(fns, batch, 0.3)
        pin({CLIENT_CPU})

    for r in range(rounds):
        for (name, label), (raw, fns) in plans.items():
            runs.setdefault(f"{name}|{label}|grpc", []).append(
                driver.run(raw, batch, 2, seconds / rounds, server_pid))
            pin({SERVER_CPU})
            runs.setdefault(f"{name}|{label}|in_process", []).append(run_anchor(fns, batch, seconds / rounds))
            pin({CLIENT_CPU})
        log.info("round %d/%d (load %s)", r + 1, rounds, loadavg())
    out: dict[str, Any] = {"warmup_grpc_rows_per_s": warm, "cells": {}}
    for c in cells:
        cell: dict[str, Any] = {}
        for label in tables:
            cell[label] = {k: summarize(runs[f"{c.name}|{label}|{k}"]) for k in ("grpc", "in_process")}
        out["cells"][c.name] = cell
    return out


def ratios(cell: dict[str, Any], num: str, den: str) -> dict[str, float]:
    a, b = cell[num], cell[den]
    return {"grpc_wall": round(a["grpc"]["rows_per_s"] / b["grpc"]["rows_per_s"], 4),
            "grpc_cpu": round(a["grpc"]["rows_per_cpu_s"] / b["grpc"]["rows_per_cpu_s"], 4),
            "in_process_cpu": round(a["in_process"]["rows_per_cpu_s"] / b["in_process"]["rows_per_cpu_s"], 4)}


def admin_stub(address: str) -> tuple[grpc.Channel, pbg.EmbeddingServiceStub]:
    ch = grpc.insecure_channel(address)
    return ch, pbg.EmbeddingServiceStub(ch)  # type: ignore[no-untyped-call]


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
    result: dict[str, Any] = {
        "benchmark": "P3 scale: big INT4 table written, loaded, served, and a second version beside it",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:],
        "table": {"rows": rows, "dim": dim, "bytes_per_version": big_bytes, "ref_rows": ref_rows,
                  "ref_bytes": ref_bytes},
        "host": {"cpus": os.cpu_count(), "loadavg_start": loadavg(), "disk": str(work),
                 "disk_free_GB_before": round(free / GB, 1),
                 "mem_total_GB": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GB, 1)},
        "targets": [],
    }
    if free < need_one:
        shutil.rmtree(work, ignore_errors=True)
        print(f"not enough disk at {work}: {free / GB:.1f} GB free, {need_one / GB:.1f} GB needed",
              file=sys.stderr)
        return 2
    if not second and not args.no_second:
        result["second_version"] = {"skipped": f"{free / GB:.1f} GB free < {need_two / GB:.1f} GB needed"}
    server: EmbeddingServer | None = None
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
        server = EmbeddingServer(store, [f"{MODEL}/big1", f"{MODEL}/ref"], work, name="scale",
                                 cpus={SERVER_CPU} if pinning else None,
                                 extra=["--memory-budget", budget, "--admin-token-file",
                                        str(work / "token"), "--log-level", "INFO"])
        server.start(timeout_s=900)
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
    result["host"]["loadavg_end"] = loadavg()
    result["total_seconds"] = round(time.monotonic() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot_p3(result, args.out.with_suffix(".png"))
    print_summary(result)
    return code


def second_version(args: argparse.Namespace, store: Path, server: EmbeddingServer, driver: GrpcDriver,
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


def plot_p3(result: dict[str, Any], path: Path) -> None:
    from loadtest.bench.plotting import Panel, save_panels

    panels = []
    cells = result.get("lookups", {}).get("cells", {})
    sv = result.get("second_version", {})
    cells2 = sv.get("lookups", {}).get("cells", {}) if isinstance(sv, dict) else {}
    rows = result["table"]["rows"]
    for name, cell in cells.items():
        both = name in cells2
        labels = ["ref", "big1", "big2"] if both else ["ref", "big1"]
        src = cells2[name] if both else cell
        panels.append(Panel(
            f"{name}: {rows / 1e6:g}M-row tables vs {result['table']['ref_rows'] / 1e6:g}M ref"
            + (" (all 3 loaded)" if both else ""), labels,
            {"gRPC, 2 callers (wall)": [src[t]["grpc"]["rows_per_s"] for t in labels],
             "gRPC per server CPU-s": [src[t]["grpc"]["rows_per_cpu_s"] for t in labels],
             "in-process per CPU-s": [src[t]["in_process"]["rows_per_cpu_s"] for t in labels]},
            ylabel="rows/s", log=True))
    st = result.get("startup", {})
    load = sv.get("load", {}) if isinstance(sv, dict) else {}
    panels.append(Panel(
        "time to READY (s)", ["big1 verify+map", "spawn->SERVING", "big2 LoadVersion\n(1 core, serving)"],
        {"seconds": [st.get("big1_load_s (verify + map)"), st.get("spawn_to_serving_s"),
                     load.get("LoadVersion_rpc_s")]}, ylabel="s", targets={"target 10 s": 10.0}))
    mem = result.get("memory", {})
    mem_vals = [mem.get("after_ready", {}).get("private_non_file_MB"),
                mem.get("after_lookups", {}).get("private_non_file_MB")]
    mem_labels = ["after READY", "after lookups"]
    if isinstance(sv, dict) and "memory_after_lookups" in sv:
        mem_vals.append(sv["memory_after_lookups"]["private_non_file_MB"])
        mem_labels.append("+ big2, lookups")
    panels.append(Panel("server private non-file memory (MB)", mem_labels,
                        {"MB": mem_vals}, ylabel="MB", targets={"target 300 MB": 300.0}))
    h = result.get("hash", {})
    if h:
        runs = [(k, v) for k, v in h.items() if isinstance(v, dict)]
        panels.append(Panel(
            "sha256 over the big file", [f"{k.replace('_', ' ')}\n({v.get('read_from_disk_GB', '?')} GB "
                                         "from disk)" for k, v in runs],
            {"GB/s (wall)": [v["GB_per_s"] for _, v in runs],
             "GB per CPU-s": [v.get("GB_per_cpu_s") for _, v in runs]}, ylabel="GB/s"))
    w = dict(result.get("write", {}))
    if isinstance(sv, dict) and "write" in sv:
        w["big2"] = sv["write"]
    if w:
        panels.append(Panel("streaming write (VersionWriter, quantizing), rows/s", list(w),
                            {"rows/s": [v["rows_per_s"] for v in w.values()]}, ylabel="rows/s"))
    hst = result["host"]
    save_panels(path, f"P3: {rows / 1e6:g}M x {result['table']['dim']} INT4 "
                f"({result['table']['bytes_per_version'] / GB:.1f} GB per version)", panels,
                note=f"loadavg start {hst['loadavg_start']} end {hst.get('loadavg_end')} "
                "(2-core machine shared with other jobs; compare ratios within this run only)")


def print_summary(result: dict[str, Any]) -> None:
    print(json.dumps({k: result.get(k) for k in ("write", "hash", "startup")}, indent=1))
    for t in result["targets"]:
        print(f"  {t['name']}: {t['value']} vs {t['target']} -> {t.get('text')}")
    print(f"loadavg start {result['host']['loadavg_start']} end {result['host'].get('loadavg_end')}; "
          f"total {result.get('total_seconds')}s; cleanup {result.get('cleanup')}")


if __name__ == "__main__":
    sys.exit(main())
