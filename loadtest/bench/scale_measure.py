"""P3's measurements (scale.py): sha256 throughput, the server's log milestones, lookup rates
on the big tables vs the reference table (gRPC and in-process, rounds interleaved), plots.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from loadtest.bench.grpc_driver import GrpcDriver, Run, run_anchor, summarize
from loadtest.bench.lookup_harness import (
    CLIENT_CPU,
    SERVER_CPU,
    Cell,
    MappedTable,
    anchor_call,
    check_answer,
    lookup_request,
    random_rows,
)
from loadtest.bench.plotting import Panel
from loadtest.harness.procfs import disk_read_bytes, loadavg, pin, self_cpu_seconds
from protos import embedding_pb2_grpc as pbg

log = logging.getLogger("bench")
GB = 1e9
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


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

    io0, cpu0 = disk_read_bytes(os.getpid()), self_cpu_seconds()
    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(part, range(threads)))
    dt = time.monotonic() - t0
    cpu = self_cpu_seconds() - cpu0
    return {"threads": threads, "seconds": round(dt, 2), "GB_per_s": round(size / dt / GB, 3),
            "cpu_s": round(cpu, 2), "GB_per_cpu_s": round(size / cpu / GB, 3) if cpu > 0 else None,
            "read_from_disk_GB": round((disk_read_bytes(os.getpid()) - io0) / GB, 2)}


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


def p3_panels(result: dict[str, Any]) -> list[Panel]:
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
    return panels
