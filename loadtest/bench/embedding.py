"""P1 (issues 3, 10): embedding lookups through gRPC on loopback vs the same kernel in-process.

    python -m loadtest.bench.embedding                       # 20M x 32 table, ~4-5 minutes
    python -m loadtest.bench.embedding --rows 2000000 --seconds 0.5 --no-workers --no-profile

For batches of 512 / 4096 / 16384 rows, single-ID INT4_PACKED and pooled (L=20, FP16):

- in-process anchor: the server's own kernel on the same memory-mapped table plus one copy
  of the answer (gather + copy), one thread pinned to one core (np.take of packed rows, as
  the server gathers them; Int4Kernel.lookup for pooled);
- gRPC: a real `python -m embedding_server` process pinned to core 0, this process (the
  client) pinned to core 1; sync stubs sending pre-serialized requests and keeping the
  raw response bytes (no client-side protobuf work); closed loop, 1 and 2 callers, each
  caller once with unary `Lookup` calls and once on its own long-lived `LookupStream`;
- the floor in the same run: a bare grpcio server of the same kind answering the same
  bytes (no protobuf, no lookup), unary and on a stream.

Every measurement is repeated in rounds that interleave the anchor and gRPC for each cell,
so slow phases of a shared machine hit both alike; a cell's rate is the median of its
rounds, its latencies are percentiles over all calls. The targets (issue 10): server CPU
per lookup vs the in-process gather, per server core, >= 0.25 at 4096 rows and >= 0.5 at
16384, p99 <= 2 ms per 4096-row call; judged for unary and stream alike. The server is
profiled with py-spy (packed 4096, unary and stream) unless --no-profile. Optionally
(`--workers`, default on) the same server with `--workers 2` is compared with one worker,
both unpinned. Results: JSON (with os.getloadavg() before/after) + PNG.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from loadtest.bench.embedding_report import p1_panels, print_summary
from loadtest.bench.grpc_driver import (
    STREAM_METHOD,
    GrpcDriver,
    Run,
    measure_floor,
    run_anchor,
    summarize,
    target,
)
from loadtest.bench.lookup_harness import (
    BATCHES,
    CLIENT_CPU,
    MODEL,
    MODES,
    SERVER_CPU,
    Cell,
    MappedTable,
    anchor_call,
    check_answer,
    in_process_servicer,
    log,
    lookup_request,
    map_table,
    random_rows,
    reuse_or_write,
    start_server,
)
from loadtest.bench.profile import profile_server
from loadtest.bench.record import RESULTS, BenchRecord
from loadtest.harness.process import ServerProcess
from loadtest.harness.procfs import child_pids, cpu_seconds, loadavg, pin, pin_process, smaps_rollup

# --------------------------------------------------------------------------- P1


TRANSPORTS = ("grpc", "stream")  # variant prefixes: unary Lookup, LookupStream
GOALS = {16384: 0.5, 4096: 0.25}  # server CPU per lookup vs the in-process gather, per core


def judge_cell(c: Cell, s: dict[str, dict[str, Any]], floor: dict[str, Any]
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A cell's summary with its gRPC / in-process ratios, and the targets it is judged on."""
    a = s["in_process"]
    cell: dict[str, Any] = {"mode": c.mode, "batch": c.batch, "bags": c.bags, **s}
    targets = []
    for tr in TRANSPORTS:
        keys = [k for k in s if k.startswith(f"{tr}_")]
        wall = {k: s[k]["rows_per_s"] / a["rows_per_s"] for k in keys}
        cpu = {k: s[k]["rows_per_cpu_s"] / a["rows_per_cpu_s"] for k in keys}
        server = min(s[k]["cpu_us_per_call"] for k in keys)
        cell[tr] = {"ratio_wall": {k: round(v, 4) for k, v in wall.items()},
                    "ratio_cpu": {k: round(v, 4) for k, v in cpu.items()},
                    "ratio_cpu_best": round(max(cpu.values()), 4),
                    "server_cpu_us_per_call": server,
                    # Server CPU per call beyond the kernel's own time for the same rows.
                    "overhead_us_per_call": round(server - a["cpu_us_per_call"], 1)}
        f = floor.get(tr)
        if f is not None:  # the bare server's CPU for the same bytes, same transport
            cell[tr]["floor_cpu_us_per_call"] = f
            cell[tr]["beyond_floor_and_kernel_us"] = round(server - f - a["cpu_us_per_call"], 1)
            cell[tr]["ratio_cpu_if_only_floor"] = round(a["cpu_us_per_call"] / (a["cpu_us_per_call"] + f), 4)
        label = "unary Lookup" if tr == "grpc" else "LookupStream"
        goal = GOALS.get(c.batch)
        if goal is not None:
            targets.append(target(f"{c.name} {label}: rows per server core vs the in-process kernel "
                                  "(CPU-normalized, best of callers)", max(cpu.values()), goal, True))
        if c.batch == 4096:
            for k in keys:
                p99 = s[k]["p99_us"]
                targets.append(target(f"{c.name} {label}: p99 ms per call, {k.split('_')[1]} caller(s)",
                                      None if p99 is None else p99 / 1e3, 2.0, False))
    if "handler" in s:
        h = s["handler"]
        cell["cpu_us_per_call_breakdown"] = {
            "kernel": a["cpu_us_per_call"],
            "servicer_python_beyond_kernel": round(h["cpu_us_per_call"] - a["cpu_us_per_call"], 1),
            **{f"{tr}_transport_beyond_servicer": round(cell[tr]["server_cpu_us_per_call"]
                                                       - h["cpu_us_per_call"], 1) for tr in TRANSPORTS}}
    return cell, targets


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.embedding",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20_000_000, help="table rows (default 20M)")
    p.add_argument("--dim", type=int, default=32, help="embedding dim (default 32)")
    p.add_argument("--seconds", type=float, default=2.0,
                   help="time per measurement (one cell, one variant), split over the rounds")
    p.add_argument("--rounds", type=int, default=5, help="rounds per measurement (median taken)")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    p.add_argument("--table-dir", type=Path, default=None,
                   help="model store to build the table in, or reuse it from (kept afterwards); "
                   "default: a temp dir, deleted at the end")
    p.add_argument("--out", type=Path, default=RESULTS / "embedding_p1.json",
                   help="result JSON; the PNG goes beside it")
    p.add_argument("--no-workers", action="store_true", help="skip the --workers 1 vs 2 comparison")
    p.add_argument("--no-profile", action="store_true", help="skip py-spy even if a target is missed")
    p.add_argument("--profile-seconds", type=float, default=4.0)
    return p.parse_args(argv)


def measure_cells(cells: Sequence[Cell], table: MappedTable, drivers: dict[str, GrpcDriver], server_pid: int,
                  version: str, fp: str, rounds: int, seconds: float, callers: Sequence[int],
                  rng: np.random.Generator, handler: Callable[[bytes], Callable[[], bytes]] | None = None
                  ) -> dict[str, dict[str, list[Run]]]:
    """Rounds x cells x (in-process kernel, in-process servicer if `handler`, each driver
    (unary, stream) with each caller count), interleaved so that a slow phase of the
    machine hits all alike."""
    variants = 16
    inputs = {c.name: [random_rows(rng, table.rows, c.batch) for _ in range(variants)] for c in cells}
    raw = {c.name: [lookup_request(c, r, version, fp).SerializeToString() for r in inputs[c.name]]
           for c in cells}
    local: dict[str, dict[str, list[Callable[[], Any]]]] = {c.name: {} for c in cells}
    for c in cells:
        local[c.name]["in_process"] = [anchor_call(c, table)(r) for r in inputs[c.name]]
        if handler is not None:
            local[c.name]["handler"] = [handler(q) for q in raw[c.name]]
    for c in cells:  # correctness, then warm-up (page cache, connections, allocators)
        for driver in drivers.values():
            answer = driver.call(raw[c.name][0])
            check_answer(c, table, inputs[c.name][0], answer, version)
            if handler is not None and local[c.name]["handler"][0]() != answer:
                raise AssertionError(f"{c.name}: in-process handler and server answers differ")
        pin({SERVER_CPU})
        for fns in local[c.name].values():
            run_anchor(fns, c.batch, 0.1)
        pin({CLIENT_CPU})
        for driver in drivers.values():
            driver.run(raw[c.name], c.batch, max(callers), 0.15)
    runs: dict[str, dict[str, list[Run]]] = {c.name: {} for c in cells}
    per = seconds / rounds
    for r in range(rounds):
        for c in cells:
            pin({SERVER_CPU})  # the server's core, idle meanwhile
            for name, fns in local[c.name].items():
                runs[c.name].setdefault(name, []).append(run_anchor(fns, c.batch, per))
            pin({CLIENT_CPU})
            for tr, driver in drivers.items():
                for k in callers:
                    runs[c.name].setdefault(f"{tr}_{k}", []).append(
                        driver.run(raw[c.name], c.batch, k, per, server_pid))
        log.info("round %d/%d done (load %s)", r + 1, rounds, loadavg())
    return runs


def floor_by_cell(cells: Sequence[Cell], floor: dict[str, Any], dim: int) -> dict[str, dict[str, Any]]:
    """Per packed cell, the bare server's CPU per call (best of callers) for its bytes."""
    out: dict[str, dict[str, Any]] = {}
    for c in cells:
        key = f"request {c.batch * 8} B, answer {c.batch * (4 + dim // 2)} B"
        if c.mode == "packed" and isinstance(floor.get(key), dict):
            f = floor[key]
            out[c.name] = {tr: min(f[f"{tr if tr == 'stream' else 'unary'}_callers_{k}"]
                                   ["server_cpu_us_per_call"] for k in (1, 2)) for tr in TRANSPORTS}
    return out


def profile_cells(cells: Sequence[Cell], drivers: dict[str, GrpcDriver], pid: int, table: MappedTable,
                  version: str, fp: str, rng: np.random.Generator, seconds: float, tmp: Path
                  ) -> dict[str, Any]:
    """py-spy (native, then GIL holder) under packed 4096-row load, 1 caller, per transport."""
    out: dict[str, Any] = {}
    for c in [c for c in cells if c.batch == 4096 and c.mode == "packed"]:
        reqs = [lookup_request(c, random_rows(rng, table.rows, c.batch), version, fp).SerializeToString()
                for _ in range(8)]
        for tr, driver in drivers.items():
            path = tmp / f"profile-{c.name}-{tr}.txt"

            def load(reqs: list[bytes] = reqs, c: Cell = c, driver: GrpcDriver = driver) -> None:
                driver.run(reqs, c.batch, 1, seconds)

            log.info("profiling the server under %s, %s, 1 caller", c.name, tr)
            out[f"{c.name}-{tr}"] = {"native": profile_server(pid, seconds, path, load, True),
                                     "python_gil": profile_server(pid, seconds, path, load, False)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    ncpu = len(os.sched_getaffinity(0))
    if ncpu < 2:
        log.warning("only %d CPU: server and client share it", ncpu)
    pinning = ncpu >= 2
    if pinning:
        pin({CLIENT_CPU})
    batches = [int(b) for b in args.batches.split(",")]
    cells = [Cell(m, b) for m in MODES for b in batches]
    tmp = Path(tempfile.mkdtemp(prefix="bench-embedding-"))
    store = args.table_dir or tmp / "store"
    version = f"r{args.rows}d{args.dim}"
    rec = BenchRecord("P1 embedding lookups: gRPC (unary and stream) vs in-process",
                      compared="python -m embedding_server over loopback gRPC (server pinned to one "
                               "core, client to the other), 1 and 2 closed-loop callers, unary "
                               "Lookup and LookupStream; the bare grpcio floor in the same run",
                      anchor="the server's own kernel on the same memory-mapped table plus one copy "
                             "of the answer (np.take / Int4Kernel.lookup, then tobytes), in-process, "
                             "one pinned thread", device="cpu",
                      config={k: str(v) for k, v in vars(args).items()})
    result = rec.results
    servers: list[ServerProcess] = []
    try:
        manifest, write_s = reuse_or_write(store, version, args.rows, args.dim, seed=7)
        table = map_table(store / MODEL / version, args.rows, args.dim)
        result["table"] = {"rows": args.rows, "dim": args.dim, "bytes": args.rows * (4 + args.dim // 2),
                           "write_seconds": None if write_s is None else round(write_s, 2),
                           "reused": write_s is None}
        srv = start_server(store, [f"{MODEL}/{version}"], tmp, name="w1",
                           cpus={SERVER_CPU} if pinning else None)
        servers.append(srv)
        log.info("server pid %d on %s, ready in %.1fs", srv.pid, srv.address, srv.ready_s)
        drivers = {"grpc": GrpcDriver(srv.address, 2), "stream": GrpcDriver(srv.address, 2, STREAM_METHOD,
                                                                            stream=True)}
        rng = np.random.default_rng(0)
        handler = in_process_servicer(store, version)
        runs = measure_cells(cells, table, drivers, srv.pid, version, manifest.fingerprint,
                             args.rounds, args.seconds, (1, 2), rng, handler)
        sizes = [(0, 0), *((c.batch * 8, c.batch * (4 + args.dim // 2)) for c in cells
                           if c.mode == "packed")]
        log.info("floor: bare Python gRPC calls (unary, stream), response sizes %s", sizes)
        result["grpc_floor"] = measure_floor(tmp, sizes, args.seconds / 2, args.rounds,
                                             {SERVER_CPU} if pinning else None)
        floors = floor_by_cell(cells, result["grpc_floor"], args.dim)
        out_cells, targets = [], []
        for c in cells:
            cell, cell_targets = judge_cell(c, {k: summarize(v) for k, v in runs[c.name].items()},
                                            floors.get(c.name, {}))
            out_cells.append(cell)
            targets += cell_targets
        result["cells"] = out_cells
        result["targets"] = targets
        result["server"] = {"pinned_cpus": [SERVER_CPU] if pinning else None,
                            "client_cpus": [CLIENT_CPU] if pinning else None,
                            "ready_s": round(srv.ready_s, 2), "memory": smaps_rollup(srv.pid)}
        if not args.no_profile:
            result["profile"] = profile_cells(cells, drivers, srv.pid, table, version,
                                              manifest.fingerprint, rng, args.profile_seconds, tmp)
        for d in drivers.values():
            d.close()
        if not args.no_workers and pinning:
            result["workers"] = compare_workers(args, store, version, manifest.fingerprint, table, srv,
                                                tmp, servers, rng)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # logs, profiles, and the table unless --table-dir
    rec.host["grpc"] = grpc.__version__
    targets = result.get("targets", [])
    rec.verdict = {"targets_met": sum(t["met"] for t in targets), "targets": len(targets),
                   "missed": [t["name"] for t in targets if not t["met"]],
                   "ratio_cpu": {f"{c['mode']}-{c['batch']}": {tr: c[tr]["ratio_cpu_best"]
                                                               for tr in TRANSPORTS}
                                 for c in result.get("cells", [])}}
    rec.write(args.out, p1_panels(result),
              title=f"P1: {args.rows / 1e6:g}M x {args.dim} INT4 table, loopback gRPC unary and stream "
                    "(server pinned to 1 core) vs in-process kernel",
              note="2-core machine shared with other jobs; compare ratios within this run only.")
    print_summary(result, rec.host)
    return 0


def compare_workers(args: argparse.Namespace, store: Path, version: str, fp: str, table: MappedTable,
                    w1: ServerProcess, tmp: Path, servers: list[ServerProcess],
                    rng: np.random.Generator) -> dict[str, Any]:
    """--workers 1 vs --workers 2, both unpinned (client too), interleaved, 2 and 4 callers."""
    pin(None)
    pin_process(w1.pid, None)
    w2 = start_server(store, [f"{MODEL}/{version}"], tmp, name="w2", extra=["--workers", "2"])
    servers.append(w2)
    cells = [Cell(m, b) for m in MODES for b in (4096, 16384)]
    d1, d2 = GrpcDriver(w1.address, 4), GrpcDriver(w2.address, 4)
    # SO_REUSEPORT spreads connections by hash: count how many reached each worker process.
    per_worker = {str(pid): 0 for pid in child_pids(w2.pid)}
    out: dict[str, Any] = {"note": "server and client unpinned on the same 2 cores; rows/s is the "
                           "machine's total; rows_per_cpu_s divides by all server processes' CPU",
                           "cells": []}
    rounds = max(3, args.rounds - 2)
    runs: dict[str, dict[str, list[Run]]] = {c.name: {} for c in cells}
    reqs = {c.name: [lookup_request(c, random_rows(rng, table.rows, c.batch), version, fp)
                     .SerializeToString() for _ in range(8)] for c in cells}
    for c in cells:
        for d in (d1, d2):
            d.run(reqs[c.name], c.batch, 4, 0.15)
    cpu_before = {pid: cpu_seconds(int(pid)) for pid in per_worker}
    for _ in range(rounds):
        for c in cells:
            for label, d, srv in (("workers_1", d1, w1), ("workers_2", d2, w2)):
                for k in (2, 4):
                    runs[c.name].setdefault(f"{label}_callers_{k}", []).append(
                        d.run(reqs[c.name], c.batch, k, args.seconds / rounds, srv.pid))
    out["worker_cpu_s"] = {pid: round(cpu_seconds(int(pid)) - t, 2) for pid, t in cpu_before.items()}
    for c in cells:
        s = {k: summarize(v) for k, v in runs[c.name].items()}
        out["cells"].append({"mode": c.mode, "batch": c.batch, **s})
    d1.close()
    d2.close()
    return out


if __name__ == "__main__":
    sys.exit(main())
