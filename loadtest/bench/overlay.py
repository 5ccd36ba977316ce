"""Delta overlays on one embedding shard: apply rate, lookup rate with a 1M-row overlay vs
none (same process, same table, same run), overlay bytes per row.

    python -m loadtest.bench.overlay [--rows 8000000] [--overlay-rows 1000000] [--deltas 10]
        [--seconds 1.0] [--rounds 5] [--store /tmp/overlay-store] [--out loadtest/results/delta_overlay.json]

The shard is the real server code in process (VersionRegistry + EmbeddingServicer; one
intra-op thread, as the server runs): the deltas are written with modelpack's DeltaWriter
(`--deltas` of them, disjoint random rows, `--overlay-rows` together), each applied with
ApplyDeltas' own path (verify every byte, merge, index, publish), timed. Lookups go
through EmbeddingServicer.Lookup from the parsed request to the answer's wire bytes, at
seq 0 (no overlay) and at the last seq (the overlay), alternating in rounds, for packed
and sum-pooled fp16 4096-row requests of uniform random rows. Every answer at the last
seq is first checked against modelpack.delta_read.overlay_rows. Rates are medians of
rounds, latency percentiles over all calls. If the ratio misses 0.9, the lookups at the
overlay seq are profiled with py-spy (this process).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from loadtest.bench.grpc_driver import GrpcDriver, Run, run_anchor
from loadtest.bench.lookup_harness import (
    MODEL,
    TABLE,
    Cell,
    _Context,
    lookup_request,
    reuse_or_write,
    start_server,
)
from loadtest.bench.plotting import Panel
from loadtest.bench.profile import profile_server
from loadtest.bench.record import RESULTS, BenchRecord
from loadtest.harness.process import ServerProcess
from modelpack.delta_read import list_seqs, overlay_rows, read_chain
from modelpack.delta_write import write_delta_packed
from protos import embedding_pb2 as pb
from protos import embedding_pb2_grpc as pbg

log = logging.getLogger("bench.overlay")
VERSION = "v1"
TARGET = 0.9


def write_deltas(vdir: Path, rows: int, overlay_rows_n: int, deltas: int, dim: int, seed: int) -> float:
    """`deltas` deltas of disjoint random rows, `overlay_rows_n` together (kept if present)."""
    if len(list_seqs(vdir)) == deltas:
        return 0.0
    if list_seqs(vdir):
        raise SystemExit(f"{vdir}/deltas holds another set of deltas; use a fresh --store")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(rows, overlay_rows_n, replace=False).astype(np.int64)
    row_bytes = 4 + dim // 2
    t0 = time.monotonic()
    for part in np.array_split(chosen, deltas):
        packed = rng.integers(0, 256, (part.size, row_bytes), dtype=np.uint8)
        packed[:, :4] = np.array([0.01, -0.05], np.float16).view(np.uint8)  # finite scale, bias
        write_delta_packed(vdir, {TABLE: (part, packed)})
    return time.monotonic() - t0


def arm_stats(runs: list[Run]) -> dict[str, Any]:
    """Rates of one arm's rounds (medians) and its latency percentiles over all calls."""
    lat = np.concatenate([np.asarray(r.latencies_ns, dtype=np.float64) for r in runs]) * 1e-6
    cpu = [r.calls / r.cpu_s for r in runs if r.cpu_s]
    return {"calls_per_s": statistics.median(r.calls / r.wall_s for r in runs),
            "calls_per_cpu_s": statistics.median(cpu) if cpu else None,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "rounds": [{"calls": r.calls, "wall_s": r.wall_s, "cpu_s": r.cpu_s, "load": r.load}
                       for r in runs]}


def interleaved(arms: dict[str, Callable[[float], Run]], rounds: int, seconds: float,
                chunks: int = 10) -> dict[str, dict[str, Any]]:
    """Each round gives every arm `seconds`, in `chunks` slices alternating between the arms
    (the order rotating): on a shared machine whose load moves within a second, every arm
    meets the same load, which whole-second turns did not (ratios swung 0.4-0.8)."""
    runs: dict[str, list[Run]] = {k: [] for k in arms}
    names = list(arms)
    for r in range(rounds):
        parts: dict[str, list[Run]] = {k: [] for k in arms}
        for c in range(chunks):
            k0 = (r + c) % len(names)
            for k in names[k0:] + names[:k0]:
                parts[k].append(arms[k](seconds / chunks))
        for k, ps in parts.items():
            cpu = [p.cpu_s for p in ps]
            runs[k].append(Run(sum(p.calls for p in ps), sum(p.rows for p in ps),
                               sum(p.wall_s for p in ps), [x for p in ps for x in p.latencies_ns],
                               None if None in cpu else sum(c for c in cpu if c is not None),
                               ps[-1].load))
    return {k: arm_stats(v) for k, v in runs.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8_000_000, help="table rows (one shard serves all)")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--overlay-rows", type=int, default=1_000_000)
    p.add_argument("--deltas", type=int, default=10)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--seconds", type=float, default=1.0, help="per arm per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--store", type=Path, default=None, help="reuse a store here (default: temp dir)")
    p.add_argument("--no-grpc", action="store_true", help="only the in-process servicer")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "delta_overlay.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)  # as the server runs
    with tempfile.TemporaryDirectory(prefix="overlay-bench-") as tmp:
        return run(args, args.store or Path(tmp), Path(tmp))


def run(args: argparse.Namespace, store: Path, tmp: Path) -> int:
    from embedding_server.auth import AdminAuth
    from embedding_server.config import ServerConfig
    from embedding_server.metrics import Metrics
    from embedding_server.servicer import EmbeddingServicer
    from embedding_server.versions import VersionRegistry

    rec = BenchRecord("delta overlay", compared=f"lookups at (V, s) with a {args.overlay_rows}-row "
                      "overlay vs (V, 0), same table and run: EmbeddingServicer.Lookup in process, "
                      "and unary Lookup over gRPC to a real server",
                      anchor="the same lookups at seq 0 (no overlay)", device="cpu",
                      config={k: str(v) for k, v in vars(args).items()})
    _, write_s = reuse_or_write(store, VERSION, args.rows, args.dim, seed=1, progress=False)
    vdir = store / MODEL / VERSION
    delta_write_s = write_deltas(vdir, args.rows, args.overlay_rows, args.deltas, args.dim, seed=2)
    cfg = ServerConfig(store=store, memory_budget_bytes=1 << 50, max_rows_per_request=1 << 20)
    registry = VersionRegistry(store, 0, 1, cfg.memory_budget_bytes, readable_seqs=2)
    entry = registry.load(MODEL, VERSION)
    servicer = EmbeddingServicer(cfg, registry, Metrics(), AdminAuth(None))

    applies = []
    rows_each = args.overlay_rows // args.deltas
    for seq in range(1, args.deltas + 1):
        t0 = time.perf_counter()
        e = servicer.apply_local(MODEL, VERSION, seq)
        dt = time.perf_counter() - t0
        applies.append({"seq": seq, "seconds": dt, "rows_per_s": rows_each / dt,
                        "overlay_bytes": e.overlay_bytes})
    last = args.deltas
    state = registry.hold(MODEL, VERSION, "", last)
    registry.release(state[0])
    overlay_b, mapped = state[2].nbytes, state[1].tables[TABLE]
    e = servicer.apply_local(MODEL, VERSION, 0)  # seq 0 readable again beside the last: the anchor
    assert set(e.readable_seqs) == {0, last}, e.readable_seqs
    rec.results["apply"] = applies
    rec.results["setup_s"] = {"version_write": write_s, "deltas_write": delta_write_s}

    ctx: Any = _Context()
    rng = np.random.default_rng(3)
    chain = read_chain(vdir, last)
    replaced = np.concatenate([d.tables[TABLE].rows for d in chain])
    untouched = np.setdiff1d(np.arange(args.rows, dtype=np.int64), replaced, assume_unique=True)
    batches = {"random": [rng.integers(0, args.rows, args.batch, dtype=np.int64) for _ in range(16)],
               "no hit": [rng.choice(untouched, args.batch) for _ in range(16)]}
    hit_fraction = float(np.isin(np.concatenate(batches["random"]), replaced).mean())

    def raw(mode: str, seq: int, which: str) -> list[bytes]:
        out = []
        for rows in batches[which]:
            q = lookup_request(Cell(mode, args.batch), rows, VERSION, entry.fingerprint)
            q.seq = seq
            out.append(q.SerializeToString())
        return out

    def in_process(reqs: list[bytes]) -> list[Callable[[], bytes]]:
        def call(r: bytes) -> bytes:
            return servicer.Lookup(pb.LookupRequest.FromString(r), ctx)

        return [partial(call, r) for r in reqs]

    # Correctness first: the packed answer at `last` is overlay_rows over V's rows.
    got = pb.LookupResponse.FromString(in_process(raw("packed", last, "random")[:1])[0]())
    rows0 = batches["random"][0]
    want = overlay_rows(mapped.gather(rows0), rows0, [d.tables[TABLE] for d in chain])
    assert got.seq == last and got.results[0].data == want.tobytes(), "wrong overlay answer"

    results: dict[str, Any] = {}
    seconds, rounds = args.seconds, args.rounds
    for mode in ("packed", "pooled"):
        arms = {name: in_process(raw(mode, seq, which)) for name, seq, which in (
            ("none", 0, "random"), ("overlay", last, "random"), ("overlay, no hit", last, "no hit"))}
        for calls in arms.values():  # warm-up
            run_anchor(calls, args.batch, 0.3)
        results[f"in_process/{mode}"] = interleaved(
            {k: partial(run_anchor, c, args.batch) for k, c in arms.items()}, rounds, seconds)
    registry.unload(MODEL, VERSION, 1.0)
    if not args.no_grpc:
        results.update(over_grpc(args, store, tmp, raw, last))
    verdict = judge(results, applies, overlay_b, hit_fraction, args)
    rec.verdict, rec.results["lookups"] = verdict, results
    if not verdict["met"] and not args.no_profile:
        rec.results["profile"] = profile_miss(args, store, tmp, raw, last)
    path = rec.write(args.out, panels(results, applies, args), title=(
        f"Delta overlay: {args.rows / 1e6:g}M x {args.dim} table, {args.overlay_rows / 1e6:g}M-row "
        f"overlay ({verdict['overlay_bytes_per_row']} B/row), {args.batch}-row lookups"))
    log.info("verdict %s -> %s", verdict, path)
    return 0


def over_grpc(args: argparse.Namespace, store: Path, tmp: Path, raw: Callable[[str, int, str], list[bytes]],
              last: int) -> dict[str, Any]:
    """The same lookups over unary gRPC to a real server process (one caller)."""
    server, driver = start(store, tmp, last)
    try:
        out = {}
        for mode in ("packed", "pooled"):
            reqs = {"none": raw(mode, 0, "random"), "overlay": raw(mode, last, "random")}
            for r in reqs.values():
                driver.run(r, args.batch, 1, 0.3, server.pid)
            out[f"grpc/{mode}"] = interleaved(
                {k: partial(grpc_run, driver, r, args.batch, server.pid) for k, r in reqs.items()},
                args.rounds, args.seconds)
        return out
    finally:
        driver.close()
        server.stop()


def grpc_run(driver: GrpcDriver, reqs: list[bytes], batch: int, pid: int, seconds: float) -> Run:
    return driver.run(reqs, batch, 1, seconds, pid)


def start(store: Path, tmp: Path, last: int) -> tuple[ServerProcess, GrpcDriver]:
    """A server with the version, made readable at `last` and at 0 over ApplyDeltas."""
    (tmp / "token").write_text("bench\n")
    server = start_server(store, [f"{MODEL}/{VERSION}"], tmp, name="overlay-server",
                          extra=("--admin-token-file", str(tmp / "token"), "--max-rows-per-request",
                                 str(1 << 20)))
    with grpc.insecure_channel(server.address) as ch:
        stub = pbg.EmbeddingServiceStub(ch)  # type: ignore[no-untyped-call]
        for seq in (last, 0):
            stub.ApplyDeltas(pb.ApplyDeltasRequest(model=MODEL, version=VERSION, seq=seq),
                             metadata=[("authorization", "Bearer bench")], timeout=120)
    return server, GrpcDriver(server.address, 1)


def profile_miss(args: argparse.Namespace, store: Path, tmp: Path,
                 raw: Callable[[str, int, str], list[bytes]], last: int) -> dict[str, Any]:
    """py-spy of the server answering lookups at the overlay seq (both modes)."""
    server, driver = start(store, tmp, last)
    try:
        out = {}
        for mode in ("packed", "pooled"):
            reqs = raw(mode, last, "random")

            def load(r: list[bytes] = reqs) -> None:
                driver.run(r, args.batch, 1, 5.5)

            out[mode] = profile_server(server.pid, 5, tmp / f"profile-{mode}.txt", load, native=True)
        return out
    finally:
        driver.close()
        server.stop()


def judge(results: dict[str, Any], applies: list[dict[str, Any]], overlay_b: int, hit_fraction: float,
          args: argparse.Namespace) -> dict[str, Any]:
    v: dict[str, Any] = {}
    ratios = []
    for where, arms in results.items():
        none = arms["none"]
        for arm in (a for a in arms if a != "none"):
            key = f"{where}/{arm}"
            v[f"{key} ratio (calls/s)"] = round(arms[arm]["calls_per_s"] / none["calls_per_s"], 3)
            if none["calls_per_cpu_s"] and arms[arm]["calls_per_cpu_s"]:
                r = arms[arm]["calls_per_cpu_s"] / none["calls_per_cpu_s"]
                v[f"{key} ratio (calls per CPU-second)"] = round(r, 3)
                if where.startswith("grpc") or arm == "overlay, no hit":
                    ratios.append(r)
            v[f"{key} p99 ms"] = round(arms[arm]["p99_ms"], 3)
        v[f"{where}/none p99 ms"] = round(none["p99_ms"], 3)
    rates = [a["rows_per_s"] for a in applies]
    v.update({"apply rows/s (median over deltas)": round(statistics.median(rates)),
              "apply rows/s (slowest delta)": round(min(rates)),
              "rows per delta": args.overlay_rows // args.deltas,
              "overlay rows": args.overlay_rows, "overlay bytes": overlay_b,
              "overlay_bytes_per_row": round(overlay_b / args.overlay_rows, 2),
              "hit fraction (random rows)": round(hit_fraction, 4), "target": TARGET,
              "met": bool(ratios) and min(ratios) >= TARGET,
              "met means": "over gRPC with hits, and in process with none, the overlay's calls "
                           "per CPU-second >= 0.9x those at seq 0"})
    return v


def panels(results: dict[str, Any], applies: list[dict[str, Any]], args: argparse.Namespace) -> list[Panel]:
    out = []
    for where in results:
        arms = results[where]
        out.append(Panel(f"{where}: lookups per CPU-second (server side)", list(arms),
                         {"calls/CPU-s": [a["calls_per_cpu_s"] for a in arms.values()]},
                         ylabel="calls per CPU-second"))
    ratios = {w: [a["calls_per_cpu_s"] / r["none"]["calls_per_cpu_s"] for a in r.values()]
              for w, r in results.items()}
    out.append(Panel("vs none (calls per CPU-second)", [w for w in ratios],
                     {"overlay": [r[1] for r in ratios.values()]}, targets={"target 0.9": TARGET}))
    out.append(Panel(f"ApplyDeltas rows/s per shard ({args.overlay_rows // args.deltas} rows each)",
                     [str(a["seq"]) for a in applies], {"rows/s": [a["rows_per_s"] for a in applies]},
                     ylabel="rows/s", annotate=False))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
