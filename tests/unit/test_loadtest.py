"""loadtest's pure parts: loopback guard, SLO verdict, AUC, request log, step shape, report.

Nothing here imports Locust (it monkey-patches the process with gevent); the Locust
scripts themselves run as real `locust` processes in tests/e2e/test_loadtest_cli.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest

from deploy_controller.journal import Journal, read_rollouts
from deploy_controller.state import Outcome, Step, next_step, plan
from loadtest.harness.load import (
    HttpError,
    HttpPool,
    RunResult,
    closed_loop,
    open_loop,
    percentiles,
)
from loadtest.locust import report
from loadtest.locust.served import (
    EvalSet,
    RemoteTargetError,
    ServedLog,
    auc,
    check_loopback,
    percentile,
    read_request_log,
    shares_by_second,
    slo_problems,
    step_at,
    target_host,
)
from loadtest.stack.commands import fleet_json, ranker_args, shard_args
from loadtest.stack.local import StackConfig
from loadtest.stack.state import STATE_FILE, down, env_text, process_start, still_running, strays
from modelpack.train import auc as reference_auc


@pytest.mark.parametrize(("target", "host"), [
    ("http://127.0.0.1:8080", "127.0.0.1"), ("http://localhost:8080/x", "localhost"),
    ("127.0.0.1:50051", "127.0.0.1"), ("[::1]:50051", "::1"), ("http://[::1]:80", "::1"),
    ("dns:///localhost:50051", "localhost"), ("ipv4:127.0.0.1:1,127.0.0.1:2", "127.0.0.1"),
    ("https://ads.example.com", "ads.example.com"), ("10.0.0.7:50051", "10.0.0.7"),
])
def test_target_host(target: str, host: str) -> None:
    assert target_host(target) == host


def test_loopback_only_unless_allowed() -> None:
    for ok in ("http://127.0.0.1:8080", "localhost:1", "http://[::1]:9"):
        check_loopback(ok)
    for bad in ("http://10.1.2.3:8080", "ads.example.com:443", "http://127.0.0.1.evil.com",
                "", None):
        with pytest.raises(RemoteTargetError):
            check_loopback(bad)
    check_loopback("http://10.1.2.3:8080", allow_remote=True)


def test_slo_verdict() -> None:
    assert slo_problems(1000, 5, 120.0, max_failure_ratio=0.01, max_p99_ms=200) == []
    probs = slo_problems(1000, 20, 350.0, max_failure_ratio=0.01, max_p99_ms=200)
    assert len(probs) == 2 and "failure ratio 0.0200" in probs[0] and "p99 350" in probs[1]
    assert slo_problems(0, 0, None, max_failure_ratio=0.01, max_p99_ms=200)  # nothing ran
    assert slo_problems(10, 10, 9e9, max_failure_ratio=-1, max_p99_ms=0) == []  # both off


def test_auc_matches_the_reference_including_ties() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random(5000) < 0.1).astype(np.float32)
    scores = np.round(rng.random(5000) * 0.5 + labels * 0.2, 2)  # many ties
    assert auc(labels, scores) == pytest.approx(reference_auc(labels, scores), abs=1e-9)
    assert auc([0, 1], [0.1, 0.9]) == 1.0 and auc([1, 0], [0.1, 0.9]) == 0.0
    assert auc([0, 1, 0, 1], [0.5] * 4) == 0.5
    assert math.isnan(auc([1, 1], [0.2, 0.3]))
    assert math.isnan(percentile([], 99)) and percentile([1.0, 2.0, 3.0], 50) == 2.0


def test_served_log_rows_shares_and_auc(tmp_path: Path) -> None:
    out = io.StringIO()
    log = ServedLog(out)
    s = np.array([0.9, 0.1], dtype=np.float32)
    y = np.array([1, 0], dtype=np.float32)
    log.record(100.2, 10.0, 200, "v1", "json", s, y)
    log.record(100.7, 12.0, 200, "v2", "protobuf", s[::-1].copy(), y)
    log.record(101.1, 3.0, 429, "", "json")
    log.record(101.5, 11.0, 200, "v2", "json", s, y)
    summary = log.summary()
    assert summary["failures"] == 1
    assert summary["versions"]["v1"] == {"requests": 1, "share": pytest.approx(1 / 3),
                                         "candidates": 2, "served_auc": 1.0}
    assert summary["versions"]["v2"]["served_auc"] == 0.5
    path = tmp_path / "requests.csv"
    path.write_text(out.getvalue())
    rows = read_request_log(path)
    assert [(r.status, r.version, r.kind) for r in rows] == [
        (200, "v1", "json"), (200, "v2", "protobuf"), (429, "-", "json"), (200, "v2", "json")]
    t, shares = shares_by_second(rows)
    assert list(t) == [100.2, 101.2]
    assert list(shares["v1"]) == [0.5, 0.0] and list(shares["v2"]) == [0.5, 1.0]


def test_eval_set_strips_labels_and_version_pins(tmp_path: Path) -> None:
    d = tmp_path / "v7"
    d.mkdir()
    (d / "eval.jsonl").write_text(
        json.dumps({"model": "m", "version": "v7", "user": {}, "candidates": [{}, {}],
                    "labels": [0, 1]}) + "\n\n")
    (d / "metrics.json").write_text(json.dumps({"int4_auc": 0.75}))
    ev = EvalSet.load(d / "eval.jsonl")
    assert ev.requests == [{"model": "m", "user": {}, "candidates": [{}, {}]}]
    assert ev.labels[0] is not None and ev.labels[0].tolist() == [0.0, 1.0]
    assert ev.offline_auc() == 0.75
    (d / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError):
        EvalSet.load(d / "empty.jsonl")


def test_step_shape() -> None:
    assert [step_at(t, 4, 10.0, 3) for t in (0, 9.9, 10, 25, 29.9, 30, 99)] == [
        4, 4, 8, 12, 12, None, None]
    with pytest.raises(ValueError):
        step_at(0, 0, 10.0, 3)


def test_stack_command_lines_and_files(tmp_path: Path) -> None:
    tok = tmp_path / "t"
    args = shard_args(tmp_path, "ads_ctr", "v1", 1, 2, tok, "--workers", "2")
    assert args[:6] == ["--store", str(tmp_path), "--shard", "1", "--num-shards", "2"]
    assert "--host" in args and args[args.index("--host") + 1] == "127.0.0.1"
    r = ranker_args(tmp_path, "ads_ctr", "v1", [["a:1", "b:2"], ["c:3"]], tok)
    assert r[r.index("--embedding-shards") + 1] == "a:1|b:2,c:3"
    assert json.loads(fleet_json(["http://x:1"], [["a:1", "b:2"], ["c:3"]])) == {
        "rankers": ["http://x:1"], "embedding_shards": [["a:1", "b:2"], ["c:3"]]}
    assert StackConfig(replicas=(2, 1)).replica_counts() == (2, 1)
    with pytest.raises(ValueError):
        StackConfig(replicas=(2,)).replica_counts()
    env = env_text({"ranker_url": "http://127.0.0.1:8080", "controller_url": "http://127.0.0.1:9",
                    "token_file": "/tmp/a b/admin.token",
                    "processes": [{"module": "embedding_server", "address": "127.0.0.1:5"},
                                  {"module": "ranker_server", "address": "127.0.0.1:8080"}]})
    assert "export DEPLOYCTL_TOKEN=\"$(cat '/tmp/a b/admin.token')\"" in env
    assert "export SHARD0=127.0.0.1:5" in env and "SHARD1" not in env


def test_a_recorded_process_is_recognised_by_pid_and_start_time() -> None:
    me = {"pid": os.getpid(), "start_time": process_start(os.getpid())}
    assert me["start_time"] and still_running(me)
    assert not still_running({**me, "start_time": "1"})  # the pid was reused by another process
    assert not still_running({"pid": 2**22 + 12345, "start_time": "1"})  # gone


# ------------------------------------------------------------------ report


def _history(path: Path, t0: int, seconds: int) -> None:
    cols = ["Timestamp", "User Count", "Type", "Name", "Requests/s", "Failures/s", "50%", "66%",
            "75%", "80%", "90%", "95%", "98%", "99%", "99.9%", "99.99%", "100%",
            "Total Request Count", "Total Failure Count", "Total Median Response Time",
            "Total Average Response Time", "Total Min Response Time", "Total Max Response Time",
            "Total Average Content Size"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerow([t0, 0, "", "Aggregated", "0.000000", "0.000000", *["N/A"] * 11,
                    0, 0, 0, 0, 0, 0, 0])
        for i in range(1, seconds):
            w.writerow([t0 + i, 4, "POST", "/v1/rank json v1", "40", "0", *[10] * 11,
                        i * 40, 0, 10, 11, 5, 30, 100])
            w.writerow([t0 + i, 4, "", "Aggregated", "40.000000", "0.000000", 10, 11, 12, 13,
                        15, 18, 20, 25 + i, 30, 30, 30, i * 40, 0, 10, 11, 5, 30, 100])


def _journal(path: Path, t0: float) -> str:
    """A real journal (deploy_controller's schema) with one finished rollout, timed from t0."""
    j = Journal(path)
    r = j.create("ads_ctr", "v1", "v2", [10, 100], 1.0)
    step, t = Step.parse("load_dense"), t0
    while not step.terminal:
        j.begin(r.id, step)
        nxt = next_step(step, Outcome.OK, [10, 100])
        j.end(r.id, step, Outcome.OK, nxt)
        step = nxt
    j.close()
    db = sqlite3.connect(path)  # spread the events over the run: one second per event
    seqs = [row[0] for row in db.execute("SELECT seq FROM events ORDER BY seq")]
    for i, seq in enumerate(seqs):
        db.execute("UPDATE events SET ts = ? WHERE seq = ?", (t + 2 + i, seq))
    db.execute("UPDATE rollouts SET created_at = ?, finished_at = ?",
               (t + 2, t + 2 + len(seqs)))
    db.commit()
    db.close()
    return r.id


def test_report_reads_locust_history_journal_and_draws(tmp_path: Path) -> None:
    t0 = 1_700_000_000
    prefix = tmp_path / "run"
    _history(Path(f"{prefix}_stats_history.csv"), t0, 30)
    out = io.StringIO()
    log = ServedLog(out)
    for i in range(300):
        t = t0 + i / 10
        log.record(t, 10.0 + i % 7, 200, "v1" if t < t0 + 10 else "v2", "json")
    log.record(t0 + 5, 1.0, 429, "", "json")
    Path(f"{prefix}_requests.csv").write_text(out.getvalue())
    rid = _journal(tmp_path / "journal.sqlite", t0)

    hist = report.read_history(Path(f"{prefix}_stats_history.csv"))
    assert hist.t.size == 30 and math.isnan(hist.p99_ms[0]) and hist.p99_ms[-1] == 25 + 29
    (r,) = read_rollouts(tmp_path / "journal.sqlite")
    assert (r.id, r.status, r.canary) == (rid, "succeeded", [10, 100])
    assert len(r.events) == 2 * (len(plan([10, 100])) - 1)
    labels = [m.label for m in report.marks(r)]
    assert labels == ["1 stage dense", "2 stage embeddings", "10% v2", "100% v2", "3 retire",
                      "succeeded"]
    assert report.overlapping([r], t0 + 100, t0 + 200) == []
    png = report.build(str(prefix), tmp_path / "journal.sqlite", tmp_path / "r.png", "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert report.main(["--csv", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 1
    bins, p99 = report.p99_by_bin(read_request_log(Path(f"{prefix}_requests.csv")), 2.0)
    assert bins.size == 15 and np.all(p99 >= 10)


# ------------------------------------------------------------------ the load generator


async def _serve(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
                 ) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(ln.split(b":")[1]) for ln in head.split(b"\r\n")
                  if ln.lower().startswith(b"content-length"))
    return await reader.readexactly(length)


def test_pool_resends_once_when_the_server_closed_a_keepalive_connection() -> None:
    """A server that answers one request per connection and then closes it without saying
    so (what uvicorn does to a connection idle past its keep-alive timeout)."""

    async def one_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.close()

    async def run() -> None:
        server, port = await _serve(one_per_connection)
        pool = HttpPool("127.0.0.1", port)
        for i in range(3):  # 2nd and 3rd go out on a connection the server has closed
            assert await pool.request("POST", "/x", b"ping%d" % i) == (200, b"ping%d" % i)
            await asyncio.sleep(0.05)
        await pool.close()
        server.close()
        server, port = await _serve(never_answers)
        pool = HttpPool("127.0.0.1", port)
        with pytest.raises(HttpError):  # a fresh connection that fails is not sent again
            await pool.request("POST", "/x", b"ping")
        res = await closed_loop(pool, "/x", [b"a"], concurrency=2, duration_s=5,
                                content_type="text/plain", max_requests=4)
        assert res.status == [-1] * 4 and len(res.errors) == 4
        await pool.close()
        server.close()

    asyncio.run(run())


def test_open_loop_latency_counts_from_the_schedule() -> None:
    """One request at a time, 50 ms each, offered 10 at once: the 10th waits ~450 ms for
    the server. latency_s (from the schedule) shows the queue; the labels and due times
    are kept per request."""
    busy = asyncio.Lock()

    async def serial(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                body = await _read_request(reader)
                async with busy:
                    await asyncio.sleep(0.05)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()

    async def run() -> RunResult:
        server, port = await _serve(serial)
        pool = HttpPool("127.0.0.1", port)
        try:
            return await open_loop(pool, "/x", [b"%d" % i for i in range(10)], [0.0] * 10,
                                   content_type="text/plain", label=lambda s, b: b.decode())
        finally:
            await pool.close()
            server.close()

    res = asyncio.run(run())
    assert res.status == [200] * 10 and res.labels == [str(i) for i in range(10)]
    assert res.due_s == [0.0] * 10
    assert max(res.latency_s) >= 0.45 and min(res.latency_s) >= 0.05
    assert all(lat >= svc for lat, svc in zip(res.latency_s, res.service_s, strict=True))
    assert percentiles(res.ok_latencies())["max_ms"] >= 450


def test_down_stops_a_server_restarted_by_hand(tmp_path: Path) -> None:
    """Issue 11: `make down` missed processes restarted with their command line after `up`."""
    run_dir = tmp_path / "stack"
    run_dir.mkdir()
    token_dir = tmp_path / "token"
    token_dir.mkdir()
    # A process that stands in for a shard restarted by hand: same --port-file, new pid.
    argv = [sys.executable, "-c", "import time; time.sleep(60)", "--port-file",
            str(run_dir / "shard0.port")]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--port-file",
                              str(tmp_path / "elsewhere.port")])
    stray = subprocess.Popen(argv, cwd=tmp_path)
    try:
        (run_dir / STATE_FILE).write_text(json.dumps({
            "token_dir": str(token_dir),
            "processes": [{"name": "shard0", "pid": 2**22 + 7, "start_time": "0"}]}))
        assert strays(run_dir, set()) == [stray.pid]
        assert down(run_dir, timeout=5) == 1
        assert stray.wait(timeout=5) == -signal.SIGTERM
        assert other.poll() is None  # a --port-file elsewhere is not ours
    finally:
        for p in (stray, other):
            p.kill()
            p.wait()
